"""torch's bytecode at setup: pip's own compile against `pip --no-compile` + `compileall -j 0`.

    python benchmarks/torch_bytecode.py [--out benchmarks/results/torch_bytecode.json]

Why `make setup` lets compileall compile torch: pip compiles a wheel's sources on one core, while
compileall spreads them over every core. Both ways are timed here side by side, each in a fresh
venv built the way the Makefile builds it (torch's version from requirements.lock, its build from
pip's configuration), alternating, three times each (the median counts). A third way, pip
unpacking alone, is the reference: each way's time above it is its compile time. The report
gives the times, the ratio, the compile times, the .pyc counts (both compiling ways must cover
the same sources) and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from op_sensitivity.engines.runner import host_facts

REPO = Path(__file__).resolve().parents[1]
# pip compiling as it installs; pip unpacking (--no-compile), then compileall on every core; pip
# unpacking alone, the reference the compile times are read from
WAYS = ("pip_compiles", "compileall", "unpack_only")
SKIP = r"py312_intrinsics\.py$"  # written for Python 3.12: neither pip nor compileall compiles it


def _torch_pin() -> str:
    return next(
        line.split()[0]
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if line.startswith("torch==")
    )


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _pyc_count(python: Path) -> int:
    code = (
        "import importlib.util as u, pathlib as p\n"
        "n = 0\n"
        "for pkg in ('torch', 'torchgen', 'functorch'):\n"
        "    root = p.Path(u.find_spec(pkg).submodule_search_locations[0])\n"
        "    n += sum(p.Path(u.cache_from_source(str(f))).exists() for f in root.rglob('*.py'))\n"
        "print(n)"
    )
    return int(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


def _site_packages(python: Path) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run(
        [str(python), "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


def _install(venv: Path, way: str, pin: str) -> tuple[float, int]:
    """One fresh venv, torch installed one way: the seconds and the .pyc files it left."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-qq"]
    seconds = _timed([*pip, pin] if way == "pip_compiles" else [*pip, "--no-compile", pin])
    if way == "compileall":
        seconds += _timed(
            [str(python), "-m", "compileall", "-q", "-j", "0", "-x", SKIP, _site_packages(python)]
        )
    return seconds, _pyc_count(python)


def measure(scratch: Path, repeats: int) -> dict:
    """The two ways alternate, ``repeats`` times each, so a busy spell of the machine slows both;
    the ratio is of the medians."""
    pin = _torch_pin()
    result: dict = {"torch": pin}
    runs: dict[str, list[float]] = {way: [] for way in WAYS}
    pycs: dict[str, set[int]] = {way: set() for way in WAYS}
    for i in range(repeats):
        for way in runs:
            venv = scratch / f"{way}-{i}"
            seconds, pyc = _install(venv, way, pin)
            shutil.rmtree(venv)
            runs[way].append(round(seconds, 1))
            pycs[way].add(pyc)
    for way, seconds in runs.items():
        if len(pycs[way]) != 1:
            raise SystemExit(f"{way}: the .pyc count changed between runs: {sorted(pycs[way])}")
        result[way] = {
            "seconds": seconds,
            "median_s": statistics.median(seconds),
            "pyc_files": pycs[way].pop(),
        }
    result["ratio"] = round(result["pip_compiles"]["median_s"] / result["compileall"]["median_s"], 2)
    unpack = result["unpack_only"]["median_s"]
    result["compile_s"] = {way: round(result[way]["median_s"] - unpack, 1) for way in WAYS[:2]}
    result["machine"] = {
        "cpu": host_facts()["cpu"],  # the model name where /proc/cpuinfo has one
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/torch_bytecode.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.repeats)
    if result["pip_compiles"]["pyc_files"] != result["compileall"]["pyc_files"]:
        raise SystemExit(f"the two ways compiled different sources: {result}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

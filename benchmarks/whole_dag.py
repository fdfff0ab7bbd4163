"""The whole DAG at real size: every stage's wall time and peak memory, beside what the plan predicted.

    python benchmarks/whole_dag.py --profile profiles/3b-cpu.yaml --workdir /tmp/dag3b \\
        -S model.source=full_size_random -S model.input=data/calibration --handful \\
        --out benchmarks/results/cpu-2026-11-27/whole_dag_3b.json

A fresh copy of this checkout (tracked and untracked-not-ignored files, as a clone has them) in
``--workdir``; the profile and ``-S`` overrides applied with ``scripts/apply_profile.py``;
``--handful`` keeps every op fp32 but five (``HANDFUL``: a vision block's and a decoder layer's
down / o projections, the merger's last Linear, the last layer's down_proj and ``lm_head``), by
one ``sensitivity.op_name_dict`` regex. Then the plan (``scripts/check_params.py``, kept
verbatim in the result) and ``dvc repro --single-item <stage>`` for each stage in the order DVC
runs them, each under a small wrapper that reads the kernel's peak resident set of the stage's
process tree (``getrusage(RUSAGE_CHILDREN)``: the largest process DVC started, the stage's
Python). Wall seconds include DVC's own work (hashing deps, caching outputs: 7.5 GB for the
random 3B's weights) and the interpreter start. ``--until STAGE`` stops after that stage. The
result is written after every stage, so a run cut short keeps what it measured; beside the times
it keeps what the run concluded (``outcome``: the metrics, screening blocks and stability verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HANDFUL = (
    "model.visual.blocks.0.mlp.down_proj",
    "model.visual.merger.mlp.2",
    "model.language_model.layers.0.self_attn.o_proj",
    "model.language_model.layers.35.mlp.down_proj",
    "lm_head",
)
# keep every op fp32 but these: one regex, matched as the engines match op_name_dict keys
# (module path, or INC's "<path>.module")
HANDFUL_KEY = "(?!(?:" + "|".join(re.escape(m) for m in HANDFUL) + r")(?:\.module)?$).*"
FP32 = {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}
MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter(); code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(json.dumps({'code': code, 'seconds': time.perf_counter() - t,\n"
    "  'peak_rss_gib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))\n"
)


def sh(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    """Run with this interpreter's environment first on PATH (``dvc``, and ``python`` in stage cmds)
    and the copy's own library first on the import path: the code DVC hashes is the code that runs,
    whatever happens to the checkout meanwhile."""
    return subprocess.run(cmd, cwd=cwd, check=True, text=True, env=environment(cwd), **kw)


def environment(cwd: Path) -> dict[str, str]:
    """This environment with this interpreter's folder first on PATH and ``cwd/src`` first on the
    import path (after it, any PYTHONPATH already set: packages carried to a machine, say)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    pythonpath = os.pathsep.join(p for p in (str(cwd / "src"), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PATH=path, PYTHONPATH=pythonpath)


def is_git_checkout() -> bool:
    return shutil.which("git") is not None and (REPO / ".git").exists()


def checkout_files() -> list[str]:
    """What a clone has: git's tracked and untracked-not-ignored files; without git (a copy of the
    working tree, as the GPU machine gets it) every file but the carried wheels and caches."""
    if is_git_checkout():
        files = sh(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO, capture_output=True
        )
        return files.stdout.split()
    skip = {".whl", ".git", "__pycache__", ".venv"}
    rels = (p.relative_to(REPO) for p in REPO.rglob("*") if p.is_file())
    return [
        str(r)
        for r in rels
        if not skip & set(r.parts) and r.parts[:2] not in {(".dvc", "cache"), (".dvc", "tmp")}
    ]


def copy_checkout(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=False)
    for rel in checkout_files():
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    (dest / "dvc.lock").unlink(missing_ok=True)  # a run from scratch
    if shutil.which("git") is None:  # DVC without an SCM: the same stages, no git needed
        config = dest / ".dvc/config"
        config.write_text(config.read_text().replace("[core]\n", "[core]\n    no_scm = true\n", 1))
        return
    sh(["git", "init", "-q"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "-c", "user.name=bench", "-c", "user.email=bench@local", "commit", "-qm", "copy"], dest)


def source_commit() -> tuple[str, bool | None]:
    """The checkout's commit and whether it is clean; ``OP_SENSITIVITY_COMMIT`` where set (a copy of the
    working tree whose ``.git``, if any, is not its own: the GPU machine's), clean then unknown (None)."""
    if "OP_SENSITIVITY_COMMIT" in os.environ or not is_git_checkout():
        return os.environ.get("OP_SENSITIVITY_COMMIT", "unknown"), None
    commit = sh(["git", "rev-parse", "HEAD"], REPO, capture_output=True).stdout.strip()
    return commit, not sh(["git", "status", "--porcelain"], REPO, capture_output=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("-S", "--set", action="append", default=[])
    ap.add_argument("--handful", action="store_true", help="score only HANDFUL (op_name_dict)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--until", help="stop after this stage (the DAG's first stages only)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="go on in an existing --workdir after the stages --out already holds (a run cut short)",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        help="seconds from the start: the stage running then is killed and recorded as cut short",
    )
    args = ap.parse_args()
    commit, clean = source_commit()
    overrides = list(args.set)
    if args.handful:
        overrides.append(f"sensitivity.op_name_dict={json.dumps({HANDFUL_KEY: FP32})}")
    previous = json.loads(args.out.read_text()) if args.resume else None
    if previous is None:
        copy_checkout(args.workdir)
        sh(
            [
                sys.executable,
                "scripts/apply_profile.py",
                str(REPO / args.profile),
                *sum((["-S", o] for o in overrides), []),
            ],
            args.workdir,
        )
        start = time.perf_counter()
        plan = sh([sys.executable, "scripts/check_params.py"], args.workdir, capture_output=True).stdout
        plan_seconds = time.perf_counter() - start
    else:  # the plan of the run this one continues (a new plan would list only the stages left)
        plan, plan_seconds = previous["plan"], previous["plan_seconds"]
    print(plan, flush=True)
    stages = [
        line.split()[0] for line in plan.splitlines() if re.match(r"^(\w+(?:@\w+)?)\s+(cpu|cuda|-)\s", line)
    ]
    if args.until is not None:
        if args.until not in stages:
            raise SystemExit(f"--until {args.until}: not a stage of this plan ({', '.join(stages)})")
        stages = stages[: stages.index(args.until) + 1]
    earlier = (previous or {}).get("stages", []) + (previous or {}).get("cut_short", [])
    rows = [r for r in earlier if r["stage"] in stages and r["code"] == 0]
    cut_short = [r for r in earlier if r["code"] != 0]  # each resumed later: its seconds are not in a row
    deadline = None if args.deadline is None else time.monotonic() + args.deadline
    for stage in stages[len(rows) :]:
        row = measure(stage, args.workdir, deadline)
        (rows if row["code"] == 0 else cut_short).append(row)
        # written after every stage: a run cut short keeps what it measured
        write(args, overrides, plan, plan_seconds, rows, cut_short, commit, clean)
        if row["code"] != 0:
            raise SystemExit(f"stage {stage}: {row.get('killed') or 'failed'} (log: {args.workdir}/logs/)")
        print(f"{stage}: {row['seconds']:.1f} s, peak {row['peak_rss_gib']:.2f} GiB", flush=True)


def measure(stage: str, workdir: Path, deadline: float | None) -> dict:
    """One ``dvc repro --single-item`` in its own process group; past ``deadline`` the group is killed
    (DVC, the stage and its workers) and the row says so, so ``--resume`` can go on from there."""
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=environment(workdir),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=None if deadline is None else max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        seconds = time.perf_counter() - start
        print(f"{stage}: killed at the deadline after {seconds:.1f} s", flush=True)
        return {"stage": stage, "code": -9, "seconds": seconds, "killed": "deadline"}
    lines = out.strip().splitlines()
    row = (
        {"stage": stage, **json.loads(lines[-1])}
        if proc.returncode == 0 and lines
        else {"stage": stage, "code": proc.returncode or 1, "seconds": time.perf_counter() - start}
    )
    if row["code"] != 0:  # DVC's and the stage's own words
        print(out, err, sep="\n", file=sys.stderr, flush=True)
    return row


def outcome(reports: Path) -> dict:
    """What the run concluded, kept beside its times so that a doc's figures have a raw source: every
    DVC metrics file, each pass's screening block (audit Spearman, recall, escape chance) and the
    stability verdict without its per-op rows. Files a cut-short run did not reach are absent."""

    def read(path: Path):
        return json.loads(path.read_text())

    doc: dict = {"metrics": {}, "screening": {}, "stability": None}
    for path in (
        sorted(reports.rglob("*metrics*.json"))
        + sorted(reports.glob("deploy/*.json"))
        + sorted(reports.glob("sensitivity/agreement.json"))
    ):
        doc["metrics"][str(path.relative_to(reports))] = read(path)
    for path in sorted(reports.rglob("op_sensitivity.json")):
        doc["screening"][str(path.relative_to(reports))] = read(path)["metadata"].get("screening")
    if (reports / "rank/stability.json").is_file():
        doc["stability"] = {k: v for k, v in read(reports / "rank/stability.json").items() if k != "phases"}
    return doc


def write(
    args,
    overrides: list[str],
    plan: str,
    plan_seconds: float,
    rows: list,
    cut_short: list,
    commit: str,
    clean: bool,
):
    """The result so far: the plan, the stages measured, the host and each stage's runtime file."""
    from op_sensitivity.engines.runner import host_facts

    doc = {
        "profile": str(args.profile),
        "overrides": overrides,
        "handful": list(HANDFUL) if args.handful else None,
        "plan": plan,
        "until": args.until,
        "plan_seconds": round(plan_seconds, 1),
        "stages": rows,
        "cut_short": cut_short,
        "total_seconds": round(sum(r["seconds"] for r in rows), 1),  # the stages that finished
        "cut_short_seconds": round(sum(r["seconds"] for r in cut_short), 1),  # before each was resumed
        "host": host_facts(),
        "commit": commit,
        "checkout_clean": clean,
        "runtime": {
            p.name: json.loads(p.read_text())
            for p in sorted((args.workdir / "reports/runtime").rglob("*.json"))
        },
        "outcome": outcome(args.workdir / "reports"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"total {doc['total_seconds'] / 60:.1f} min -> {args.out}")


if __name__ == "__main__":
    main()

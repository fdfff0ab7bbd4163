"""After ``make repro`` on a fresh clone: is the committed run reproduced? (CI's last step)

    python scripts/check_reproduced.py

Compares the work tree with HEAD: ``dvc.lock`` and every git-tracked file under ``reports/`` and
``data/`` but the runtime files (seconds and host facts, which no stage hashes). Identical: exit
0. Different on the machine kind that wrote HEAD's run (``host.isa`` in HEAD's
``reports/runtime/sensitivity.json``: the CPU features that pick the int8 and float kernels):
exit 1, with the files that moved; that is a reproducibility bug (an unlocked package, a value
that depends on the time or the path). Different on another machine kind: exit 0 with a warning
naming both kinds and the cause it implies (docs/artifacts.md, "Reproducibility"):

* AVX512-VNNI on one side only: INC quantizes activations to 7 bits where the CPU lacks it
  (``reduce_range``, which the default ``engine: inc`` and ``reduce_range: auto`` follow), so
  every value of the run moves, not only the last bits;
* the same VNNI answer, other kernels (ATen's capability, AVX512 vs AVX2): the float kernels
  round differently, so the last float bits may differ.
"""

from __future__ import annotations

import json
import subprocess
import sys

from op_sensitivity.engines.runner import host_facts

WATCHED = ("dvc.lock", "reports", "data")
RUNTIME = "reports/runtime/"
WRITER = "reports/runtime/sensitivity.json"  # engines.runner.runtime_file: passes[0].host


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def moved() -> list[str]:
    """Git-tracked files that differ from HEAD, and new untracked ones, runtime files aside."""
    changed = git("diff", "--name-only", "HEAD", "--", *WATCHED).split()
    new = git("ls-files", "--others", "--exclude-standard", "--", *WATCHED).split()
    return sorted(p for p in {*changed, *new} if not p.startswith(RUNTIME))


def writer_kind() -> dict[str, str | None]:
    try:
        host = json.loads(git("show", f"HEAD:{WRITER}"))["passes"][0]["host"]
    except (subprocess.CalledProcessError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"{WRITER} at HEAD: no host facts of the run that wrote dvc.lock ({e})") from e
    return {"cpu": host.get("cpu"), "isa": host.get("isa")}


def vnni(isa: str | None) -> bool:
    """What INC's ``reduce_range`` follows (engines.cpu_kind.cpu_has_avx512_vnni): 8-bit
    activations with AVX512-VNNI, 7-bit without."""
    return "avx512_vnni" in (isa or "").split()


def cause(writer: dict[str, str | None], here: dict[str, str | None]) -> str:
    """Why another machine kind's run differs, in the words a user can act on."""
    if vnni(writer["isa"]) != vnni(here["isa"]):
        bits = {True: "8-bit", False: "7-bit (reduce_range)"}
        return (
            f"INC quantizes activations {bits[vnni(writer['isa'])]} there and {bits[vnni(here['isa'])]} "
            "here (AVX512-VNNI on one side only): every value moves, not only the last float bits; "
            "compare runs made on one CPU kind"
        )
    return (
        "other float kernels (ATen's CPU capability) on the same int8 numerics: "
        "the last float bits may differ"
    )


def main() -> int:
    files = moved()
    if not files:
        print("reproduced: dvc.lock and every tracked artifact are byte-identical to HEAD")
        return 0
    writer, here = writer_kind(), host_facts()
    kind = {"cpu": here["cpu"], "isa": here["isa"]}
    print(f"differ from HEAD ({len(files)}): " + ", ".join(files[:20]))
    if kind == writer:
        print(f"NOT reproduced on the machine kind that wrote HEAD's run ({writer}): see the diff above")
        return 1
    print(f"warning: HEAD's run was written on {writer}, this machine is {kind}: {cause(writer, kind)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

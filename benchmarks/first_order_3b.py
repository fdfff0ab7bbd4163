"""The first-order estimate at full 3B size (random weights): its cost and memory on one confidence
batch, and its agreement with the exact pass on a seeded sample of ops.

    python benchmarks/first_order_3b.py --out benchmarks/results/first_order_3b.json
    python benchmarks/first_order_3b.py --model default --out /tmp/fo_default.json   # a quick check

``--model 3b`` (default): the published Qwen2.5-VL-3B architecture with seeded random bf16 weights
(``model.source: full_size_random``, ``full_size: 3b``, 417 ops), built once by
``model.source.materialize_model`` (what the load_model stage calls) into ``--work`` (reused when
present), in a child process so this one's peak is the pass's. Params: ``profiles/3b-cpu.yaml``
applied to a copy of params.yaml (native, cpu, float32, default arithmetic: int8 kernels, batch
size 1), with ``screening: none`` for the pass loop and one confidence batch; calibration records:
the repo's ``data/calibration`` (thumbnails of at most 112 px). ``--model default`` / ``mid``: the
test fixtures' tiny models (``first_order_agreement.build_model``), to debug the script in seconds.

On one ``engines.native._PassLoop`` (the pass's own calibration, trials and caches), one batch:

1. calibration (the observers' forward, which is also the float32 reference), timed;
2. ``first_order.estimate_batch`` (``--points``, ``--probes``): seconds, forwards, backwards, RSS;
3. ``first_order.peer_scores`` (ModelOpt AutoQuantize, AutoRound AutoScheme), timed;
4. the exact values of ``--sample`` ops drawn with ``--seed``, with the loop's own ``fallback``
   (from the all-int8 base) and ``requant`` (INC's cumulative curve at ``c_{k-1}`` and ``c_k`` of
   each sampled op: the increment is what ranks), each trial timed;
5. on the sample, per phase: the Spearman of each estimator against the exact score and the first-
   order estimate's mean absolute error relative to the spread of the exact values;
6. cost: the estimate's seconds against the exact pass's, extrapolated from the sampled trials
   (mean trial seconds x 2 phases x ops), and the plan's estimate of both (``op_sensitivity.plan``).

Memory: the library as it runs in the pipeline, no hooks. A guard thread samples RSS every 0.1 s
(each step's peak) and stops the process, writing what it measured, above ``--rss-limit-gib`` (if set) or
below ``--min-available-gib`` of available memory.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from op_sensitivity.engines.distributed import ONE_PROCESS  # noqa: E402
from op_sensitivity.engines.first_order import estimate_batch, peer_scores  # noqa: E402
from op_sensitivity.engines.native import _PassLoop  # noqa: E402
from op_sensitivity.engines.numerics import resolve_numerics  # noqa: E402
from op_sensitivity.engines.runner import host_facts, load_inputs  # noqa: E402
from op_sensitivity.params import load_params  # noqa: E402
from op_sensitivity.phases import FALLBACK, PHASES, REQUANT  # noqa: E402

PROFILE = REPO / "profiles/3b-cpu.yaml"
CALIBRATION = REPO / "data/calibration"
ESTIMATORS = ("first_order", "modelopt", "autoround")


# -- memory ----------------------------------------------------------------------------------------


def _status_gib(field: str, path: str = "/proc/self/status") -> float | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        return None
    return None


def rss_now() -> dict[str, float | None]:
    """Resident now, the kernel's peak since the pass loop reset it (VmHWM), and getrusage's peak."""
    return {
        "rss_gib": _round(_status_gib("VmRSS")),
        "vm_hwm_gib": _round(_status_gib("VmHWM")),
        "ru_maxrss_gib": _round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
    }


def _round(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)


class Guard:
    """Samples this process's RSS (and the machine's available memory) every 0.1 s: the peak of each
    step, and a stop (``on_trip``, then exit 3) above ``limit`` GiB or below ``floor`` available."""

    def __init__(self, limit: float | None, floor: float, on_trip):
        self.limit, self.floor, self.on_trip = limit, floor, on_trip
        self.step = "start"
        self.peaks: dict[str, float] = {}
        self.load: list[float] = []
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def enter(self, step: str) -> None:
        self.step = step

    def _run(self) -> None:
        last_load = 0.0
        while not self._stop.wait(0.1):
            rss = _status_gib("VmRSS") or 0.0
            self.peaks[self.step] = max(self.peaks.get(self.step, 0.0), rss)
            avail = _status_gib("MemAvailable", "/proc/meminfo")
            now = time.perf_counter()
            if now - last_load > 10:
                self.load.append(os.getloadavg()[0])
                last_load = now
            over = self.limit is not None and rss > self.limit
            if over or (avail is not None and avail < self.floor):
                why = f"RSS {rss:.2f} GiB (limit {self.limit})" if over else None
                why = why or f"available memory {avail:.2f} GiB (floor {self.floor})"
                self.on_trip({"step": self.step, "why": why, "rss_gib": round(rss, 3), "peaks": self.peaks})
                os._exit(3)

    def stop(self) -> None:
        self._stop.set()

    def doc(self) -> dict[str, Any]:
        return {
            "sampled_peak_gib_by_step": {k: round(v, 3) for k, v in self.peaks.items()},
            "load_average_1min_samples": {
                "n": len(self.load),
                "min": min(self.load, default=None),
                "max": max(self.load, default=None),
                "mean": round(sum(self.load) / len(self.load), 2) if self.load else None,
            },
        }


# -- the model and params --------------------------------------------------------------------------


def profile_params(work: Path, batches: int):
    """params.yaml with the 3B CPU profile applied (a copy; the repo's file is untouched), the random
    3B in place of a snapshot, the pass loop exact (``screening: none``), ``batches`` batches."""
    from op_sensitivity.plan.profile import apply, read_profile

    work.mkdir(parents=True, exist_ok=True)
    path = work / "params.yaml"
    shutil.copyfile(REPO / "params.yaml", path)
    values = read_profile(PROFILE)
    values |= {
        "model.source": "full_size_random",
        "model.input": str(CALIBRATION),
        "sensitivity.confidence_batches": batches,
        "sensitivity.native.screening": "none",
        "sensitivity.native.exact_budget": None,  # the profile's cap is for a screened pass
    }
    apply(path, values)
    return load_params(path)


def build_3b(params, work: Path) -> tuple[Path, Path, float | None]:
    """The random 3B's model dir and inventory, built in a child process unless already there."""
    model_dir, inv = work / "model", work / "op_inventory.json"
    if (
        (model_dir / "config.json").is_file()
        and (model_dir / "op_sensitivity_model.json").is_file()
        and inv.is_file()
    ):
        return model_dir, inv, None
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build-into", str(work)], check=True, cwd=REPO)
    return model_dir, inv, round(time.perf_counter() - start, 1)


def _build_child(work: Path) -> None:
    """What stages/load_model.py does: materialize_model, then the inventory with the fused groups."""
    from op_sensitivity.inventory import op_inventory, write_inventory
    from op_sensitivity.model.fused import fused_groups, probe_batch
    from op_sensitivity.model.source import materialize_model

    params = profile_params(work, 1)
    model, processor, card = materialize_model(params.model, work / "model")
    groups = fused_groups(model, probe_batch(processor))
    write_inventory(op_inventory(model, groups), card.model_type, work / "op_inventory.json")
    print(f"built {card.params:,} parameters -> {work / 'model'}", flush=True)


def small_inputs(name: str, work: Path) -> tuple[Any, Path, Path, Path]:
    """A test fixture's tiny model (``first_order_agreement``), its calibration and params."""
    import first_order_agreement as agree

    repo_params = load_params(REPO / "params.yaml")
    cal = agree.calibration(repo_params, work, 1)
    model_dir = agree.build_model(name, repo_params, cal, work)
    return agree.pass_params(1), cal, model_dir, model_dir.parent / "op_inventory.json"


# -- the measurements ------------------------------------------------------------------------------


def open_loop(sens, cal: Path, model_dir: Path, inv: Path):
    start = time.perf_counter()
    model, spec, _, meta = load_inputs(sens, cal, model_dir, inv)
    loaded = time.perf_counter() - start
    loop = _PassLoop(model, spec, resolve_numerics(sens), None, None, ONE_PROCESS)
    return loop, loaded, meta


def inputs(args) -> tuple[Any, Path, Path, Path, float | None]:
    """Sensitivity params, calibration dir, model dir, inventory, and the build's seconds (None:
    the 3B was already in ``--work``)."""
    work = Path(args.work)
    if args.model == "3b":
        params = profile_params(work, 1)
        model_dir, inv, built = build_3b(params, work)
        return params.sensitivity, CALIBRATION, model_dir, inv, built
    return (*small_inputs(args.model, work), None)


def sample_ops(n: int, k: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def measure(loop, args, guard: Guard, doc: dict[str, Any], save) -> dict[str, Any]:
    """Steps 1-4 on the loop's first confidence batch; ``doc['steps']`` filled as each ends."""
    steps = doc["steps"]
    batch = loop.num.batch(loop.spec.batches[0])
    forward = functools.partial(loop.forward, batch)
    scored = loop.scored

    guard.enter("calibration")
    with torch.no_grad():
        ref = loop.calibrate(0, batch)
    steps["calibration"] = {"seconds": round(loop.calibration_seconds[-1], 2), **rss_now()}
    save()

    guard.enter("estimate")
    est = estimate_batch(loop.fq, forward, ref, scored, args.points, args.probes, 0)
    steps["estimate"] = {
        "seconds": round(est.seconds, 2),
        "forwards": est.forwards,
        "backwards": est.backwards,
        "points": est.points,
        "curve": est.curve,
        "residual": est.residual,
        **rss_now(),
    }
    save()

    guard.enter("peers")
    start = time.perf_counter()
    peers = peer_scores(loop.fq, forward, batch, scored)
    steps["peers"] = {
        "seconds": round(time.perf_counter() - start, 2),
        "forwards": 2,
        "backwards": 2,
        "autoround_unscored": sum(v is None for v in peers["autoround"]),
        **rss_now(),
    }
    save()

    # the exact trials: the all-int8 base (its outputs stored), then the sampled fallback trials
    guard.enter("exact")
    picked = sample_ops(len(scored), args.sample, args.seed)
    names = [scored[i] for i in picked]
    with torch.no_grad():
        loop.keep_outputs(True)
        loop.fq.set_all(True)
        start = time.perf_counter()
        all_int8 = loop.trial(("all_int8", 0, ""), batch, ref)
        all_int8_s = time.perf_counter() - start
        start = time.perf_counter()
        fb = dict(zip(names, loop.fallback(0, batch, ref, names, None), strict=True))
        fb_s = time.perf_counter() - start
        # the cumulative curve at c_{k-1} and c_k of each sampled op (c_{-1} = 0: the float model)
        at = sorted({j for i in picked for j in (i - 1, i) if j >= 0})
        start = time.perf_counter()
        curve = dict(zip(at, loop.requant(0, batch, ref, [scored[j] for j in at], None), strict=True))
        rq_s = time.perf_counter() - start
    times = loop.trial_seconds
    rows = []
    for i, name in zip(picked, names, strict=True):
        rows.append(
            {
                "index": i,
                "op": name,
                "type": loop.op_types[name],
                "exact": {FALLBACK: fb[name], REQUANT: curve[i] - (curve[i - 1] if i else 0.0)},
                "exact_curve": {"c_k": curve[i], "c_k_minus_1": curve[i - 1] if i else 0.0},
                "first_order": {
                    FALLBACK: est.fallback[i],
                    REQUANT: est.requant[i] - (est.requant[i - 1] if i else 0.0),
                },
                "modelopt": peers["modelopt"][i],
                "autoround": peers["autoround"][i],
                "trial_seconds": {
                    FALLBACK: round(times[FALLBACK][name], 3),
                    REQUANT: round(times[REQUANT][name], 3),
                    "requant_c_k_minus_1": round(times[REQUANT][scored[i - 1]], 3) if i else None,
                },
            }
        )
    steps["exact"] = {
        "sample": args.sample,
        "seed": args.seed,
        "all_int8": all_int8,
        "all_int8_seconds": round(all_int8_s, 2),
        "estimate_all_int8_point": est.curve[-1],
        "fallback_seconds": round(fb_s, 2),
        "requant_seconds": round(rq_s, 2),
        "requant_trials": len(at),
        "fallback_trials_batched": loop.batched,
        **rss_now(),
    }
    save()
    return {"ops": rows, "n_ops": len(scored)}


# -- the comparison --------------------------------------------------------------------------------


def spearman(a: list[float | None], b: list[float]) -> float | None:
    keep = [i for i, v in enumerate(a) if v is not None]
    rho = pd.Series([a[i] for i in keep]).corr(pd.Series([b[i] for i in keep]), method="spearman")
    return None if pd.isna(rho) else round(float(rho), 4)


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: each estimator's Spearman against the exact score (fallback ``-value``, requant
    the increment; a peer's one score against both), and the estimate's error against the spread."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        sign = -1.0 if phase == FALLBACK else 1.0
        exact = [r["exact"][phase] for r in rows]
        truth = [sign * v for v in exact]
        est = [r["first_order"][phase] for r in rows]
        rho = {"first_order": spearman([sign * v for v in est], truth)}
        for peer in ("modelopt", "autoround"):
            rho[peer] = spearman([r[peer] for r in rows], truth)
        err = [abs(e - x) for e, x in zip(est, exact, strict=True)]
        spread = float(pd.Series(exact).std()) if len(exact) > 1 else 0.0
        span = max(exact) - min(exact)
        mae = sum(err) / len(err)
        out[phase] = {
            "spearman": rho,
            "compared": "values L(all int8 but op)" if phase == FALLBACK else "increments c_k - c_{k-1}",
            "first_order_mae": mae,
            "exact_std": spread,
            "exact_range": span,
            "exact_mean": sum(exact) / len(exact),
            "mae_over_std": round(mae / spread, 4) if spread else None,
            "mae_over_range": round(mae / span, 4) if span else None,
            "max_abs_error": max(err),
        }
    return out


def cost(doc: dict[str, Any], rows: list[dict[str, Any]], n_ops: int) -> dict[str, Any]:
    """The estimate's seconds against the exact pass's, extrapolated from the sampled trials: the mean
    seconds of the representative trials (every fallback trial; each c_k, measured right after its
    c_{k-1} as in the full curve) x 2 phases x ops."""
    s = doc["steps"]
    fb = [r["trial_seconds"][FALLBACK] for r in rows]
    rq = [r["trial_seconds"][REQUANT] for r in rows]
    mean_trial = (sum(fb) + sum(rq)) / (len(fb) + len(rq))
    calib = s["calibration"]["seconds"]
    exact = mean_trial * 2 * n_ops
    per_phase = (sum(fb) / len(fb) + sum(rq) / len(rq)) * n_ops
    estimate = s["estimate"]["seconds"]
    return {
        "mean_trial_seconds": round(mean_trial, 3),
        "mean_trial_seconds_by_phase": {
            FALLBACK: round(sum(fb) / len(fb), 3),
            REQUANT: round(sum(rq) / len(rq), 3),
        },
        "trials_timed": len(fb) + len(rq),
        "exact_pass_extrapolated_s": round(exact, 1),
        "exact_pass_extrapolated_by_phase_s": round(per_phase, 1),
        "exact_pass_extrapolated_with_calibration_and_all_int8_s": round(
            exact + calib + s["exact"]["all_int8_seconds"], 1
        ),
        "how": f"mean of {len(fb) + len(rq)} measured trial seconds x 2 phases x {n_ops} ops (extrapolated)",
        "estimate_s": estimate,
        "estimate_with_calibration_s": round(estimate + calib, 2),
        "peers_s": s["peers"]["seconds"],
        "estimate_over_exact": round(estimate / exact, 4),
        "estimate_with_calibration_over_exact_with_calibration": round(
            (estimate + calib) / (exact + calib + s["exact"]["all_int8_seconds"]), 4
        ),
    }


def plan_estimate(args, model_dir: Path) -> dict[str, Any]:
    """What ``op_sensitivity.plan`` predicts for one batch of this pass (its forward probe on this
    machine): the first_order pass without and with the exact trials it assumes, and the exact pass."""
    from op_sensitivity.plan.model import describe
    from op_sensitivity.plan.stages import Planner, this_machine

    params = profile_params(Path(args.work), 1)
    n = params.sensitivity.native
    sens = replace(params.sensitivity, native=replace(n, screening="first_order"))
    start = time.perf_counter()
    planner = Planner(params, describe(params.model, model_dir), this_machine())
    scored = planner.scored(sens)
    model = planner.cost_model(sens)
    if model is None:
        return {"error": "no cost model"}
    assumed = min(3 * (n.audit + 3 * n.exact_top), 2 * len(scored))
    fo = model.first_order_seconds(scored, n.suffix_reuse, 1, args.points, args.probes, 0)
    fo_exact = model.first_order_seconds(scored, n.suffix_reuse, 1, args.points, args.probes, assumed)
    costs = planner.costs[next(iter(planner.costs))]
    return {
        "first_order_batch_s": round(fo, 1),
        "first_order_batch_with_assumed_exact_trials_s": round(fo_exact, 1),
        "assumed_exact_trials": assumed,
        "exact_batch_s": round(model.pass_seconds(scored, n.suffix_reuse, True, 1), 1),
        "includes": "calibration, float32 reference, all-int8 forward; a backward taken as 2 fp32 forwards",
        "probe_image_tokens": costs.image_tokens,
        "probe_text_tokens": costs.text_tokens,
        "probe_seconds": round(time.perf_counter() - start, 1),
    }


# -- the output ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import transformers

    return {
        **host_facts(),
        "memory_gib": round((_status_gib("MemTotal", "/proc/meminfo") or 0.0), 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def summary(doc: dict[str, Any]) -> str:
    s, c, a = doc["steps"], doc.get("cost", {}), doc.get("agreement", {})
    lines = [f"model {doc['model']}: {doc.get('n_ops')} ops"]
    for k, v in s.items():
        lines.append(f"  {k}: " + ", ".join(f"{x}={y}" for x, y in v.items() if not isinstance(y, list)))
    for phase, row in a.items():
        lines.append(
            f"  {phase}: rho {row['spearman']}, mae/std {row['mae_over_std']}, "
            f"mae/range {row['mae_over_range']}"
        )
    if c:
        lines.append(f"  cost: {json.dumps(c)}")
    if doc.get("plan"):
        lines.append(f"  plan: {json.dumps(doc['plan'])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="3b", choices=("3b", "default", "mid"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/first_order_3b.json")
    ap.add_argument("--work", default="/tmp/fo3b", help="the 3B's model dir (reused when present)")
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--sample", type=int, default=12, help="ops measured exactly (K)")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--rss-limit-gib",
        type=float,
        default=None,
        help="stop above this RSS (default: no limit; --min-available-gib guards the machine, and about "
        "7 GiB of the 3B's RSS is its bf16 weights mapped from disk, which the kernel can drop)",
    )
    ap.add_argument("--min-available-gib", type=float, default=1.0)
    ap.add_argument("--no-plan", action="store_true", help="skip the plan's estimate")
    ap.add_argument("--build-into", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.chdir(REPO)  # params.yaml's relative paths
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.build_into:
        _build_child(Path(args.build_into))
        return
    work = Path(args.work) if args.model == "3b" else Path(tempfile.mkdtemp(prefix="fo3b_small_"))
    args.work = str(work)
    started = time.perf_counter()
    doc: dict[str, Any] = {
        "model": args.model,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/first_order_3b.py", *sys.argv[1:]]),
        "machine": machine(),
        "load_average_start": os.getloadavg(),
        "settings": {
            "profile": str(PROFILE.relative_to(REPO)) if args.model == "3b" else "tests' sensitivity_params",
            "confidence_batches": 1,
            "batch_size": 1,
            "points": args.points,
            "probes": args.probes,
            "sample": args.sample,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        },
        "steps": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")

    sens, cal, model_dir, inv, built = inputs(args)
    doc["model_dir"] = {"path": str(model_dir), "built_seconds": built}

    def trip(info):
        doc["aborted"] = info
        save()

    loop, loaded, meta = open_loop(sens, cal, model_dir, inv)
    doc["model_card"] = {k: meta["model"][k] for k in ("source", "params", "sha256") if k in meta["model"]}
    doc["steps"]["load"] = {"seconds": round(loaded, 1), **rss_now()}
    guard = Guard(args.rss_limit_gib, args.min_available_gib, trip)
    try:
        result = measure(loop, args, guard, doc, save)
    finally:
        guard.stop()
        loop.close()
    doc["memory"] = guard.doc()
    doc["n_ops"] = result["n_ops"]
    doc["sample_ops"] = result["ops"]
    doc["agreement"] = compare(result["ops"])
    doc["cost"] = cost(doc, result["ops"], result["n_ops"])
    doc["peak_rss_gib"] = rss_now()
    save()
    del loop
    if not args.no_plan and args.model == "3b":
        doc["plan"] = plan_estimate(args, model_dir)
    doc["load_average_end"] = os.getloadavg()
    doc["wall_seconds"] = round(time.perf_counter() - started, 1)
    save()
    print(summary(doc))


if __name__ == "__main__":
    main()

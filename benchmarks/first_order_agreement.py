"""The first-order estimate (and ModelOpt's and AutoRound's gradient scores) against the exact pass.

    python benchmarks/first_order_agreement.py --out benchmarks/results/first_order_agreement.json
    python benchmarks/first_order_agreement.py --out benchmarks/results/first_order_agreement.json --markdown

Models, built here as the test fixtures build them (tests/conftest.py, seeded random weights):
``default`` (the embedded default's sizes), ``planted`` (the small test model with the outlier pair
of tests/validation/planted.py), ``massive`` (the default's sizes with massive activations planted,
tests/validation/massive.py: its measured ratios and where each ranking puts the planted ops land
in the output) and ``mid`` (conftest's mid-size model, stored bf16); and
``trained``, ``default`` trained briefly on the sample's captions (benchmarks/trained_tiny.py,
cached under the system temp dir; its loss before and after land in the output). Each model
gets an exact native pass (``screening: none``, lm_head scored, ``--batches`` confidence batches),
then on a fresh copy, per batch and on the same calibration: ``engines.first_order.estimate_batch``
(``--points``, ``--probes``) and ``peer_scores`` (ModelOpt AutoQuantize, AutoRound AutoScheme).

Scores (higher = more sensitive), from values averaged over batches as the report averages them,
and from each batch alone: fallback ``-mean value``; requant the increment of the mean cumulative
curve; a peer's one score per op, compared with both phases. Per estimator and phase: Spearman
against the exact score, top-10 recall (share of the exact top 10 in the estimator's top 10), and
whether the top-3 sets (what ``top_k`` k=3 keeps) are identical. Cost: forwards, backwards and
seconds (each batch's calibration forward included, as the exact pass's ``runtime`` counts it)
against the exact pass's seconds, the fastest of ``--repeats`` rounds (the values of every round
must agree: ``rounds_identical``), at ``--threads`` torch threads (1 by default: on shared cores
2 threads ran 10-25x slower and varied 5x). ``--markdown`` prints docs/benchmarks.md's table from
``--out``. ``--merge`` keeps the other models of an existing ``--out`` (same settings) and
replaces or adds those measured now, each with its own date and command.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the model builders are the test fixtures' own
from trained_tiny import SETTINGS as TRAINING  # noqa: E402 (this directory is on sys.path as a script)
from trained_tiny import trained_model, training_facts  # noqa: E402

from op_sensitivity.data.calibration import prepare_calibration  # noqa: E402
from op_sensitivity.engines.artifact import build_report  # noqa: E402
from op_sensitivity.engines.distributed import ONE_PROCESS  # noqa: E402
from op_sensitivity.engines.first_order import estimate_batch, peer_scores  # noqa: E402
from op_sensitivity.engines.native import _PassLoop, run_pass  # noqa: E402
from op_sensitivity.engines.numerics import resolve_numerics  # noqa: E402
from op_sensitivity.engines.runner import host_facts, load_inputs  # noqa: E402
from op_sensitivity.model.source import CARD, dir_sha256, load_model_dir  # noqa: E402
from op_sensitivity.params import load_params  # noqa: E402
from op_sensitivity.phases import FALLBACK, PHASES, REQUANT  # noqa: E402
from op_sensitivity.report.scores import phase_scores, select_phase  # noqa: E402
from tests.conftest import MID_TINY, _materialized  # noqa: E402
from tests.helpers import SAMPLE_ANNOTATIONS, SAMPLE_IMAGES, SMALL_TINY, sensitivity_params  # noqa: E402
from tests.validation.massive import MASSIVE, massive_copy  # noqa: E402
from tests.validation.planted import planted_copy  # noqa: E402

MODELS = ("default", "planted", "massive", "mid", "trained")
WEIGHTS = {
    "default": "seeded random",
    "planted": "planted outlier pair on seeded random",
    "massive": "planted massive activations on seeded random",
    "mid": "seeded random",
    "trained": f"trained {TRAINING['steps']} steps on the sample captions",
}
ESTIMATORS = ("first_order", "modelopt", "autoround")
PEERS = ("modelopt", "autoround")
TOP, KEEP = 10, 3  # the recall's top and top_k's k
MASSIVE_FACTS: dict[str, float] = {}  # the ratios the massive model was built with, measured


# -- the models ----------------------------------------------------------------------------------


def calibration(repo_params, work: Path, batches: int) -> Path:
    """The tests' calibration sample (COCO sample pairs), one pair per confidence batch at least."""
    out = work / "calibration"
    captions = replace(
        repo_params.captions,
        annotations=SAMPLE_ANNOTATIONS,
        images_dir=SAMPLE_IMAGES,
        count=max(4, batches),
    )
    prepare_calibration(captions, out, work / "selection", work / "test")
    return out


def build_model(name: str, repo_params, cal: Path, work: Path) -> Path:
    """One model dir with its inventory beside it, as tests/conftest.py's fixture of that size."""
    model = replace(repo_params.model, input=cal)
    tiny = repo_params.model.tiny
    if name == "default":
        return _materialized(work / "default" / "qwen2_5_vl", model)
    if name == "trained":  # the same start as default (same bytes, so the cache key matches)
        return trained_model(repo_params, _materialized(work / "trained_base" / "qwen2_5_vl", model))
    if name == "massive":  # the default's sizes (two decoder layers), massive channels planted
        src = _materialized(work / "massive_base" / "qwen2_5_vl", model)
        out, facts = massive_copy(src, src.parent / "op_inventory.json", work / "massive" / "qwen2_5_vl", cal)
        MASSIVE_FACTS.update(facts)
        return out
    if name == "planted":
        small = replace(model, tiny=replace(tiny, text=SMALL_TINY["text"], vision=SMALL_TINY["vision"]))
        src = _materialized(work / "small" / "qwen2_5_vl", small)
        return planted_copy(src, src.parent / "op_inventory.json", work / "planted" / "qwen2_5_vl")
    mid = replace(model, tiny=replace(tiny, text=MID_TINY["text"], vision=MID_TINY["vision"]))
    out = _materialized(work / "mid" / "qwen2_5_vl", mid)
    loaded, _, card = load_model_dir(out)  # stored bf16, as conftest's mid_model_dir
    loaded.to(torch.bfloat16).save_pretrained(out)
    (out / CARD).write_text(json.dumps(asdict(replace(card, sha256=dir_sha256(out)))))
    return out


def pass_params(batches: int):
    """Native, exact (no screening), every op scored (lm_head included), batch size 1."""
    base = sensitivity_params(confidence_batches=batches, max_ops=10_000)
    return replace(base, engine="native", native=replace(base.native, screening="none"))


# -- the measurements ----------------------------------------------------------------------------


def exact_pass(params, cal: Path, model_dir: Path) -> dict[str, Any]:
    """The exact values per batch (scored order) and the pass's cost; fails if this script's
    ranking of them is not ``report.scores``' (the estimators are ranked by the same function)."""
    inv_path = model_dir.parent / "op_inventory.json"
    model, spec, inventory, meta = load_inputs(params, cal, model_dir, inv_path)
    result = run_pass(model, spec)
    report = build_report(result, inventory, meta)
    scored = [name for name, _ in spec.scored]
    values = {}
    for phase in PHASES:
        rows = {o["op_name"]: o["mse_per_batch"] for o in report["phases"][phase]["ops"]}
        values[phase] = [[rows[o][b] for o in scored] for b in range(params.confidence_batches)]
    scores = phase_scores(report, inventory)
    for phase in PHASES:  # this script ranks as report.scores does
        mine = [scored[i] for i in ranking(phase_score(mean(values[phase]), phase))]
        if mine != list(select_phase(scores, phase)["op_name"]):
            raise SystemExit(f"{phase}: this script's exact ranking differs from report.scores'")
    batches = params.confidence_batches
    return {
        "scored": scored,
        "values": values,
        "seconds": sum(result.runtime["seconds"].values()),
        "calibration_s": sum(result.runtime["calibration_seconds"]),
        # per batch: the calibration forward, the all-int8 trial, a trial per op and phase (some
        # fallback trials share a forward: trials_batched)
        "forwards": batches * (2 + 2 * len(scored)),
        "trials_batched": result.runtime["trials_batched"],
    }


def estimated(params, cal: Path, model_dir: Path, points: int, probes: int) -> list[dict[str, Any]]:
    """Per batch: the first-order estimate and the peers' scores, on a fresh copy of the model
    calibrated as the exact pass calibrates it (same batch, same observers)."""
    model, spec, _, _ = load_inputs(params, cal, model_dir, model_dir.parent / "op_inventory.json")
    loop = _PassLoop(model, spec, resolve_numerics(params), None, None, ONE_PROCESS)
    out = []
    try:
        for b, raw in enumerate(spec.batches):
            with torch.no_grad():
                batch = loop.num.batch(raw)
                ref = loop.calibrate(b, batch)
                forward = functools.partial(loop.forward, batch)
                est = estimate_batch(loop.fq, forward, ref, loop.scored, points, probes, b)
            start = time.perf_counter()
            peers = peer_scores(loop.fq, forward, batch, loop.scored)
            peer_s = time.perf_counter() - start
            calib = loop.calibration_seconds[-1]
            paid = {"first_order": (est.forwards + 1, est.backwards, est.seconds), "peers": (3, 2, peer_s)}
            costs = {
                k: {"forwards": f, "backwards": bw, "seconds": sec + calib, "calibration_s": calib}
                for k, (f, bw, sec) in paid.items()
            }
            out.append({"fallback": est.fallback, "requant": est.requant, **peers, "cost": costs})
    finally:
        loop.close()
    return out


# -- the comparison ------------------------------------------------------------------------------


def mean(rows: list[list[float | None]]) -> list[float | None]:
    """Per op, the mean over batches (None where a batch has none)."""
    return [None if None in col else sum(col) / len(col) for col in zip(*rows, strict=True)]


def phase_score(values: list[float], phase: str) -> list[float]:
    """The ranking score of INC's values: -value (fallback), the curve's increment (requant)."""
    if phase == FALLBACK:
        return [-v for v in values]
    return [v - (values[i - 1] if i else 0.0) for i, v in enumerate(values)]


def ranking(scores: list[float | None]) -> list[int]:
    """Op indices, most sensitive first, ties by position (``report.scores``); None last."""
    return sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))


def agreement(est: list[float | None], exact: list[float]) -> dict[str, Any]:
    """Spearman over the ops the estimator scores, top-10 recall, identical top-3 set."""
    have = [i for i, v in enumerate(est) if v is not None]
    rho = pd.Series([est[i] for i in have]).corr(pd.Series([exact[i] for i in have]), method="spearman")
    mine, ref = ranking(est), ranking(exact)
    top = min(TOP, len(exact))
    return {
        "spearman": None if pd.isna(rho) else round(float(rho), 4),
        "top10_recall": len(set(mine[:top]) & set(ref[:top])) / top,
        "top3_identical": set(mine[:KEEP]) == set(ref[:KEEP]),
        "unscored": len(est) - len(have),
    }


def compare(exact: dict[str, Any], est: list[dict[str, Any]]) -> dict[str, Any]:
    """Per estimator and phase: agreement on the batch-mean values, and on each batch alone."""
    batches = len(est)
    views = {"mean": None, **{f"batch {b}": b for b in range(batches)}}
    out: dict[str, Any] = {k: {} for k in ESTIMATORS}
    for view, b in views.items():

        def pick(rows: list[list], b: int | None = b) -> list:
            return mean(rows) if b is None else rows[b]

        truth = {p: phase_score(pick(exact["values"][p]), p) for p in PHASES}
        for name in ESTIMATORS:
            for phase in PHASES:
                if name in PEERS:
                    score = pick([e[name] for e in est])
                else:
                    score = phase_score(pick([e[phase] for e in est]), phase)
                out[name].setdefault(phase, {})[view] = agreement(score, truth[phase])
    return out


def massive_ranks(exact: dict[str, Any], est: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ranking (exact, each estimator) and phase, on the batch-mean scores: the best 1-based
    rank of a planted massive op, that op, and the top 3."""
    names = exact["scored"]
    planted = [i for i, name in enumerate(names) if name in MASSIVE]
    out: dict[str, dict[str, Any]] = {}
    for name in ("exact", *ESTIMATORS):
        for phase in PHASES:
            if name == "exact":
                score = phase_score(mean(exact["values"][phase]), phase)
            elif name in PEERS:
                score = mean([e[name] for e in est])
            else:
                score = phase_score(mean([e[phase] for e in est]), phase)
            order = ranking(score)
            best = min(order.index(i) for i in planted)
            top = [names[i] for i in order[:KEEP]]
            out.setdefault(name, {})[phase] = {"rank": best + 1, "op": names[order[best]], "top3": top}
    return out


def cost(exact: dict[str, Any], est: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Forwards, backwards and seconds summed over batches (each batch's calibration forward
    included, as the exact pass's ``runtime`` counts it; ``calibration_s`` its share)."""
    out = {
        "exact": {
            "forwards": exact["forwards"],
            "backwards": 0,
            "seconds": exact["seconds"],
            "calibration_s": exact["calibration_s"],
            "trials_batched": exact["trials_batched"],
        }
    }
    for name in ("first_order", "peers"):
        out[name] = {k: sum(e["cost"][name][k] for e in est) for k in est[0]["cost"][name]}
    return out


def fastest(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per pass, its fastest round (others share the cores: the minimum is the least disturbed),
    and its seconds against the exact pass's."""
    out = {k: min((r[k] for r in rounds), key=lambda c: c["seconds"]) for k in rounds[0]}
    exact = out["exact"]["seconds"]
    out = {
        k: {**c, "seconds": round(c["seconds"], 3), "x_exact": round(c["seconds"] / exact, 4)}
        for k, c in out.items()
    }
    out["rounds_seconds"] = {k: [round(r[k]["seconds"], 3) for r in rounds] for k in rounds[0]}
    return out


def warm_up(repo_params, cal: Path, work: Path, args) -> None:
    """One discarded round on the small model: the process's first passes pay for lazy setup
    (kernels, autograd, quantized engines); on the tiny models that was 3-4x their seconds."""
    model_dir = build_model("planted", repo_params, cal, work / "warm_up")
    params = pass_params(1)
    exact_pass(params, cal, model_dir)
    estimated(params, cal, model_dir, args.points, args.probes)


def measure(name: str, repo_params, cal: Path, work: Path, args) -> dict[str, Any]:
    """One model: the exact pass and the estimates, ``--repeats`` rounds; their agreement and cost."""
    model_dir = build_model(name, repo_params, cal, work)
    params = pass_params(args.batches)
    start = time.perf_counter()
    rounds = []
    for _ in range(args.repeats):
        rounds.append(
            (exact_pass(params, cal, model_dir), estimated(params, cal, model_dir, args.points, args.probes))
        )
    exact, est = rounds[0]
    values = [(e["values"], [{k: v for k, v in b.items() if k != "cost"} for b in s]) for e, s in rounds]
    print(f"{name}: {len(exact['scored'])} ops, {time.perf_counter() - start:.1f} s", flush=True)
    out = {
        "ops": len(exact["scored"]),
        "weights": WEIGHTS[name],
        "rounds_identical": all(v == values[0] for v in values),
        "agreement": compare(exact, est),
        "cost": fastest([cost(e, s) for e, s in rounds]),
    }
    if name == "massive":
        out["massive"] = {"ops": sorted(MASSIVE), **MASSIVE_FACTS, "ranks": massive_ranks(exact, est)}
    if name == "trained":
        facts = training_facts(model_dir)
        out["training"] = {**facts, "curve_every_25": facts["curve"][::25] + facts["curve"][-1:]}
        del out["training"]["curve"]
    return out


# -- the output ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu": host_facts()["cpu"],  # the model name where /proc/cpuinfo has one
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def markdown(doc: dict[str, Any]) -> str:
    """docs/benchmarks.md's caption and table: the batch-mean agreement and the cost per estimator."""
    m, st = doc["machine"], doc["settings"]
    caption = (
        f"{m['cpu']} ({m['processor']}), {m['cpus']} cores, {m['torch_threads']} torch thread(s), "
        f"torch {m['torch']}; {doc['date']}; {st['batches']} confidence batches of {st['batch_size']}, "
        f"points {st['points']}, probes {st['probes']}, fastest of {st['repeats']} rounds. "
        f"Command: `{doc['command']}`."
    )
    lines = [
        caption,
        "",
        "| model (ops, weights) | estimator | fallback rho | fallback top-10 | requant rho | requant top-10 "
        "| top-3 same (fb / rq) | forwards + backwards | s (calibration) | x exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, doc_m in doc["models"].items():
        c = doc_m["cost"]
        ex = c["exact"]
        label = f"{model} ({doc_m['ops']}, {doc_m['weights']})"
        lines.append(
            f"| {label} | exact pass | | | | | | {ex['forwards']} + 0 "
            f"| {ex['seconds']:.2f} ({ex['calibration_s']:.2f}) | 1 |"
        )
        for name in ESTIMATORS:
            fb, rq = (doc_m["agreement"][name][p]["mean"] for p in (FALLBACK, REQUANT))
            k = c["first_order" if name == "first_order" else "peers"]
            paid = f"{k['forwards']} + {k['backwards']}" + ("" if name == "first_order" else " (both peers)")
            same = " / ".join("yes" if r["top3_identical"] else "no" for r in (fb, rq))
            lines.append(
                f"| | {name} | {_rho(fb)} | {fb['top10_recall']:.1f} | {_rho(rq)} | {rq['top10_recall']:.1f} "
                f"| {same} | {paid} | {k['seconds']:.2f} ({k['calibration_s']:.2f}) | {k['x_exact']:.2f} |"
            )
    return "\n".join(lines)


def _rho(row: dict[str, Any]) -> str:
    return "n/a" if row["spearman"] is None else f"{row['spearman']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/first_order_agreement.json")
    ap.add_argument("--batches", type=int, default=2, help="confidence batches (batch size 1)")
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="rounds per model; the fastest is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on shared cores)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--markdown", action="store_true", help="print the table of --out and stop")
    ap.add_argument("--merge", action="store_true", help="keep --out's other models (same settings)")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    repo_params = load_params(REPO / "params.yaml")
    doc = {
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/first_order_agreement.py", *sys.argv[1:]]),
        "settings": {
            "batches": args.batches,
            "batch_size": 1,
            "points": args.points,
            "probes": args.probes,
            "repeats": args.repeats,
        },
        "models": {},
    }
    names = args.models.split(",")
    if args.merge:
        old = json.loads(args.out.read_text())
        if old["settings"] != doc["settings"]:
            raise SystemExit(
                f"--merge: {args.out} was measured with {old['settings']}, not {doc['settings']}"
            )
        stamp = {"date": doc["date"], "command": doc["command"]}
        doc = {**old, "models": {k: v for k, v in old["models"].items() if k not in names}}
    with tempfile.TemporaryDirectory(prefix="first_order_agreement_") as tmp:
        work = Path(tmp)
        cal = calibration(repo_params, work, args.batches)
        warm_up(repo_params, cal, work, args)
        for name in names:
            doc["models"][name] = measure(name, repo_params, cal, work, args)
            if args.merge:
                doc["models"][name].update(stamp, machine=machine())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=2) + "\n")  # a run cut short keeps what it measured
    print(markdown(doc))


if __name__ == "__main__":
    main()

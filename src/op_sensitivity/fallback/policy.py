"""Turn a ranked spectrum into "keep these ops in high precision" with a named policy.

Policies (``fallback.policy`` picks one; each reads its own params block):

* ``top_k``: the ``k`` most sensitive ops.
* ``top_fraction``: the top ``ceil(fraction * N)`` ops.
* ``threshold``: ops with ``score > value`` (``relative: true`` -> ``score > value * max score``).
* ``error_budget``: the fewest top ops whose cumulative share (``scores.cumulative_share``) reaches
  ``percent`` % of the summed single-op scores. Single-op effects do not add up, so this is a
  heuristic; the measured policies below say what a list really gives back.
* ``measured_budget``: the fewest top ops of a ranking (``fallback``, ``requant``, ``measured`` or
  ``auto``) whose list, as shipped, leaves at most ``percent`` % of all-int8's damage by
  ``metric`` on the selection split. Each candidate is measured with ``always_keep``,
  ``never_keep`` and the widened fused groups in place (the stage passes a measure of the
  selection split): when the forced ops alone meet the budget, the ranking adds nothing. The
  shipped lists are measured from n = 0 up and the first that meets the budget is the answer,
  so it is the smallest such n whatever the curve's shape (recovery need not rise with n: the
  embedded default's fallback curve gives back 0.9604 at n = 11 and 0.9600 at n = 12, and a
  bisection there answered 26 where 23 was the first n meeting its target). n that ship the
  same list share one measurement. The cost is capped (:func:`walk_cost`, which the plan
  counts): past :data:`SCAN_MAX` lists without a hit, the walk measures the shipped lists at
  the curve's sizes whose pure list meets the budget, smallest first (at most
  :data:`CANDIDATE_MAX`), and the reason says its n is the smallest among those measured, and
  which were.
  ``auto`` walks the ranking whose curve (``validation.curve``, the pure top-n lists) reaches the
  budget with the fewest ops; a tie goes to the larger area under its recovery curve up to
  there, then to the order fallback, requant, measured. Without a measure (a notebook), the
  curve's own points are read, which hold no forced ops.
* ``bits_budget``: the ops whose measured single-op damage (the curve's ``single_op``: the share of
  all-int8's damage with only that op int8, on the calibration captions; past
  ``validation.curve.DENSE_MAX`` ops, the curve's pool of candidates) sums highest within a
  budget of effective weight bits (``bits``; a kept op at its stored dtype's bits, as
  ``inventory.cost`` counts them: 16 for a bf16 model) or of the share of weight params kept
  (``params_share``): a 0/1 knapsack, as ModelOpt's and AutoRound's mixed-precision search do.
  The forced ops (``always_keep`` and the groups they widen) are in place first: their params
  count against the budget and they are no item to buy.

Then ``always_keep`` adds and ``never_keep`` removes ops by glob on the module name (fnmatch,
e.g. ``lm_head``, ``model.visual.patch_embed.*``); ``never_keep`` wins. With ``fused_groups`` (the
default) a fused group (q/k/v, gate/up: ``inventory.OpInfo.fused_group``) is kept or quantized
whole, because vLLM, SGLang and TensorRT-LLM refuse a checkpoint that splits one. Every chosen op
carries the reason it was chosen. The params are checked by ``params.load_params``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any, NoReturn

import pandas as pd

from ..errors import InputError
from ..inventory import OpInfo, cost, weight_bits
from ..params import FallbackParams
from ..report.scores import cumulative_share
from ..validation.metrics import recovered

MEASURED_POLICIES = ("measured_budget", "bits_budget")  # read the ranking curve
KNAPSACK_UNITS = 2000  # budget resolution of the knapsack: 0.05 % of the budget
AUTO_ORDER = ("fallback", "requant", "measured")  # ranking: auto's last tie-break
SCAN_MAX = 64  # distinct shipped lists the walk measures from n = 0 up: exact while N + 1 <= this
CANDIDATE_MAX = 8  # past the scan: the curve's sizes meeting the budget, smallest first
# A keep-list (module names) -> its Values on the selection split (``validation.measure``)
Measure = Callable[[list[str]], dict[str, float]]


def _meets(share: float | None, target: float) -> bool:
    """A recovered share meets ``target`` (None: all-int8 did no damage, nothing to give back)."""
    return share is None or share >= target - 1e-12


def curve_n(curve: dict, ranking: str, metric: str, target: float) -> int | None:
    """The smallest n among the curve's points of ``ranking`` whose pure top-n list meets
    ``target`` (None if none does): the first point reaching it, never a bisection, as recovery
    need not rise with n. ``auto_ranking`` counts this n, and the walk finds the same one when
    its shipped lists are the pure ones (no forced ops) and measure as the curve did."""
    points = sorted((q for q in curve["points"] if q["ranking"] == ranking), key=lambda q: q["n"])
    return next((q["n"] for q in points if _meets(q["recovered"][metric], target)), None)


def auto_ranking(curve: dict, metric: str, target: float) -> tuple[str, str]:
    """``ranking: auto``: the ranking whose pure top-n curve reaches ``target`` (share of the
    all-int8 damage given back) with the fewest ops (:func:`curve_n`), then the larger mean
    recovered share up to there, then :data:`AUTO_ORDER`; and why, in words."""
    found = {}
    for ranking in curve["rankings"]:
        points = sorted((q for q in curve["points"] if q["ranking"] == ranking), key=lambda q: q["n"])
        hit = curve_n(curve, ranking, metric, target)
        n = math.inf if hit is None else hit
        upto = [q["recovered"][metric] for q in points if q["n"] <= n and q["recovered"][metric] is not None]
        area = sum(upto) / len(upto) if upto else 1.0
        found[ranking] = (n, -area, AUTO_ORDER.index(ranking) if ranking in AUTO_ORDER else len(AUTO_ORDER))
    best = min(found, key=found.get)
    counts = ", ".join(f"{r} {'none' if math.isinf(v[0]) else v[0]}" for r, v in found.items())
    return best, f"ranking auto: {best}, the fewest ops to reach it on the curve ({counts})"


def _ranking(p: FallbackParams, curve: dict) -> tuple[str, str]:
    s = p.settings
    if s["ranking"] != "auto":
        return s["ranking"], f"ranking {s['ranking']}"
    return auto_ranking(curve, s["metric"], 1 - s["percent"] / 100)


def walked_ranking(p: FallbackParams, curve: dict | None) -> str | None:
    """The ranking ``measured_budget`` walks (``auto`` resolved); None for the other policies."""
    if p.policy != "measured_budget" or curve is None:
        return None
    return _ranking(p, curve)[0]


def _measured_budget(p: FallbackParams, curve: dict) -> tuple[list[str], str]:
    """From the curve's own points: pure top-n lists, no forced ops (no measure given)."""
    s = p.settings
    target = 1 - s["percent"] / 100
    ranking, why = _ranking(p, curve)
    points = sorted((q for q in curve["points"] if q["ranking"] == ranking), key=lambda q: q["n"])
    for q in points:
        share = q["recovered"][s["metric"]]
        if _meets(share, target):
            left = "no" if share is None else f"{100 * (1 - share):.1f} %"
            return q["kept"], (
                f"measured_budget: the top {q['n']} ops of the {ranking} ranking ({why}) leave {left} of "
                f"all-int8's {s['metric']} damage on the selection split (<= {s['percent']:g} %; the "
                "curve's lists, without the forced ops)" + _resolution(curve, ranking, s["metric"], target)
            )
    raise InputError(f"{p.where('measured_budget.percent')}: no curve point reaches it")  # n = N always does


def walk_cost(n_ops: int) -> int:
    """Lists the shipped walk measures at most: every distinct shipped list from n = 0 to N while
    that is at most :data:`SCAN_MAX` lists; past that, :data:`SCAN_MAX` lists from n = 0 up, then
    at most :data:`CANDIDATE_MAX` of the curve's sizes (``plan.stages`` counts this)."""
    return n_ops + 1 if n_ops + 1 <= SCAN_MAX else SCAN_MAX + CANDIDATE_MAX


def _shipped_walk(
    p: FallbackParams, curve: dict, df: pd.DataFrame, groups: dict[str, str | None], measure: Measure
) -> tuple[list[str], str]:
    """The fewest top ops of the ranking whose list *as shipped* (forced ops, never_keep, widened
    groups: :func:`ship`) meets the budget, measured on the selection split: the shipped lists
    from n = 0 up, the first that meets it (see the module doc; no bisection, as recovery need
    not rise with n)."""
    s = p.settings
    metric, target = s["metric"], 1 - s["percent"] / 100
    ranking, why = _ranking(p, curve)
    order = curve["rankings"][ranking]
    op_name = dict(zip(df["module"], df["op_name"], strict=True))
    module = {v: k for k, v in op_name.items()}
    shares: dict[frozenset[str], float | None] = {}  # shipped list -> recovered share, measured once

    def shipped(n: int) -> frozenset[str]:
        return frozenset(module[o] for o in ship([op_name[m] for m in order[:n]], "", df, p, groups))

    def share(kept: frozenset[str]) -> float | None:
        if kept not in shares:
            shares[kept] = recovered(measure(sorted(kept)), curve["reference"]["all_int8"])[metric]
        return shares[kept]

    found, scanned = None, -1
    for n in range(len(order) + 1):
        kept = shipped(n)
        if kept not in shares and len(shares) >= SCAN_MAX:
            break
        scanned = n
        if _meets(share(kept), target):
            found = n
            break
    sizes: list[int] = []  # the curve's sizes measured past the scan
    if found is None and scanned < len(order):
        meeting = {q["n"] for q in curve["points"] if q["ranking"] == ranking and q["n"] > scanned}
        meeting = {n for n in meeting if _meets(_point_share(curve, ranking, n, metric), target)}
        for n in sorted(meeting | {len(order)})[:CANDIDATE_MAX]:
            sizes.append(n)
            if _meets(share(shipped(n)), target):
                found = n
                break
    if found is None:
        best = max((1.0 if r is None else r) for r in shares.values())
        where = f", then the curve's sizes {sizes}" if sizes else ""
        raise InputError(
            f"{p.where('measured_budget.percent')}: no shipped list measured meets it (n = 0 to {scanned}"
            f"{where}: {len(shares)} lists; the best leaves {100 * (1 - best):.1f} % of all-int8's {metric} "
            "damage on the selection split; never_keep may drop ops the budget needs); raise the "
            "percentage or shorten never_keep"
        )
    left = share(shipped(found))
    left_text = "no" if left is None else f"{100 * (1 - left):.1f} %"
    what = "nothing beyond the forced ops" if found == 0 else f"the top {found} ops of the {ranking} ranking"
    on_curve = curve_n(curve, ranking, metric, target)
    if sizes:
        skipped = found > scanned + 1
        gap = f"; n = {scanned + 1} to {found - 1} off those sizes not measured" if skipped else ""
        how = (
            f"the smallest n among those measured: n = 0 to {scanned} ({SCAN_MAX} lists, the walk's cap), "
            f"then the curve's sizes {', '.join(map(str, sizes))}, where its pure lists meet it{gap}"
        )
    else:
        how = f"n measured from 0 up, {found} the first meeting it"
    return [op_name[m] for m in order[:found]], (
        f"measured_budget: {what} ({why}); the list as shipped (always_keep, never_keep and fused groups in "
        f"place) leaves {left_text} of all-int8's {metric} damage on the selection split "
        f"(<= {s['percent']:g} %; {how}; {len(shares)} lists measured; the curve's pure lists: "
        f"{'none meets it' if on_curve is None else f'n = {on_curve}'})"
    )


def _point_share(curve: dict, ranking: str, n: int, metric: str) -> float | None:
    """The recovered share of the curve's pure top-n list of ``ranking``."""
    return next(q["recovered"][metric] for q in curve["points"] if q["ranking"] == ranking and q["n"] == n)


def _resolution(curve: dict, ranking: str, metric: str, share: float) -> str:
    """Where the curve measured every n, or bisected this very crossing, the n is exact; else say
    it is the first measured size reaching the share (``validation.curve``, ``curve.crossings``)."""
    if len(curve["sizes"]) == len(curve["ops"]) + 1:
        return ""
    bisected = any(
        t["ranking"] == ranking and t["metric"] == metric and abs(t["share"] - share) < 1e-9
        for t in curve["targets"]
    )
    if bisected:
        return "; bisected on the curve's log-spaced sizes"
    return (
        f"; the first measured size reaching it: add {share:g} to curve.crossings (with curve.metric "
        f"{metric}) for the exact n"
    )


def _items(modules: list[str], groups: dict[str, str | None]) -> dict[str, list[str]]:
    """Knapsack items: fused groups whole, other ops alone."""
    items: dict[str, list[str]] = {}
    for m in modules:
        items.setdefault(groups.get(m) or m, []).append(m)
    return items


def knapsack(values: list[float], weights: list[int], capacity: int) -> list[int]:
    """Indices of the items with the highest total value within ``capacity`` (0/1, dynamic programming)."""
    best = [0.0] * (capacity + 1)
    take = [[False] * (capacity + 1) for _ in values]
    for i, (v, w) in enumerate(zip(values, weights, strict=True)):
        for c in range(capacity, w - 1, -1):
            if best[c - w] + v > best[c]:
                best[c], take[i][c] = best[c - w] + v, True
    chosen, c = [], capacity
    for i in range(len(values) - 1, -1, -1):
        if take[i][c]:
            chosen.append(i)
            c -= weights[i]
    return sorted(chosen)


def _no_room(p: FallbackParams, label: str, forced: set[str], base: dict[str, Any]) -> NoReturn:
    what = "the forced ops (always_keep, with their fused groups) and " if forced else ""
    raise InputError(
        f"{p.where('bits_budget')}: {label} leave no room for any op with a measured gain "
        f"({what}ops kept fp32 by the sensitivity params already take "
        f"{100 * base['share_params_kept']:.2f} %)"
    )


def budget_spend(p: FallbackParams, inventory: list[OpInfo]) -> dict[str, float]:
    """What keeping each op spends of bits_budget's budget. ``bits``: its params times the bits it
    adds over int8, at the dtype it is stored (and deployed) in (``inventory.weight_bits``: 8 more
    for bf16, 24 for float32), so the budget matches ``cost``'s effective bits;
    ``params_share``: its params."""
    if "bits" in p.settings:
        return {op.name: op.params * (weight_bits(op) - 8) for op in inventory}
    return {op.name: op.params for op in inventory}


def bits_room(
    p: FallbackParams, excluded: set[str], forced: set[str], inventory: list[OpInfo]
) -> tuple[dict[str, Any], float, str]:
    """bits_budget's room (in :func:`budget_spend`'s units): what its budget leaves once the
    ``excluded`` ops (kept fp32 by the
    sensitivity params) and the ``forced`` ones (always_keep) are kept; :class:`InputError` when
    they alone exceed it. Also what ``check_params`` runs before any stage (on the ops it can
    name without weights), so a budget too tight stops the run before DVC deletes an output."""
    s = p.settings
    base = cost(excluded | forced, inventory)
    total = base["params_total"]
    spend = budget_spend(p, inventory)  # effective bits = 8 + spent / total
    limit = (s["bits"] - 8) * total if "bits" in s else s["params_share"] * total
    room = limit - sum(spend[m] for m in excluded | forced if m in spend)
    label = f"{s['bits']:g} effective weight bits" if "bits" in s else f"{s['params_share']:g} of the params"
    if room < 0:
        _no_room(p, label, forced, base)
    return base, room, label


def _bits_budget(
    p: FallbackParams,
    curve: dict,
    inventory: list[OpInfo],
    groups: dict[str, str | None],
    forced_modules: list[str] | None = None,
) -> tuple[list[str], str]:
    s = p.settings
    forced = set(forced_modules) if forced_modules else set()
    base, room, label = bits_room(p, set(curve["excluded"]), forced, inventory)
    spend = budget_spend(p, inventory)
    # ops outside the curve's single-op pool were not measured alone: no measured gain to buy
    single = curve["single_op"]
    gain = {m: (single[m]["damage_share"][s["metric"]] if m in single else None) or 0.0 for m in curve["ops"]}
    items = _items([m for m in curve["ops"] if m not in forced], groups if p.fused_groups else {})
    names = [k for k, members in items.items() if sum(gain[m] for m in members) > 0]
    chosen: list[str] = []
    if room > 0 and names:
        unit = room / KNAPSACK_UNITS
        weights = [math.ceil(sum(spend[m] for m in items[k]) / unit) for k in names]
        values = [sum(gain[m] for m in items[k]) for k in names]
        chosen = [m for i in knapsack(values, weights, KNAPSACK_UNITS) for m in items[names[i]]]
    if not (chosen or forced):
        _no_room(p, label, forced, base)
    order = {m: i for i, m in enumerate(curve["ops"])}
    among = curve.get("single_op_pool", {}).get("rule", "every scored op")
    in_place = f"; the {len(forced)} forced ops in place first" if forced else ""
    return sorted(chosen, key=order.get), (
        f"bits_budget: highest summed single-op {s['metric']} damage within {label} (knapsack over {among}"
        f"{in_place})"
    )


def _policy_choice(
    df: pd.DataFrame,
    p: FallbackParams,
    curve: dict | None,
    inventory: list[OpInfo],
    groups: dict[str, str | None],
    measure: Measure | None = None,
) -> tuple[list[str], str]:
    """The policy's own pick, as op names (INC's), before always_keep / never_keep / groups (the
    measured policies take them into account: see the module doc)."""
    if p.policy in MEASURED_POLICIES:
        if curve is None:
            raise InputError(f"{p.where('policy')}: {p.policy} needs the ranking curve (stage curve)")
        if p.policy == "measured_budget" and measure is not None:
            return _shipped_walk(p, curve, df, groups, measure)
        if p.policy == "measured_budget":
            modules, reason = _measured_budget(p, curve)
        else:
            module = dict(zip(df["op_name"], df["module"], strict=True))
            forced = [module[o] for o in ship([], "", df, p, groups)]
            modules, reason = _bits_budget(p, curve, inventory, groups, forced)
        op_name = dict(zip(df["module"], df["op_name"], strict=True))
        return [op_name[m] for m in modules], reason
    s, n = p.settings, len(df)
    if p.policy == "top_k":
        if s["k"] > n:
            raise InputError(f"{p.where('top_k.k')}: expected at most {n} (ops scored), got {s['k']}")
        return list(df["op_name"].iloc[: s["k"]]), f"top_k: rank <= {s['k']}"
    if p.policy == "top_fraction":
        k = math.ceil(s["fraction"] * n)
        return list(df["op_name"].iloc[:k]), f"top_fraction: rank <= {k} ({s['fraction']:g} of {n})"
    if p.policy == "threshold":
        cut = s["value"] * df["score"].max() if s.get("relative", False) else s["value"]
        label = f"{s['value']:g} x max score" if s.get("relative", False) else f"{s['value']:g}"
        chosen = list(df.loc[df["score"] > cut, "op_name"])
        if not chosen:
            raise InputError(
                f"{p.where('threshold.value')}: selects no op (score > {cut:.4g}; the highest score is "
                f"{df['score'].max():.4g}); lower it"
            )
        return chosen, f"threshold: score > {label} ({cut:.4g})"
    share = cumulative_share(df)
    target = s["percent"] / 100
    reached = share[share >= target - 1e-12]
    k = int(reached.index[0]) if len(reached) else n
    return list(df["op_name"].iloc[:k]), (
        f"error_budget: top {k} ops hold >= {s['percent']:g}% of the summed single-op scores"
    )


def check_globs(p: FallbackParams, modules: list[str]) -> None:
    """A glob that matches no op of the model is a typo, not a choice: say so before choosing."""
    for key, globs in (("always_keep", p.always_keep), ("never_keep", p.never_keep)):
        for i, glob in enumerate(globs):
            if not any(fnmatchcase(m, glob) for m in modules):
                raise InputError(
                    f"{p.where(key)}[{i}]: {glob!r} matches no op of the model (module names look like "
                    f"{modules[-1]!r}; globs use fnmatch: * ? [seq])"
                )


def choose(
    df: pd.DataFrame,
    p: FallbackParams,
    curve: dict | None = None,
    inventory: list[OpInfo] | None = None,
    measure: Measure | None = None,
) -> pd.DataFrame:
    """The chosen ops (most sensitive first) with a ``reason`` column; the policy's own reason also
    in ``attrs["reason"]`` (it holds when the policy picked nothing beyond the forced ops).
    ``measure``: the selection split's measure of a keep-list, for ``measured_budget`` to measure
    the lists it ships."""
    inventory = inventory or []
    groups = {op.name: op.fused_group for op in inventory}
    chosen, reason = _policy_choice(df, p, curve, inventory, groups, measure)
    reasons = ship(chosen, reason, df, p, groups)
    out = df[df["op_name"].isin(list(reasons))].copy()
    out["reason"] = [reasons[o] for o in out["op_name"]]
    out = out.reset_index(drop=True)
    out.attrs["reason"] = reason
    return out


def ship(
    chosen: list[str], reason: str, df: pd.DataFrame, p: FallbackParams, groups: dict[str, str | None]
) -> dict[str, str]:
    """The list as shipped from the policy's pick (op names): ``always_keep`` added, ``never_keep``
    removed, fused groups widened; op name -> the reason it is kept."""
    reasons = dict.fromkeys(chosen, reason)
    module = dict(zip(df["op_name"], df["module"], strict=True))
    for op in df["op_name"]:
        hit = next((g for g in p.always_keep if fnmatchcase(module[op], g)), None)
        if hit and op not in reasons:
            reasons[op] = f"always_keep: {hit}"
    for op in df["op_name"]:
        if any(fnmatchcase(module[op], g) for g in p.never_keep):
            reasons.pop(op, None)
    if p.fused_groups:
        _widen(reasons, df, p, groups)
    return reasons


def _widen(
    reasons: dict[str, str], df: pd.DataFrame, p: FallbackParams, groups: dict[str, str | None]
) -> None:
    """Keep every scored member of a fused group one of whose members is kept."""
    module = dict(zip(df["op_name"], df["module"], strict=True))
    by_group: dict[str, list[str]] = {}
    for op, m in module.items():
        if groups.get(m):
            by_group.setdefault(groups[m], []).append(op)
    for group, members in by_group.items():
        kept = [op for op in members if op in reasons]
        if not kept or len(kept) == len(members):
            continue
        blocked = [module[op] for op in members if any(fnmatchcase(module[op], g) for g in p.never_keep)]
        if blocked:
            raise InputError(
                f"{p.where('never_keep')}: drops {blocked} from fused group {group} while "
                f"{[module[o] for o in kept]} stay high precision; runtimes load a fused group whole "
                "(set fallback.fused_groups: false to allow it)"
            )
        for op in members:
            reasons.setdefault(op, f"fused group {group} (with {module[kept[0]]})")

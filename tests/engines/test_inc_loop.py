"""The capture against INC's own numbers, on a real INC run over a real (small) Qwen2.5-VL.

The pass itself is the session fixture ``inc_small_run`` (conftest), shared with the native
engine's equivalence test.
"""

import gc
import math
import weakref

import pytest
import torch

from op_sensitivity.engines.artifact import validate
from op_sensitivity.engines.contract import Capture, HelperCall
from op_sensitivity.engines.inc_loop import capture_mse, check_capture, heap_frozen, inc_util
from op_sensitivity.errors import CaptureError, InputError
from op_sensitivity.inventory import module_name
from tests.helpers import EXCLUDED


def test_captured_values_equal_inc_own_computation(inc_small_run):
    calls = inc_small_run.result.capture.calls
    oracle = inc_small_run.oracle
    assert [c.phase for c in calls] == ["fallback", "fallback", "requant", "requant"]
    assert len(oracle.seen) == len(calls)
    for call, (phase, main, dc, returned) in zip(calls, oracle.seen, strict=True):
        assert call.phase == phase
        assert dict(call.main) == main  # exact: same floats INC held
        assert [k for k, _ in call.main] == list(main)  # INC's iteration order kept
        assert call.returned == returned  # INC's result passed through unchanged
        assert (call.double_check and dict(call.double_check)) == dc
        assert all(math.isfinite(v) for v in main.values())


def test_inc_is_restored_and_model_left_clean(inc_small_run):
    util, originals = inc_small_run.util, inc_small_run.originals
    assert (util.get_mse_order_per_fp32, util.get_mse_order_per_int8) == originals
    assert "sorted" not in vars(util)
    assert not any(m._forward_hooks for m in inc_small_run.model.modules())  # INC's per-call hooks removed


def test_phase_semantics_and_exclusions(inc_small_run):
    result, inventory = inc_small_run.result, inc_small_run.inventory
    assert result.measured_at == "lm_head.module"  # error measured at the logits
    linear = result.quantization["by_op_type"]["Linear"]
    assert linear["weight"] == {
        "dtype": "int8",
        "scheme": "sym",
        "granularity": "per_channel",
        "algorithm": "minmax",
    }
    assert linear["activation"]["dtype"] == "uint8" and linear["activation"]["algorithm"] == "kl"
    assert result.quantization["by_op_type"]["Embedding"]["weight"]["scheme"] == "asym_float"
    assert isinstance(result.quantization["reduce_range"], bool)
    excluded = {e.op_name for e in result.excluded}
    assert {module_name(e) for e in excluded} == EXCLUDED
    assert all("op_name_dict" in e.reason for e in result.excluded)
    report = validate(inc_small_run.report, "built report")
    fb, rq = report["phases"]["fallback"], report["phases"]["requant"]
    scored = len(inventory) - len(EXCLUDED)
    assert len(fb["ops"]) == scored and len(rq["ops"]) == scored
    assert not excluded & {o["op_name"] for o in fb["ops"] + rq["ops"]}
    assert rq["cumulative"] and not fb["cumulative"]
    # Requant is cumulative from all-fp32: its last point is the all-int8 error, which every
    # fallback value (one op restored to fp32) should not exceed by much.
    all_int8 = rq["ops"][-1]["mse"]
    assert rq["ops"][0]["mse"] < all_int8
    assert min(o["mse"] for o in fb["ops"]) < all_int8
    assert sorted(o["rank"] for o in fb["ops"]) == list(range(1, scored + 1))
    by_rank = sorted(fb["ops"], key=lambda o: o["rank"])
    assert [o["mse"] for o in by_rank] == sorted(o["mse"] for o in fb["ops"])
    assert all(len(o["mse_per_batch"]) == 2 for o in fb["ops"])
    assert [o["position"] for o in rq["ops"]] == sorted(o["position"] for o in rq["ops"])


def test_capture_restores_inc_on_exception():
    util = inc_util()
    originals = (util.get_mse_order_per_fp32, util.get_mse_order_per_int8, util.tqdm)
    with pytest.raises(RuntimeError, match="boom"), capture_mse():
        assert util.get_mse_order_per_fp32 is not originals[0]
        raise RuntimeError("boom")
    assert (util.get_mse_order_per_fp32, util.get_mse_order_per_int8, util.tqdm) == originals
    # An exception inside INC's helper itself: the shadowed sorted/tqdm are removed too.
    with pytest.raises(KeyError), capture_mse() as capture:
        util.get_mse_order_per_fp32(None, torch.nn.Linear(2, 2), torch.zeros(1, 2), {"op": {}})
    assert "sorted" not in vars(util) and util.tqdm is originals[2]
    assert capture.calls == []


def test_empty_or_short_capture_is_an_error():
    with pytest.raises(CaptureError, match="fallback phase: captured 0 helper calls with values, expected 2"):
        check_capture(Capture(), 2)
    call = HelperCall("fallback", 0, main=[(("lm_head", "Linear"), 1.0)])
    empty_requant = HelperCall("requant", 0)  # INC returned without scoring anything
    with pytest.raises(CaptureError, match="requant phase: captured 0 helper calls"):
        check_capture(Capture([call, empty_requant]), 1)
    check_capture(Capture([call, HelperCall("requant", 0, main=[(("lm_head", "Linear"), 2.0)])]), 1)


def test_inc_without_the_2x_helpers_is_named(monkeypatch):
    util = inc_util()
    monkeypatch.delattr(util, "get_mse_order_per_int8")  # what a renamed/removed helper looks like
    with pytest.raises(
        InputError, match=r"get_mse_order_per_int8 not found; expected neural-compressor==3.7.1"
    ):
        inc_util()


class _Cycle:
    """A reference cycle: only the cyclic collector frees it, as it frees INC's per-op copies."""

    def __init__(self) -> None:
        self.me = self


def test_heap_frozen_hides_the_old_heap_and_still_frees_what_dies_inside():
    old = _Cycle()
    old_ref = weakref.ref(old)
    with heap_frozen():
        assert gc.get_freeze_count() > 0  # the heap before the pass is out of the collector's sight
        young = _Cycle()
        young_ref = weakref.ref(young)
        del young
        gc.collect()
        assert young_ref() is None  # a per-op copy made inside is freed op by op
        del old
        gc.collect()
        assert old_ref() is not None  # frozen: a collection inside does not walk it
    assert gc.get_freeze_count() == 0
    assert old_ref() is None  # freed on exit


def test_heap_frozen_unfreezes_when_the_pass_fails():
    with pytest.raises(RuntimeError, match="INC failed"), heap_frozen():
        raise RuntimeError("INC failed")
    assert gc.get_freeze_count() == 0

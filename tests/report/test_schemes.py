"""Spectra of several schemes side by side, on hand-made reports with known ranks."""

from __future__ import annotations

import copy
import json

import pytest

from op_sensitivity.errors import InputError
from op_sensitivity.report.schemes import compare_schemes, read_spectra, render_section, scheme_summary
from tests.handmade import DOWN, EMBED, HEAD, INVENTORY, PATCH, UP, make_report

# fallback scores (E - mse) / E over the ops both score: main DOWN .5 > HEAD .4 > PATCH .2 > UP 0,
# other UP .6 > HEAD .4 > DOWN .2 > PATCH .1; rank differences -2, 0, -1, 3 -> rho = 1 - 6*14/60
OTHER_FALLBACK = {PATCH: 9.0, UP: 4.0, DOWN: 8.0, HEAD: 6.0}
OTHER_REQUANT = {PATCH: 1.0, UP: 5.0, DOWN: 6.0, HEAD: 10.0}


def other_report(name: str = "modelopt_int8") -> dict:
    doc = copy.deepcopy(make_report())
    doc["engine"] = "native"
    doc["metadata"]["scheme"] = {"name": name}
    for phase, values in (("fallback", OTHER_FALLBACK), ("requant", OTHER_REQUANT)):
        ops = [o for o in doc["phases"][phase]["ops"] if o["module"] != EMBED]
        for i, o in enumerate(ops):
            o["mse"], o["mse_per_batch"], o["position"] = values[o["module"]], [values[o["module"]]], i + 1
        doc["phases"][phase]["ops"] = ops
    return doc


def test_pairs_compare_the_common_ops_with_known_spearman_and_moves():
    doc = compare_schemes({"inc_cpu": make_report(), "modelopt_int8": other_report()}, INVENTORY)
    assert doc["schemes"]["inc_cpu"]["ops_scored"] == 5 and doc["schemes"]["modelopt_int8"]["ops_scored"] == 4
    assert doc["schemes"]["modelopt_int8"]["most_sensitive"]["fallback"] == UP
    assert doc["schemes"]["inc_cpu"]["source"] == "inc"
    fallback = next(p for p in doc["pairs"] if p["phase"] == "fallback")
    assert (fallback["a"], fallback["b"], fallback["ops"]) == ("inc_cpu", "modelopt_int8", 4)
    assert fallback["spearman"] == pytest.approx(-0.4)
    assert [(m["module"], m["rank_a"], m["rank_b"]) for m in fallback["moves"][:2]] == [
        (UP, 4, 1),
        (DOWN, 1, 3),
    ]
    # two vision ops, one text op, lm_head alone: too few to rank within a tower
    assert fallback["by_tower"] == {
        "lm_head": {"ops": 1, "spearman": None},
        "text": {"ops": 1, "spearman": None},
        "vision": {"ops": 2, "spearman": None},
    }
    m = scheme_summary(doc)
    assert m["all_int8_mse"] == {"inc_cpu": 10.0, "modelopt_int8": 10.0}
    assert m["spearman"]["inc_cpu~modelopt_int8:fallback"] == pytest.approx(-0.4)
    section = render_section(doc)
    assert "| inc_cpu vs modelopt_int8 | fallback | 4 | -0.400 |" in section


def test_read_spectra_names_the_missing_or_mislabelled_report(tmp_path):
    with pytest.raises(InputError, match=r"ort_qdq/op_sensitivity.json: missing; schemes.run lists ort_qdq"):
        read_spectra(tmp_path, ["ort_qdq"])
    (tmp_path / "ort_qdq").mkdir()
    (tmp_path / "ort_qdq" / "op_sensitivity.json").write_text(json.dumps(other_report("modelopt_int8")))
    with pytest.raises(InputError, match=r"measured under scheme 'modelopt_int8', expected 'ort_qdq'"):
        read_spectra(tmp_path, ["ort_qdq"])

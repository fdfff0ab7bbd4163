import json
import re

import pytest

from op_sensitivity.engines.artifact import read_report
from op_sensitivity.fallback.keep_list import EXPORT_SCHEME, build_fallback, write_fallback
from tests.handmade import DOWN, HEAD, INVENTORY, fallback_params, make_report


@pytest.fixture
def report_file(tmp_path):
    path = tmp_path / "op_sensitivity.json"
    path.write_text(json.dumps(make_report()))
    return path


def test_fallback_document_and_exports(tmp_path, report_file):
    p = fallback_params(policy="top_k", top_k={"k": 2})
    doc = build_fallback(read_report(report_file), report_file, INVENTORY, p)
    assert [o["module"] for o in doc["ops"]] == [DOWN, HEAD]
    assert doc["ops"][0] == {
        "op_name": DOWN,
        "module": DOWN,
        "op_type": "Linear",
        "tower": "text",
        "score": 0.5,
        "rank": 1,
        "fused_group": None,
        "reason": "top_k: rank <= 2",
    }
    assert doc["groups_widened"] == [] and doc["curve"] is None
    assert doc["source"]["path"] == str(report_file) and len(doc["source"]["sha256"]) == 64
    # 700 of 1300 weight params stay fp32: (32 * 700 + 8 * 600) / 1300
    assert doc["totals"] == {
        "ops_kept": 2,
        "ops_scored": 5,
        "params_kept": 700,
        "params_total": 1300,
        "share_params_kept": round(700 / 1300, 6),
        "effective_weight_bits": round((32 * 700 + 8 * 600) / 1300, 4),
    }
    out = tmp_path / "fallback"
    write_fallback(doc, INVENTORY, None, out, tmp_path / "fallback_metrics.json")
    assert json.loads((out / "inc_op_name_dict.json").read_text()) == {
        r"model\.language_model\.layers\.0\.mlp\.down_proj(?:\.module)?": {
            "weight": {"dtype": ["fp32"]},
            "activation": {"dtype": ["fp32"]},
        },
        r"lm_head(?:\.module)?": {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}},
    }
    inc_keys = json.loads((out / "inc_op_name_dict.json").read_text())
    for key in inc_keys:  # INC full-matches keys against its names, with or without its wrapper suffix
        assert (
            sum(bool(re.fullmatch(key, n)) for n in (DOWN, DOWN + ".module", "lm_head", "lm_head.module"))
            == 2
        )
    assert json.loads((out / "modelopt_quant_cfg.json").read_text())["quant_cfg"] == [
        {"quantizer_name": f"{DOWN}.*", "enable": False},
        {"quantizer_name": "lm_head.*", "enable": False},
    ]
    assert json.loads((out / "ort_nodes_to_exclude.json").read_text())["node_name_prefixes"] == [
        "/model/language_model/layers.0/mlp/down_proj/",
        "/lm_head/",
    ]
    ignore = json.loads((out / "llmcompressor_ignore.json").read_text())
    assert ignore["ignore"] == [DOWN, HEAD]
    # no scheme stage ran: every export comes from the main spectrum, and says so
    main = {"scheme": "inc_cpu", **doc["source"], "ops_kept": 2}
    assert ignore["spectrum"] == main
    exports = json.loads((out / "fallback_ops.json").read_text())["exports"]
    assert exports == dict.fromkeys(EXPORT_SCHEME, main)
    assert json.loads((tmp_path / "fallback_metrics.json").read_text())["ops_kept"] == 2

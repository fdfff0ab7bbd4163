import json
import re
from pathlib import Path

import pytest

from op_sensitivity.engines.artifact import read_report
from op_sensitivity.errors import InputError
from op_sensitivity.fallback.keep_list import (
    EXPORT_SCHEME,
    build_fallback,
    check_keep_list_ops,
    write_fallback,
)
from tests.handmade import DOWN, HEAD, INVENTORY, UP, fallback_params, make_report


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
        "kept_weight_bits": 32,  # the hand-made inventory is stored float32 (bf16: test_effective_bits)
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
    exports = json.loads((out / "exports.json").read_text())
    assert exports == dict.fromkeys(EXPORT_SCHEME, main)
    headline = json.loads((tmp_path / "fallback_metrics.json").read_text())
    assert headline == {"kept": 2, "bits": doc["totals"]["effective_weight_bits"]}


def test_exports_json_points_at_the_quantize_target_deploying_each_export(tmp_path, report_file):
    from op_sensitivity.fallback.keep_list import EXPORT_TARGET
    from op_sensitivity.params import TARGET_SCHEMES

    doc = build_fallback(read_report(report_file), report_file, INVENTORY, fallback_params())
    out = tmp_path / "fallback"
    write_fallback(doc, INVENTORY, None, out, tmp_path / "m.json", deploy_dirs=(Path("q"), Path("d")))
    exports = json.loads((out / "exports.json").read_text())
    assert exports["llmcompressor_ignore.json"]["deployed_by"] == {
        "target": "compressed_tensors",
        "artifact": "q/compressed_tensors",
        "document": "d/compressed_tensors.json",
    }
    # every export is deployed by the target of its own scheme
    assert {f: TARGET_SCHEMES[e["deployed_by"]["target"]] for f, e in exports.items()} == EXPORT_SCHEME
    assert set(EXPORT_TARGET.values()) == set(TARGET_SCHEMES)


def test_each_scheme_gets_its_own_list_of_the_main_policys_size(tmp_path):
    """A measured policy has no curve for another scheme: it keeps as many ops, that scheme's own top."""
    from op_sensitivity.fallback.keep_list import scheme_fallbacks, scheme_policy
    from tests.report.test_schemes import other_report

    main = {
        "ops": [
            {"module": UP, "reason": "measured_budget: ..."},
            {"module": DOWN, "reason": "measured_budget: ..."},
            {"module": HEAD, "reason": "always_keep: lm_head"},
        ]
    }
    p = fallback_params(policy="measured_budget", always_keep=[], fused_groups=False)
    derived, note = scheme_policy(p, main, {UP, DOWN, HEAD, "x"})
    assert (derived.policy, derived.settings) == ("top_k", {"k": 2})
    assert note == "measured_budget picked 2 ops on the main spectrum; the top 2 of this scheme's own ranking"
    assert scheme_policy(p, main, {UP})[0].settings == {"k": 1}
    # a scheme that does not score lm_head keeps one of its own ops in its place: as many ops in all
    derived, note = scheme_policy(p, main, {UP, DOWN, "x", "y"})
    assert derived.settings == {"k": 3}
    assert "kept lm_head (not scored under this scheme); the top 3" in note
    main["ops"] = main["ops"][2:]  # the default's case: the budget met by lm_head alone
    assert scheme_policy(p, main, {UP, DOWN})[0].settings == {"k": 1}
    assert scheme_policy(p, main, {UP, HEAD})[0].settings == {"k": 0}
    main["ops"] = [{"module": m, "reason": "measured_budget: ..."} for m in (UP, DOWN)]
    top = fallback_params(policy="top_k", top_k={"k": 1}, always_keep=[], fused_groups=False)
    assert scheme_policy(top, main, 4) == (top, None)
    path = tmp_path / "op_sensitivity.json"
    path.write_text(json.dumps(other_report()))
    docs = scheme_fallbacks(main, {"modelopt_int8": (other_report(), path)}, INVENTORY, p)
    doc = docs["modelopt_int8"]
    assert doc["scheme"] == "modelopt_int8" and doc["source"]["path"] == str(path)
    assert [o["module"] for o in doc["ops"]] == [UP, HEAD]  # the scheme's own two most sensitive
    write_fallback(
        build_fallback(make_report(), path, INVENTORY, top),
        INVENTORY,
        None,
        tmp_path / "out",
        tmp_path / "m.json",
        docs,
    )
    frag = json.loads((tmp_path / "out" / "modelopt_quant_cfg.json").read_text())
    assert [e["quantizer_name"] for e in frag["quant_cfg"]] == [f"{UP}.*", "lm_head.*"]
    assert frag["spectrum"]["scheme"] == "modelopt_int8"
    assert json.loads((tmp_path / "out" / "schemes" / "modelopt_int8.json").read_text()) == doc


def test_a_keep_list_op_the_report_did_not_score_is_named(report_file):
    doc = build_fallback(
        read_report(report_file), report_file, INVENTORY, fallback_params(policy="top_k", top_k={"k": 2})
    )
    check_keep_list_ops(doc, "keep.json", [DOWN, HEAD, UP], report_file)
    doc["ops"][1]["module"] = "model.nope"
    with pytest.raises(InputError, match=r"keep.json: ops\[1\].module 'model.nope' is not an op .* scored"):
        check_keep_list_ops(doc, "keep.json", [DOWN, HEAD, UP], report_file)


@pytest.mark.parametrize(("exact_top", "said"), [(1, True), (2, False)])
def test_a_list_past_a_screened_passs_float32_top_says_so(tmp_path, exact_top, said, caplog):
    report = make_report()
    report["metadata"]["screening"] = {"precision": "bfloat16", "exact_top": exact_top, "refined": {}}
    path = tmp_path / "op_sensitivity.json"
    path.write_text(json.dumps(report))
    p = fallback_params(policy="top_k", top_k={"k": 2}, always_keep=[])
    doc = build_fallback(read_report(path), path, INVENTORY, p)
    reason = doc["policy"]["reason"]
    assert ("reaches rank 2 of the fallback ranking, past the top 1" in reason) is said
    assert ("sensitivity.native.exact_top" in caplog.text) is said

import copy
import json

import pytest

from op_sensitivity.engines.artifact import read_report, validate
from op_sensitivity.errors import InputError
from tests.handmade import make_report


def test_nan_and_foreign_schema_are_rejected(tmp_path):
    bad = make_report()
    bad["phases"]["requant"]["ops"][2]["mse"] = float("nan")
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"phases.requant.ops\[2\].*finite"):
        read_report(path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema_version": 7, "ops": []}))
    with pytest.raises(InputError, match="schema_version 1"):
        read_report(other)
    missing = copy.deepcopy(make_report())
    del missing["phases"]["fallback"]["ops"][0]["tower"]
    with pytest.raises(InputError, match=r"phases.fallback.ops\[0\].tower: expected str"):
        validate(missing, "x.json")


WRONG = [None, True, -1, 1.5, float("inf"), "x", [], {}, [1], {"x": 1}]


def _paths(node, path=()):
    yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, (*path, key))


def _full_report() -> dict:
    doc = make_report()
    meta = doc["metadata"]
    meta["excluded_ops"] = [{"op_name": "model.x", "op_type": "Linear", "reason": "kept fp32"}]
    meta.update(scheme={"name": "inc_cpu"}, engine_details={"arithmetic": "auto"}, all_int8_mse=10.0)
    meta["requant_mode"] = "cumulative"
    return doc


def test_the_validator_never_crashes_on_a_wrong_type_or_a_missing_key():
    """Every node of a report replaced by each wrong type, or removed: valid or one InputError."""
    good = _full_report()
    assert validate(copy.deepcopy(good), "x.json")
    rejected = 0
    for path in list(_paths(good))[1:]:
        for wrong in [*WRONG, KeyError]:  # KeyError: remove the key
            doc = copy.deepcopy(good)
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            if wrong is KeyError:
                del parent[path[-1]]
            else:
                parent[path[-1]] = wrong
            try:
                validate(doc, "x.json")
            except InputError as e:
                assert str(e).startswith("x.json: ")
                rejected += 1
    assert rejected > 1000


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.update(phases=[]), r"phases: expected an object with fallback and requant, got \[\]"),
        (lambda r: r["metadata"].pop("excluded_ops"), "metadata.excluded_ops: missing"),
        (lambda r: r["metadata"].update(excluded_ops=["lm_head"]), r"metadata.excluded_ops\[0\]: expected"),
        (lambda r: r["metadata"]["model"].pop("sha256"), "metadata.model.sha256: expected str"),
        (lambda r: r["phases"]["fallback"]["ops"].__setitem__(0, 3), r"phases.fallback.ops\[0\]: expected"),
        (lambda r: r["phases"]["requant"].update(cumulative="yes"), "phases.requant.cumulative: expected"),
    ],
)
def test_a_wrong_field_is_named(mutate, expected):
    doc = _full_report()
    mutate(doc)
    with pytest.raises(InputError, match=expected):
        validate(doc, "x.json")

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

"""The versioned scheme catalog the pipeline runs from still says what the installed tools say."""

from __future__ import annotations

import json

import pytest

from op_sensitivity.errors import InputError
from op_sensitivity.schemes import DESCRIBE, describe, load
from op_sensitivity.schemes.catalog import CATALOG, read, to_dict, with_version, write


@pytest.mark.parametrize("name", list(DESCRIBE))
def test_catalog_equals_the_installed_tool(name):
    """Fails after a tool upgrade that changes its defaults: rerun scripts/write_scheme_catalog.py."""
    assert load(name) == with_version(describe(name))


def test_write_then_read_round_trips(tmp_path):
    out = tmp_path / "catalog.json"
    entries = write(out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(entries)) == json.loads(CATALOG.read_text())
    assert all(read(n, out) == load(n) for n in DESCRIBE)
    assert to_dict(load("ort_qdq"))["shared_input"] is True


def test_bad_catalogs_name_the_file_and_the_scheme(tmp_path):
    path = tmp_path / "catalog.json"
    with pytest.raises(InputError, match="cannot read the scheme catalog"):
        read("ort_qdq", path)
    path.write_text(json.dumps({"ort_qdq": {"name": "ort_qdq"}}))
    with pytest.raises(InputError, match=r"catalog.json: ort_qdq: not a scheme description"):
        read("ort_qdq", path)
    with pytest.raises(InputError, match=r"no scheme 'modelopt_fp8'"):
        read("modelopt_fp8", path)
    entry = to_dict(load("ort_qdq"))
    entry["inputs"]["dtype"] = "int4"
    path.write_text(json.dumps({"ort_qdq": entry}))
    with pytest.raises(InputError, match=r"QuantSpec.dtype: 'int4'"):
        read("ort_qdq", path)

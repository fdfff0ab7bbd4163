"""What a stage says when it stops: true under ``dvc repro`` (DVC deleted the outputs first) and outside."""

from __future__ import annotations

import pytest

from op_sensitivity.cli import run_stage
from op_sensitivity.errors import InputError


def _interrupted() -> None:
    raise KeyboardInterrupt


def _bad_input() -> None:
    raise InputError("params.yaml: curve.seed: expected an integer, got 'x'")


def _stop(main, monkeypatch, capsys, dvc_stage: str | None) -> tuple[int, list[str]]:
    if dvc_stage is None:
        monkeypatch.delenv("DVC_STAGE", raising=False)
    else:
        monkeypatch.setenv("DVC_STAGE", dvc_stage)
    with pytest.raises(SystemExit) as stop:
        run_stage(main)
    return stop.value.code, capsys.readouterr().err.splitlines()


def test_ctrl_c_outside_dvc_leaves_the_outputs_and_says_so(monkeypatch, capsys):
    code, lines = _stop(_interrupted, monkeypatch, capsys, None)
    assert (code, lines) == (130, ["error: stopped by SIGINT; outputs left as they were before this run"])


def test_ctrl_c_under_dvc_repro_says_dvc_removed_the_outputs(monkeypatch, capsys):
    code, lines = _stop(_interrupted, monkeypatch, capsys, "curve")
    assert code == 130
    assert lines == [
        "error: stopped by SIGINT; nothing of this run was written",
        "note: dvc repro removed stage curve's previous outputs before starting it; "
        "`make restore` brings back the last committed run",
    ]


def test_bad_input_under_dvc_repro_adds_the_same_note(monkeypatch, capsys):
    code, lines = _stop(_bad_input, monkeypatch, capsys, "validate")
    assert code == 2 and lines[0] == "error: params.yaml: curve.seed: expected an integer, got 'x'"
    assert lines[1].startswith("note: dvc repro removed stage validate's previous outputs")
    code, lines = _stop(_bad_input, monkeypatch, capsys, None)
    assert code == 2 and len(lines) == 1


def test_a_file_where_an_output_directory_goes_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from op_sensitivity.atomic import dump_json

    (tmp_path / "reports").write_text("a file where the reports directory goes")

    def write() -> None:
        dump_json({"a": 1}, tmp_path / "reports" / "quantize" / "inc.json")

    code, lines = _stop(write, monkeypatch, capsys, None)
    assert code == 2
    reports = tmp_path / "reports"
    assert lines == [
        f"error: {reports / 'quantize'}: Not a directory ({reports} is a file, where a directory must be)"
    ]
    (reports.unlink(), (tmp_path / "models").write_text("a file"))
    code, lines = _stop(lambda: (tmp_path / "models").mkdir(), monkeypatch, capsys, None)
    models = tmp_path / "models"
    assert lines == [f"error: {models}: File exists ({models} is a file, where a directory must be)"]


def test_a_directory_where_an_output_file_goes_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from op_sensitivity.atomic import check_writable

    (tmp_path / "metrics.json").mkdir()
    code, lines = _stop(lambda: check_writable(tmp_path / "metrics.json", "file"), monkeypatch, capsys, None)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {tmp_path / 'metrics.json'}: ")
    assert lines[0].endswith("(a directory is where a file must be written)")


def test_an_os_error_naming_no_path_keeps_its_traceback(monkeypatch):
    def fail() -> None:
        raise OSError("no space left")  # no path to name: an environment failure, shown whole

    monkeypatch.delenv("DVC_STAGE", raising=False)
    with pytest.raises(OSError, match="no space left"):
        run_stage(fail)


def test_a_stop_after_an_output_was_written_names_it(tmp_path, monkeypatch, capsys):
    """A stage stopped after it renamed an output into place must not claim it left outputs as they were."""
    import signal

    from op_sensitivity.atomic import dump_json
    from op_sensitivity.cli import Terminated

    def write_then_stop() -> None:
        dump_json({"a": 1}, tmp_path / "doc.json")
        raise Terminated(signal.SIGTERM)

    code, lines = _stop(write_then_stop, monkeypatch, capsys, None)
    assert code == 143
    assert lines == [
        f"error: stopped by SIGTERM after this run had written {tmp_path / 'doc.json'}; "
        "every other output is as before it"
    ]
    code, lines = _stop(_interrupted, monkeypatch, capsys, None)  # the next run starts with a clean record
    assert lines == ["error: stopped by SIGINT; outputs left as they were before this run"]

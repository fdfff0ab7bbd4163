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

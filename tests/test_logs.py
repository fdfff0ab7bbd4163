"""A stage's terminal shows one summary line (its time, its last line of its own, the log file) and
this project's warnings; INC's log, third-party warnings and prints, and this project's INFO lines
go to logs/<stage>.log (op_sensitivity.logs). Real INC: its logger prints through a handler of its
own until the engine adopts it; real pycocotools prints "creating index..."."""

import os
import subprocess
import sys

from tests.helpers import REPO

SCRIPT = """
import logging, os, subprocess, warnings
from op_sensitivity.cli import run_stage

def main():
    logging.getLogger("op_sensitivity.engines.runner").info("ours: resumed 3 trials")
    logging.getLogger("op_sensitivity.engines.runner").warning("ours: a warning")
    logging.getLogger("op_sensitivity.engines.runner").info("ours: wrote the report\\nsecond line")
    from pycocotools.coco import COCO
    COCO().createIndex()  # prints "creating index..." to stdout
    os.write(2, b"[W:onnxruntime:] a C++ library's line\\n")  # straight to file descriptor 2
    subprocess.run(["echo", "a subprocess's line"], check=True)
    from op_sensitivity.engines.inc_loop import inc_util
    inc_util()
    from neural_compressor.utils import logger
    logger.info("INC: Adaptor has 5 recipes.")
    warnings.warn("torch.quantize_per_tensor is deprecated", UserWarning)
    logging.getLogger("modelopt.torch.export").warning("a third-party warning")

run_stage(main)
"""


def _run(tmp_path, verbose: bool) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    env.update(PYTHONPATH=str(REPO / "src"), DVC_STAGE="quantize@inc")
    if verbose:
        env["OP_SENSITIVITY_VERBOSE"] = "1"
    else:
        env.pop("OP_SENSITIVITY_VERBOSE", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout + done.stderr, (tmp_path / "logs" / "quantize@inc.log").read_text()


def test_the_terminal_shows_one_summary_line_and_the_log_file_everything(tmp_path):
    terminal, log = _run(tmp_path, verbose=False)
    summary = [line for line in terminal.splitlines() if "quantize@inc done in" in line]
    assert len(summary) == 1
    assert summary[0].endswith(": ours: wrote the report; full log: logs/quantize@inc.log")
    assert "ours: a warning" in terminal  # this project's warnings stay on the terminal
    assert len(terminal.splitlines()) == 2
    for elsewhere in (
        *("resumed 3 trials", "second line", "creating index", "Adaptor has 5 recipes"),
        *("a C++ library's line", "a subprocess's line"),
    ):
        assert elsewhere not in terminal
        assert elsewhere in log
    for third_party in ("is deprecated", "a third-party warning"):
        assert third_party not in terminal
        assert third_party in log


def test_verbose_shows_the_third_party_lines_too(tmp_path):
    terminal, _ = _run(tmp_path, verbose=True)
    for line in (
        "resumed 3 trials",
        "creating index",
        "Adaptor has 5 recipes",
        "is deprecated",
        "a third-party warning",
    ):
        assert line in terminal

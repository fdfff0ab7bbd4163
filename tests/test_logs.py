"""A stage's terminal shows this project's lines and one summary line; INC's log and third-party
warnings go to logs/<stage>.log, which the summary names (op_sensitivity.logs). Real INC: its
logger prints through a handler of its own until the engine adopts it."""

import os
import subprocess
import sys

from tests.helpers import REPO

SCRIPT = """
import logging, warnings
from op_sensitivity.cli import run_stage

def main():
    logging.getLogger("op_sensitivity.engines.runner").info("ours: wrote the report")
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


def test_the_terminal_shows_ours_and_the_log_file_everything(tmp_path):
    terminal, log = _run(tmp_path, verbose=False)
    assert "ours: wrote the report" in terminal
    assert "quantize@inc done in" in terminal and "logs/quantize@inc.log" in terminal
    for third_party in ("Adaptor has 5 recipes", "is deprecated", "a third-party warning"):
        assert third_party not in terminal
        assert third_party in log
    assert "ours: wrote the report" in log


def test_verbose_shows_the_third_party_lines_too(tmp_path):
    terminal, _ = _run(tmp_path, verbose=True)
    for line in ("ours: wrote the report", "Adaptor has 5 recipes", "is deprecated", "a third-party warning"):
        assert line in terminal

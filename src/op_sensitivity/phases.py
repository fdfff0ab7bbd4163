"""The two measurements of INC's mse_v2 pass, named once for engines, reports and params.

* ``fallback`` (INC's ``get_mse_order_per_fp32``): every scored op int8 but one.
* ``requant`` (INC's ``get_mse_order_per_int8``): from all-fp32, ops quantized one after another.

A keep-list may also rank by ``both`` (the two phases combined by mean rank). The curve stage
adds a third ranking, ``measured`` (each op's own damage when it alone is int8, by a caption
metric, on the calibration captions), and the quality metrics a keep-list is judged by on the
held-out splits (``validation.metrics``).
"""

from __future__ import annotations

FALLBACK = "fallback"
REQUANT = "requant"
PHASES = (FALLBACK, REQUANT)
BOTH = "both"
SELECTABLE_PHASES = (*PHASES, BOTH)
MEASURED = "measured"
RANKINGS = (*PHASES, MEASURED)
METRICS = ("kl", "top1", "nll", "logit_se")

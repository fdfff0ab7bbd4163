import math
import re

import pytest
from PIL import Image

from op_sensitivity.params import ReportParams
from op_sensitivity.report.rank import write_rank_report
from tests.handmade import DOWN, HEAD, INVENTORY, PATCH, make_report


def test_rank_report_writes_tables_plots_and_metrics(tmp_path):
    m = write_rank_report(make_report(), INVENTORY, tmp_path, ReportParams(table_top=None, plot_top=10))
    md = (tmp_path / "op_sensitivity.md").read_text()
    flat = re.sub(r" +", " ", md)
    assert "| rank | op_name | op_type | tower | mse_value | score |" in flat
    assert "Random weights" in md and "### Per tower" in md and "### Per op type" in md
    for name in ("spectrum", "depth", "cumulative_share", "requant_curve"):
        png = tmp_path / "plots" / f"{name}.png"
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert len(set(im.convert("L").getdata())) > 10  # something was drawn
    assert m["phase_spearman"] == pytest.approx(8.5 / math.sqrt(95), abs=1e-6)
    assert m["fallback"]["most_sensitive"] == {"vision": PATCH, "text": DOWN, "lm_head": HEAD}
    assert m["requant"]["top5pct_error_share"] == pytest.approx(0.4)  # top 1 of 5 ops
    assert m["all_int8_mse"] == 10.0
    top = (tmp_path / "rank" / "top_fallback.csv").read_text().splitlines()
    assert top[0] == "module,score" and top[1].startswith(DOWN)

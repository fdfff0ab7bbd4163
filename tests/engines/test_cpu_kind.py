"""The CPU kind the int8 numerics follow, and the AVX2 emulation `make test-avx2` runs under."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from op_sensitivity.engines import cpu_kind
from op_sensitivity.engines.numerics import resolve_reduce_range
from op_sensitivity.errors import InputError

VNNI = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse avx2\n"
SWITCHES = ("OP_SENSITIVITY_EMULATE_CPU", "ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS")


@pytest.fixture
def native_env(monkeypatch):
    """No emulation, whatever the run's environment (`make test-avx2` sets all three)."""
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_vnni_is_read_from_the_flags_and_the_emulation_hides_it(native_env, tmp_path):
    vnni, avx2 = _cpuinfo(tmp_path, VNNI), tmp_path / "avx2" / "cpuinfo"
    avx2.parent.mkdir()
    avx2.write_text(AVX2)
    assert cpu_kind.cpu_has_avx512_vnni(vnni) and cpu_kind.fbgemm_has_vnni(vnni)
    assert not cpu_kind.cpu_has_avx512_vnni(avx2) and not cpu_kind.fbgemm_has_vnni(avx2)
    assert not cpu_kind.cpu_has_avx512_vnni(tmp_path / "missing")
    native_env.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "avx2")  # fbgemm's map is case-insensitive
    assert cpu_kind.cpu_has_avx512_vnni(vnni) and not cpu_kind.fbgemm_has_vnni(vnni)
    native_env.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX512_E1")  # VNNI kept
    assert cpu_kind.fbgemm_has_vnni(vnni)
    for name, value in cpu_kind.AVX2_SWITCHES.items():
        native_env.setenv(name, value)
    native_env.setenv("OP_SENSITIVITY_EMULATE_CPU", "avx2")
    assert cpu_kind.emulated_cpu() == "avx2"
    assert not cpu_kind.cpu_has_avx512_vnni(vnni) and not cpu_kind.fbgemm_has_vnni(vnni)
    assert resolve_reduce_range("auto") is True and resolve_reduce_range("false") is False


def test_a_half_set_or_unknown_emulation_is_refused_with_what_is_missing(native_env):
    native_env.setenv("OP_SENSITIVITY_EMULATE_CPU", "avx2")
    native_env.setenv("ATEN_CPU_CAPABILITY", "avx2")
    with pytest.raises(
        InputError, match=r"avx2 also needs FBGEMM_ENABLE_INSTRUCTIONS=AVX2 in the environment"
    ):
        cpu_kind.emulated_cpu()
    native_env.setenv("OP_SENSITIVITY_EMULATE_CPU", "sse4")
    with pytest.raises(
        InputError, match=r"OP_SENSITIVITY_EMULATE_CPU='sse4': expected avx2, native or unset"
    ):
        cpu_kind.emulated_cpu()
    native_env.setenv("OP_SENSITIVITY_EMULATE_CPU", "native")
    assert cpu_kind.emulated_cpu() is None


INC_REDUCE_RANGE = """
import json
from op_sensitivity.engines import inc_loop
inc_loop.inc_util()
import neural_compressor.adaptor.pytorch as adaptor
from neural_compressor.utils.utility import CpuInfo
from op_sensitivity.engines.runner import host_facts
facts = {"adaptor": adaptor.REDUCE_RANGE, "cpuinfo_vnni": CpuInfo().vnni, "isa": host_facts()["isa"]}
print(json.dumps(facts))
"""


def _inc_in_a_fresh_process(env: dict[str, str]) -> dict:
    """INC fixes REDUCE_RANGE once per process (at its adaptor's import), so each kind gets its own."""
    clean = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    out = subprocess.run(
        [sys.executable, "-c", INC_REDUCE_RANGE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_under_the_emulation_inc_takes_7_bit_activations_as_on_an_avx2_cpu():
    native = _inc_in_a_fresh_process({})
    assert native["adaptor"] is ("avx512_vnni" not in cpu_kind.cpu_flags())  # INC's own CPUID reading
    emulated = _inc_in_a_fresh_process({"OP_SENSITIVITY_EMULATE_CPU": "avx2", **cpu_kind.AVX2_SWITCHES})
    assert emulated["adaptor"] is True and emulated["cpuinfo_vnni"] is False
    assert emulated["isa"].startswith("AVX2 avx2 (emulated")  # runtime files say what the values follow

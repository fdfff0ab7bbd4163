"""Which kind of x86 CPU the int8 numerics follow: with AVX512-VNNI, or AVX2 only (real or emulated).

Why it matters: two facts of the CPU move every int8 value this project computes.

- INC quantizes activations to 7 bits (``reduce_range``) where CPUID lacks AVX512-VNNI, so the
  native engine, which equals INC to the bit, must make the same choice.
- fbgemm's u8s8 GEMM forms the products of two adjacent k-lanes in a saturating int16
  (``vpmaddubsw``) without VNNI; with VNNI (``vpdpbusd``) they go straight into int32. 8-bit
  activations can saturate there, 7-bit ones cannot (127 * 128 * 2 = 32512 < 32767).

``OP_SENSITIVITY_EMULATE_CPU=avx2`` makes a VNNI machine compute as an AVX2-only one, as far as
the libraries allow, so a change can be checked against the other CPU kind without one at hand
(``make test-avx2``). It needs two library switches set before the process starts, which this
module checks rather than sets (both are read once, at the libraries' first use):

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's float and quantized elementwise kernels take their AVX2
  versions;
- ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``: fbgemm's GEMM and requantization take the ``vpmaddubsw``
  kernels (fbgemm's ``fbgemmEnvGetIsa``).

This module then answers "no VNNI" for the project (``reduce_range`` auto) and for INC (its
``CpuInfo`` and ``REDUCE_RANGE``: ``engines.inc_loop``). ONNX Runtime's MLAS kernels pick their
ISA from CPUID with no switch, so ORT still runs its VNNI kernels under the emulation.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

EMULATE_ENV = "OP_SENSITIVITY_EMULATE_CPU"
# What the emulation needs of the libraries, set in the environment before the process starts.
AVX2_SWITCHES = {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
# fbgemm's ISA names without VNNI (fbgemmEnvGetIsa's map; AVX512_E1* are the VNNI ones).
_FBGEMM_PRE_VNNI = {"AVX2", "AVX512", "AVX512_256"}


def emulated_cpu() -> str | None:
    """``"avx2"`` when the environment asks for an AVX2-only CPU, else None; a half-set emulation
    (the project told "avx2" but a library not) is refused: its values would match neither kind."""
    value = os.environ.get(EMULATE_ENV, "").strip().lower()
    if value in ("", "native"):
        return None
    if value != "avx2":
        raise InputError(f"{EMULATE_ENV}={value!r}: expected avx2, native or unset")
    missing = [f"{k}={v}" for k, v in AVX2_SWITCHES.items() if os.environ.get(k, "").lower() != v.lower()]
    if missing:
        raise InputError(
            f"{EMULATE_ENV}=avx2 also needs {' and '.join(missing)} in the environment before the process "
            "starts (`make test-avx2` sets all three)"
        )
    return value


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """Linux's CPU flags (the first ``flags`` line), empty where /proc/cpuinfo is not readable."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set()
    return next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())


def cpu_has_avx512_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """What INC checks (CPUID leaf 7, ECX bit 11) to decide ``reduce_range``, read from Linux's
    flags; False under the AVX2 emulation."""
    if emulated_cpu() == "avx2":
        return False
    return "avx512_vnni" in cpu_flags(cpuinfo)


def fbgemm_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether fbgemm's u8s8 GEMM accumulates without int16 saturation here: the CPU has VNNI and
    ``FBGEMM_ENABLE_INSTRUCTIONS`` does not hold fbgemm to an older ISA."""
    forced = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper()
    return forced not in _FBGEMM_PRE_VNNI and "avx512_vnni" in cpu_flags(cpuinfo)

"""CI's last step names the cause it sees when a run on another CPU kind differs from HEAD."""

import importlib.util

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("check_reproduced", REPO / "scripts/check_reproduced.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

VNNI = {"cpu": "AMD EPYC", "isa": "AVX512 avx2 avx512f avx512_vnni avx512_bf16"}
AVX2 = {"cpu": "AMD EPYC", "isa": "AVX2 avx2"}
AVX512_NO_VNNI = {"cpu": "Intel Xeon", "isa": "AVX512 avx2 avx512f"}


def test_vnni_on_one_side_only_is_named_as_reduce_range_moving_every_value():
    for writer, here in ((VNNI, AVX2), (AVX2, VNNI), (VNNI, AVX512_NO_VNNI)):
        said = check.cause(writer, here)
        assert "reduce_range" in said and "every value moves" in said, said
    assert "8-bit there and 7-bit (reduce_range) here" in check.cause(VNNI, AVX2)


def test_same_vnni_other_kernels_is_named_as_last_float_bits():
    said = check.cause(AVX512_NO_VNNI, AVX2)
    assert said.startswith("other float kernels") and "reduce_range" not in said

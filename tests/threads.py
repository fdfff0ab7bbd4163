"""torch's intra-op thread count, set for a block and given back: a test or fixture that calls
``torch.set_num_threads`` and never restores it changes every later test's floating-point sums
(matmul splits work by thread), so results would depend on test order. ``conftest.py``'s
``torch_threads_restored`` fails a module that leaks one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, the previous count restored however it ends."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

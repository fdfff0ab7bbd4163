"""One native pass over several processes (``sensitivity.native.processes``), on torch.distributed.

Why: every trial of a pass is independent given its op state, so N processes (N GPUs, or N CPU
process groups) finish a pass in about 1/N of the time. Each process calibrates on the same batch
(the same qparams: the computation is deterministic) and measures its share of the trials:

* ``fallback`` and ``isolated`` requant: ops dealt round-robin (``scored[rank::world]``), which
  spreads the expensive vision-op trials evenly;
* ``cumulative`` requant: contiguous segments, each started from the state INC's curve has
  reached there (every op before the segment int8), which is known without running it.

After each phase x batch the values are gathered to rank 0 (``gather_object``; gloo on CPU,
NCCL on CUDA), which assembles the same :class:`PassResult` one process would produce. The
processes are started here with ``torch.multiprocessing`` (no launcher needed: the DVC stage
runs them from the one param); on CPU they share the model's weights through shared memory,
so N processes do not hold N copies of the stored weights (each holds its own int8 copies and
activations); on CUDA process ``rank`` uses GPU ``rank``. Each process keeps its own trial log,
so a killed sharded pass resumes with the same number of processes.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..atomic import atomic_file
from ..errors import InputError
from .contract import PassResult, PassSpec

log = logging.getLogger(__name__)

RESULT = "native_sharded_result.pkl"


@dataclass(frozen=True)
class Shard:
    """This process's share of a pass."""

    rank: int = 0
    world: int = 1

    def dealt(self, ops: list[str]) -> list[str]:
        return ops[self.rank :: self.world]

    def segment(self, ops: list[str]) -> tuple[int, list[str]]:
        """Where this process's stretch of the cumulative curve starts, and its ops."""
        start, end = (len(ops) * r // self.world for r in (self.rank, self.rank + 1))
        return start, ops[start:end]

    def gather(self, values: list[tuple[Any, float]], order: list[str]) -> list[tuple[Any, float]] | None:
        """Every process's ``((name, type), value)`` pairs, in ``order``, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return values
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(values, parts, dst=0)
        if self.rank != 0:
            return None
        position = {name: i for i, name in enumerate(order)}
        return sorted((v for part in parts for v in part), key=lambda v: position[v[0][0]])

    def gather_runtime(self, runtime: dict[str, Any]) -> list[dict[str, Any]] | None:
        if self.world == 1:
            return [runtime]
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(runtime, parts, dst=0)
        return parts


ONE_PROCESS = Shard()


def check_processes(world: int, device: torch.device, where: str) -> None:
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise InputError(
            f"{where}: {world} processes need {world} CUDA devices, this machine has "
            f"{torch.cuda.device_count()}"
        )


def _worker(
    rank: int,
    world: int,
    run: Callable[..., PassResult | None],
    model: nn.Module,
    spec: PassSpec,
    workspace: Path,
    device: torch.device,
    threads: int,
) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(threads)
    backend = "nccl" if device.type == "cuda" else "gloo"
    init = workspace / "dist_init"
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = run(model, spec, workspace=workspace, shard=Shard(rank, world))
        if rank == 0:
            with atomic_file(workspace / RESULT) as tmp:
                tmp.write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_sharded(
    run: Callable[..., PassResult | None],
    model: nn.Module,
    spec: PassSpec,
    workspace: Path,
    device: torch.device,
) -> PassResult:
    """Start ``processes`` workers that each call ``run`` (the native ``run_pass``) on their shard;
    wait for them and return rank 0's assembled result.

    A worker that fails stops the others (``torch.multiprocessing`` terminates them) and its
    error is raised here; so is a signal that stops this process.
    """
    world = spec.params.native.processes
    check_processes(world, device, spec.params.where("native.processes"))
    workspace.mkdir(parents=True, exist_ok=True)
    for leftover in (workspace / RESULT, workspace / "dist_init"):
        leftover.unlink(missing_ok=True)
    threads = max(1, torch.get_num_threads() // world)
    log.info("native pass on %d processes (%d torch threads each on CPU)", world, threads)
    context = mp.start_processes(
        _worker,
        args=(world, run, model, spec, workspace, device, threads),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    try:
        while not context.join():
            pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        (workspace / "dist_init").unlink(missing_ok=True)
    result_file = workspace / RESULT
    result = pickle.loads(result_file.read_bytes())
    result_file.unlink()
    return result

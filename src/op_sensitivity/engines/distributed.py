"""One native pass over several processes (``sensitivity.native.processes``), on torch.distributed.

Why: every trial of a pass is independent given its op state, so N processes on N GPUs finish a
pass in about 1/N of the time. On the CPU the processes share the cores, each with the stage's
thread count (below): no faster than one process (``benchmarks/processes.py``, 2 cores: the
stage takes 1.6x as long on two); it is there so the sharded path runs where CI can test it. Each process
calibrates on the same batch (the same qparams: the computation is deterministic) and measures
its share of the trials:

* ``fallback`` and ``isolated`` requant: ops dealt round-robin (``scored[rank::world]``), which
  spreads the expensive vision-op trials evenly;
* ``cumulative`` requant: contiguous segments, each started from the state INC's curve has
  reached there (every op before the segment int8), which is known without running it.

After each phase x batch the values are gathered to rank 0 (``gather_object``; gloo on CPU,
NCCL on CUDA), which assembles the same :class:`PassResult` one process would produce. The
processes are started here (``spawn``; no launcher needed: the DVC stage runs them from the one
param); on CPU they share the model's weights through shared memory, so N processes do not hold
N copies of the stored weights (each holds its own int8 copies and activations); on CUDA process
``rank`` uses GPU ``rank``. Each process keeps its own trial log, so a killed sharded pass resumes
with the same number of processes.

Same values as one process: every process computes with the torch thread count the parent (the
one-process pass) has; float sums depend on how a kernel splits them over threads, so one thread
per process would give other bytes than the default pass.

Each run meets in a private directory of its workspace (``.native_processes.tmp-<pid>-*``: the
file store of the rendezvous, the result, each worker's failure), made fresh for the run and
removed after it; one left by a killed run is removed by the next. The workers die with the
stage: they stop when it is killed, even by SIGKILL (``PR_SET_PDEATHSIG``), and it stops and
joins them on its way out of any error or signal.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..atomic import TMP_TAG, atomic_file, remove_leftovers
from ..cli import raise_if_terminated
from ..errors import InputError, PipelineError
from .contract import PassResult, PassSpec

log = logging.getLogger(__name__)

RUN_DIR = "native_processes"  # each run's private directory: .native_processes.tmp-<pid>-<random>
RESULT = "result.pkl"
STORE = "rendezvous"
# How long a worker waits for the others to join (each starts an interpreter, imports torch and
# maps the model's weights first). The collectives after it wait as long as the slowest shard:
# the stage watches its workers, and one that dies stops the pass at once.
RENDEZVOUS_SECONDS = 120.0
COLLECTIVE_TIMEOUT = timedelta(days=7)
STOP_SECONDS = 10.0  # SIGTERM, then SIGKILL for a worker still alive after this
PR_SET_PDEATHSIG = 1
# N processes with the one-process thread count each share the cores: an OpenMP thread that
# spins while it waits takes a core from another process's (14 s -> 1.4 s for the fallback phase
# of the 29-op model on 2 cores). The user's own setting wins.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


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


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, cgroups' cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_processes(world: int, device: torch.device, where: str) -> None:
    """``processes`` against this machine, before any work: one GPU each on cuda, one core each on cpu."""
    if world <= 1:
        return
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if world > gpus:
            raise InputError(
                f"{where}: {world} processes on cuda need one GPU each, this machine shows {gpus} "
                f"(CUDA_VISIBLE_DEVICES included): at most {gpus}"
            )
        return
    cores = usable_cores()
    if world > cores:
        raise InputError(
            f"{where}: {world} processes on cpu, but this run may use {cores} cores "
            f"(os.sched_getaffinity): at most {cores}; more processes than cores only share the same "
            "cores, each with its own copy of the activations and int8 weights"
        )


def _die_with_parent(parent: int) -> None:
    """Be killed when the stage process dies, however it dies (Linux: ``PR_SET_PDEATHSIG``)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
    if os.getppid() != parent:  # the stage died while this process was starting
        os._exit(1)
    # Ctrl-C reaches the whole process group: the stage alone decides, and stops the workers.
    # SIGINT came blocked (see run_sharded): one pressed while this process started is dropped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _join(rank: int, world: int, run_dir: Path, device: torch.device, where: str) -> None:
    """Meet the other processes of this run (its own file store), or fail with one clear line."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo" and sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all on this machine: never the hostname's IP
    timeout = timedelta(seconds=RENDEZVOUS_SECONDS)
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # private: may go away
    try:
        store = dist.FileStore(str(run_dir / STORE), world)
        store.set_timeout(timeout)
        store.set(f"joined/{rank}", "1")
        store.wait([f"joined/{r}" for r in range(world)])
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world,
            timeout=timeout if set_timeout is not None else COLLECTIVE_TIMEOUT,
        )
        dist.barrier(**({"device_ids": [rank]} if backend == "nccl" else {}))
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the user gets one line
        reason = " ".join(str(e).split())[:300]
        raise PipelineError(
            f"{where}: process {rank} of {world} could not meet the others ({backend}, file store "
            f"{run_dir / STORE}) within {RENDEZVOUS_SECONDS:g} s: {reason}; nothing was measured"
        ) from e
    if set_timeout is not None:
        set_timeout(COLLECTIVE_TIMEOUT)


def _report(run_dir: Path, rank: int, error: BaseException) -> None:
    """Leave this worker's failure for the stage: a PipelineError as itself, anything else as text."""
    if isinstance(error, PipelineError):
        failure: Any = error
        try:
            pickle.dumps(failure)
        except Exception:  # noqa: BLE001
            failure = PipelineError(str(error))
    else:
        failure = "".join(traceback.format_exception(error))
    with atomic_file(run_dir / f"failed.{rank}.pkl") as tmp:
        tmp.write_bytes(pickle.dumps(failure))


def _worker(
    rank: int,
    world: int,
    run: Callable[..., PassResult | None],
    model: nn.Module,
    spec: PassSpec,
    workspace: Path,
    run_dir: Path,
    device: torch.device,
    threads: int,
    parent: int,
) -> None:
    _die_with_parent(parent)
    try:
        torch.set_num_threads(threads)  # the one-process pass's: the same sums, the same bytes
        if device.type == "cuda":
            torch.cuda.set_device(rank)
        _join(rank, world, run_dir, device, spec.params.where("native.processes"))
        try:
            result = run(model, spec, workspace=workspace, shard=Shard(rank, world))
            if rank == 0:
                with atomic_file(run_dir / RESULT) as tmp:
                    tmp.write_bytes(pickle.dumps(result))
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the stage, which raises it
        _report(run_dir, rank, e)
        sys.exit(1)


@contextlib.contextmanager
def _environ(defaults: dict[str, str]) -> Iterator[None]:
    """The environment the workers start with: ``defaults`` where this process's has no value."""
    added = [k for k in defaults if k not in os.environ]
    os.environ.update({k: defaults[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def _blocked(signum: int) -> Iterator[None]:
    """``signum`` blocked in this thread (and inherited blocked by the processes it starts)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _watch(processes: list) -> int | None:
    """Wait until every worker is done (None) or one failed (its rank); signals still unwind."""
    while True:
        codes = [p.exitcode for p in processes]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            return failed[0]
        if all(code == 0 for code in codes):
            return None
        multiprocessing.connection.wait([p.sentinel for p in processes if p.exitcode is None], timeout=1.0)
        raise_if_terminated()


def _stop(processes: list) -> None:
    """SIGTERM every worker still running, SIGKILL one that outlives :data:`STOP_SECONDS`; reap all."""
    for p in processes:
        if p.is_alive():
            p.terminate()
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)  # a stopped worker (Ctrl-Z, SIGSTOP) acts on it now
    for p in processes:
        p.join(STOP_SECONDS)
        if p.is_alive():
            p.kill()
            p.join()


def _failure(run_dir: Path, first: int, processes: list) -> BaseException:
    """What stopped the pass: a worker's PipelineError before any other report, else the first failure."""
    reports = {}
    for rank in range(len(processes)):
        path = run_dir / f"failed.{rank}.pkl"
        if path.exists():
            reports[rank] = pickle.loads(path.read_bytes())
    for failure in reports.values():
        if isinstance(failure, PipelineError):
            return failure
    world = len(processes)
    if first in reports:
        return RuntimeError(f"native pass process {first} of {world} failed:\n{reports[first]}")
    code = processes[first].exitcode
    if code < 0:
        how = f"was killed by {signal.Signals(-code).name}" + (" (out of memory?)" if code == -9 else "")
    else:
        how = f"exited with code {code} before it could say why (its stderr above may)"
    return RuntimeError(f"native pass process {first} of {world} {how}")


def run_sharded(
    run: Callable[..., PassResult | None],
    model: nn.Module,
    spec: PassSpec,
    workspace: Path,
    device: torch.device,
) -> PassResult:
    """Start ``processes`` workers that each call ``run`` (the native ``run_pass``) on their shard;
    wait for them and return rank 0's assembled result.

    A worker that fails stops the others, and its error is raised here (a PipelineError as
    itself: one line, exit 2); so is a signal that stops this process. No worker outlives this
    call, nor this process.
    """
    world = spec.params.native.processes
    check_processes(world, device, spec.params.where("native.processes"))
    workspace = workspace.resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    remove_leftovers(workspace / RUN_DIR)  # a killed run's directory
    run_dir = Path(tempfile.mkdtemp(prefix=f".{RUN_DIR}{TMP_TAG}{os.getpid()}-", dir=workspace))
    threads = torch.get_num_threads()
    log.info("native pass on %d processes (%d torch threads each, as one process has)", world, threads)
    context = mp.get_context("spawn")
    processes: list = []
    try:
        # the workers start with SIGINT blocked (a Ctrl-C while they import torch would print a
        # traceback from each); this process gets it as soon as they are started
        with _environ(WORKER_ENV), _blocked(signal.SIGINT):
            for rank in range(world):
                p = context.Process(
                    target=_worker,
                    args=(rank, world, run, model, spec, workspace, run_dir, device, threads, os.getpid()),
                    name=f"native-pass-{rank}of{world}",
                )
                p.start()
                processes.append(p)
        failed = _watch(processes)
        if failed is not None:
            _stop(processes)
            raise _failure(run_dir, failed, processes)
        return pickle.loads((run_dir / RESULT).read_bytes())
    finally:
        _stop(processes)
        shutil.rmtree(run_dir, ignore_errors=True)

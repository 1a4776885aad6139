"""Run a training function in several local processes, as `torchrun --nproc-per-node N` would, from Python.

    figures = run_in_processes(train_fn, (config, folder), processes=2, threads=1)

Each process gets torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR, ...), so the Trainer it builds
runs distributed data parallel (gloo on CPU): every process takes its share of each batch and the gradients are
averaged before the step. `train_fn` must build its TrainingArguments itself (inside the process) and be importable
(a module-level function, as multiprocessing's "spawn" requires); the value rank 0 returns comes back.

Why for the CPU: one process with two threads trains the toy demo's small model only a little faster than one
thread (its matrices are too small to keep two cores busy), while two processes of one thread each, each on half of
every batch, made an SFT step 1.57x faster (docs/LOG.md, 2026-11-27 (CPU, processes)).

When the calling process dies (even by SIGKILL), its training processes are killed too (Linux: PR_SET_PDEATHSIG), so
no orphan keeps training and writing checkpoints into a run that is about to be resumed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago on this machine (for the processes' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when the thread that started it exits."""


def end_process_group() -> None:
    """Close the group Trainer opened (under torchrun or `run_in_processes`), if any: a gloo group left open when the
    interpreter exits aborts the process ("terminate called without an active exception", SIGABRT) after the model
    was saved, so torchrun reports a failed run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave_torchrun_worker(code: int) -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set): flush the logs and streams, then leave at once with `code`.

    A ZeRO-3 worker whose run had finished (model saved, process group closed by `end_process_group`) still aborted
    at interpreter exit in about one test run of three on a 2-core CPU ("terminate called without an active
    exception", SIGABRT from a C++ thread object destroyed during shutdown; docs/LOG.md, 2026-12-05 (fourth and fifth
    sessions)), and torchrun then reports the whole job as failed. `os._exit` skips those destructors; everything the
    run writes is written and flushed before. Outside torchrun it returns and the interpreter exits as usual."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _flush_and_exit(code)


def _flush_and_exit(code: int) -> None:
    """Flush the logs and streams, then end the process at once (no interpreter shutdown, see above)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies. torch's spawn asks for SIGINT, whose KeyboardInterrupt Python can
    lose (an interrupt raised inside a finalizer is printed and dropped): in one CI run under load, both processes of a
    killed demo trained on and saved 6 more checkpoints. SIGKILL needs no cooperation from the process."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def _worker(
    rank: int, fn: Callable, args: tuple, world_size: int, port: int, threads: int, results, parent_pid: int
) -> None:
    _die_with_parent(parent_pid)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        result = fn(*args)
    finally:
        end_process_group()
    if rank == 0:
        results.put(result)  # a synchronous write: it is in the pipe when put returns
    # A finished worker leaves like a torchrun one: rank 1 of two once aborted in the interpreter's shutdown
    # ("terminate called without an active exception", SIGABRT) after its steps, in a clean-clone test run.
    _flush_and_exit(0)


def run_in_processes(fn: Callable[..., Any], args: tuple, processes: int, threads: int = 1) -> Any:
    """`fn(*args)` in `processes` processes of `threads` torch threads each (in this process, with its own thread
    setting, when `processes` is 1); returns rank 0's result. An exception in any process stops them all and is raised here with its traceback."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if processes == 1:
        return fn(*args)
    results = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(
        _worker,
        args=(fn, args, processes, free_port(), threads, results, os.getpid()),
        nprocs=processes,
        join=False,
        start_method="spawn",
    )
    result, received = None, False
    while True:
        # read while rank 0 writes: a result bigger than the pipe's buffer would block its process otherwise
        if not received and not results.empty():
            result, received = results.get(), True
        if context.join(timeout=0.2):  # True when all have exited; raises if one failed
            break
    return result if received else results.get()

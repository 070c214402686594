"""Run a function on N forked ranks of a gloo world and collect the results.

Fork (not spawn) because the parent has already paid the ~6 s of imports
(torch, megatron, transformers, modelopt); a forked multi-rank test then costs
a fraction of a second. The parent must not run torch compute before forking:
a fork taken after torch's intra-op thread pool has started can deadlock, so
all model work happens in the children.

Importing this module imports torch and megatron for the same reason; test
modules should also import ``tests.support.tiny_gpt`` at top level so the
children inherit transformers and modelopt too.

Results travel as plain pickles over one pipe per child: torch's
multiprocessing reducers would share tensors through file descriptors that
die with the child, and the children leave with ``os._exit``.
"""

import multiprocessing
import os
import pickle
import signal
import socket
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .cpu_shims import install_cpu_shims

_ERROR_GRACE_S = 2.0  # after one rank fails, how long the others get to report


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teardown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _child(rank, world_size, port, timeout, conn, fn, args, kwargs, distributed):
    """Body of one rank; always ends in os._exit so no atexit hook can hang."""
    try:
        torch.set_num_threads(1)
        if distributed:
            install_cpu_shims()
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout),
            )
        try:
            message = ("ok", fn(rank, world_size, *args, **kwargs))
        finally:
            _teardown()
        payload = pickle.dumps(message)
    except BaseException:
        payload = pickle.dumps(("error", traceback.format_exc()))
    try:
        conn.send_bytes(payload)
        conn.close()
    finally:
        os._exit(0)


def _kill_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()


def run_ranks(fn, world_size, *args, timeout=120, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` forked ranks.

    Returns the ranks' return values ordered by rank. Raises AssertionError
    with the failing ranks' tracebacks if any rank raises or dies, and
    TimeoutError (after killing every child) if ranks do not finish in
    ``timeout`` seconds.
    """
    return _collect(_run(fn, world_size, args, kwargs, timeout, deaths_ok=False), world_size, timeout)


def run_alone(fn, *args, timeout=120, **kwargs):
    """``fn(*args, **kwargs)`` in one forked process with no process group and no CPU shims, as a command-line tool
    runs.

    Returns its value; raises as ``run_ranks`` does.
    """

    def body(rank, world_size, *args, **kwargs):
        return fn(*args, **kwargs)

    return _collect(_run(body, 1, args, kwargs, timeout, deaths_ok=False, distributed=False), 1, timeout)[0]


def _collect(outcome, world_size, timeout) -> list:
    results, errors, missing = outcome
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} of {world_size} ranks failed:\n{text}")
    if missing:
        raise TimeoutError(f"ranks {missing} did not finish within {timeout} s; all killed")
    return [results[r] for r in range(world_size)]


def run_ranks_allowing_deaths(fn, world_size, *args, timeout=120, **kwargs) -> list:
    """As ``run_ranks``, for tests where ranks die on purpose (killed by a signal, or killing themselves).

    A dying rank does not cut the others short. Returns, per rank, ``("ok", value)``, ``("error",
    traceback)``, ``("died", exit code)`` (negative: the signal) or ``("timeout", None)``.
    """
    results, errors, missing = _run(fn, world_size, args, kwargs, timeout, deaths_ok=True)
    return [
        ("ok", results[r]) if r in results else ("timeout", None) if r in missing else errors[r]
        for r in range(world_size)
    ]


def _run(fn, world_size, args, kwargs, timeout, deaths_ok, distributed=True):
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    readers, procs = {}, []
    for rank in range(world_size):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_child,
            args=(rank, world_size, port, timeout, send, fn, args, kwargs, distributed),
            daemon=True,
        )
        p.start()
        send.close()
        readers[recv] = rank
        procs.append(p)

    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while readers and (remaining := deadline - time.monotonic()) > 0:
            for conn in wait(list(readers), timeout=remaining):
                rank = readers.pop(conn)
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except EOFError:
                    procs[rank].join()
                    status = "error"
                    value = f"rank {rank} died without reporting (exit code {procs[rank].exitcode})"
                    if deaths_ok:
                        status, value = "died", procs[rank].exitcode
                if status == "ok":
                    results[rank] = value
                elif deaths_ok:
                    errors[rank] = (status, value)
                else:
                    errors[rank] = value
                    deadline = min(deadline, time.monotonic() + _ERROR_GRACE_S)
    finally:
        _kill_all(procs)
    return results, errors, sorted(readers.values())

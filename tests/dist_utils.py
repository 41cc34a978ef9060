"""Run a function on N local processes as a torch.distributed job (gloo on CPU).

Used by the multi-process tests: each rank gets torchrun-like environment variables, one
CPU thread, and its return value is shipped back (pickled) in rank order. A failing rank's
traceback becomes an AssertionError in the test process; nothing outlives ``timeout``.

Without CUDA the ranks fork from a ``forkserver`` that imports torch, megatron-core, the
library and the encoder stacks once per test session (``tests/rank_preload.py``): a spawned
rank spent ~7-15 s of CPU on those imports, most of the suite's multi-process time on a 2-core
machine. Each rank still starts from the server's pristine import state (nothing of an earlier
test leaks into it) and runs with the caller's full environment. With CUDA the ranks are
spawned: a process that has touched CUDA cannot be forked, and imports may query the device.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from lumos_mcore.parallel.state import find_free_port

__all__ = ["run_distributed"]


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _context() -> Any:
    """The preloaded ``forkserver`` (started once) without CUDA; ``spawn`` where CUDA is."""
    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.rank_preload"])
    # The server's torch reads the thread counts when it is imported: give it the ranks' values.
    # It imports from the repository root whatever the caller's working directory.
    server_env = {
        **_THREAD_ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH")))),
    }
    saved = {k: os.environ.get(k) for k in server_env}
    os.environ.update(server_env)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        _restore(saved)
    return ctx


def _restore(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _worker(
    rank: int,
    world_size: int,
    env: dict[str, str],
    forked: bool,
    call: bytes,
    results: Any,
) -> None:
    # A forked rank holds the server's environment: replace it with the caller's.
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(1)
    if forked:
        _fork_checkpoint_results_queue()
    try:
        fn, args, kwargs = pickle.loads(call)
        out = fn(rank, world_size, *args, **kwargs)
        payload = ("ok", pickle.dumps(out))  # plain pickle: copies tensors, no shared memory
    except BaseException:
        payload = ("error", traceback.format_exc())
    finally:
        _cleanup()
    results.put((rank, *payload))


def _fork_checkpoint_results_queue() -> None:
    """Give megatron's checkpoint writer its results queue from a forked manager.

    ``dist_checkpointing`` collects the writers' results through a manager queue that it
    spawns on a process's first save; that fresh server then imports torch to unpickle them,
    ~3 s of CPU per saving rank. Forked here, while the new rank is still single-threaded, the
    server already holds torch. Only the queue's origin changes; what megatron does with it
    is the same (and nothing happens where the module lacks this global).
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def _cleanup() -> None:
    """Tear down megatron's parallel state and the process group, if this rank made them."""
    import sys

    import torch.distributed as dist

    try:
        if "megatron.core.parallel_state" in sys.modules:  # don't import megatron just for this
            from lumos_mcore.parallel.state import destroy_parallel

            destroy_parallel()
        elif dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def _kill(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240, **kwargs: Any
) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` local processes.

    ``fn`` must be a picklable top-level function; returns the ranks' return values in rank
    order. Raises AssertionError with the failing rank's traceback, or on timeout.
    """
    ctx = _context()
    forked = ctx.get_start_method() == "forkserver"
    # Plain pickle copies tensors: multiprocessing would pass each one's shared memory as a
    # file descriptor, and a forkserver takes at most a few hundred per process.
    call = pickle.dumps((fn, args, kwargs))
    results = ctx.Queue()
    port = str(find_free_port())
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        **_THREAD_ENV,
    }
    saved = {k: os.environ.get(k) for k in (*env, "RANK", "LOCAL_RANK")}
    procs = []
    try:
        for rank in range(world_size):
            # Spawned children copy os.environ at start(): set it so that the env is in
            # place before the child's torch (and OpenMP) initialise.
            os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, dict(os.environ), forked, call, results),
                daemon=False,  # ranks may start helpers (dist_checkpointing's writers)
            )
            p.start()
            procs.append(p)
    finally:
        _restore(saved)

    deadline = time.monotonic() + timeout
    outputs: dict[int, Any] = {}
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise AssertionError(
                    f"run_distributed({fn.__name__}, world_size={world_size}) timed out after "
                    f"{timeout:.0f}s; ranks {missing} did not finish"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if r not in outputs and not p.is_alive() and p.exitcode not in (0, None)
                ]
                if dead:
                    # Give a crashed rank's queued message a moment to arrive before judging.
                    try:
                        rank, status, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        raise AssertionError(
                            f"rank {dead[0]} of {fn.__name__} died with exit code "
                            f"{procs[dead[0]].exitcode} without reporting"
                        ) from None
                else:
                    continue
            if status == "error":
                raise AssertionError(f"rank {rank} of {fn.__name__} failed:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        if len(outputs) == world_size:
            for p in procs:
                p.join(timeout=10)
        _kill(procs)
        results.close()
        results.join_thread()
    return [outputs[r] for r in range(world_size)]

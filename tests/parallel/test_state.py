"""init_distributed / initialize_parallel / destroy_parallel and the CPU backend's switch.

Each check runs in a spawned process because it creates process groups and patches
megatron-core module state, which must not leak into the test process.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import pytest
import torch

from tests.dist_utils import run_distributed

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")


def _single_process_job(rank: int, world_size: int) -> dict[str, Any]:
    """No torchrun environment at all: a one-rank gloo job on a free port."""
    import importlib

    import torch.distributed as dist

    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel import (
        apply_cpu_backend,
        cpu_backend_active,
        destroy_parallel,
        init_distributed,
        initialize_parallel,
    )

    for var in _TORCHRUN_VARS:
        os.environ.pop(var, None)
    out: dict[str, Any] = {}

    # On a CUDA machine the backend must leave megatron-core untouched.
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        out["cuda_noop"] = apply_cpu_backend()
        out["cuda_untouched"] = mappings.torch is torch and not cpu_backend_active()
    finally:
        torch.cuda.is_available = real_is_available

    out["init"] = init_distributed()
    out["backend"] = dist.get_backend()
    out["active"] = cpu_backend_active()
    out["threads"] = torch.get_num_threads()
    out["cores"] = len(os.sched_getaffinity(0))
    shim = mappings.torch
    out["idempotent"] = apply_cpu_backend() and mappings.torch is shim and shim is not torch
    out["init_again"] = init_distributed()  # already initialised: a no-op

    try:
        initialize_parallel(ParallelConfig(tp=2), num_attention_heads=4, num_layers=2)
    except ValueError as err:
        out["invalid"] = str(err)
    info = initialize_parallel(ParallelConfig(), num_attention_heads=4, num_layers=2, seed=7)
    out["info"] = info
    out["default_rand"] = torch.rand(3)  # the data-parallel stream is seeded with `seed`
    destroy_parallel()
    out["destroyed"] = not dist.is_initialized()
    destroy_parallel()  # repeat is harmless
    return out


def test_single_process_without_torchrun_env() -> None:
    (res,) = run_distributed(_single_process_job, 1, timeout=120)
    if not torch.cuda.is_available():
        assert res["cuda_noop"] is False and res["cuda_untouched"]
        assert res["backend"] == "gloo" and res["active"] and res["idempotent"]
        assert res["threads"] == max(1, res["cores"])  # one local rank owns every core
    assert res["init"] == (0, 1) and res["init_again"] == (0, 1)
    assert res["invalid"].startswith("parallel.tp=2: world size 1 is not divisible")
    info = res["info"]
    assert (info.world_size, info.dp_size, info.tp_size, info.pp_size, info.cp_size) == (1,) * 5
    assert info.is_first_stage and info.is_last_stage
    torch.testing.assert_close(
        res["default_rand"], torch.rand(3, generator=torch.Generator().manual_seed(7))
    )
    assert res["destroyed"]


def _failing_job(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("rank one exploded")
    import torch.distributed as dist

    from lumos_mcore.parallel import init_distributed

    init_distributed()
    dist.barrier()  # rank 1 never joins: run_distributed must not wait for this


def test_run_distributed_reports_failing_rank() -> None:
    with pytest.raises(AssertionError, match=r"rank 1 of _failing_job failed:(.|\n)*exploded"):
        run_distributed(_failing_job, 2, timeout=60)


def _hanging_job(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_run_distributed_times_out_and_kills_ranks() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 5s; ranks \[0, 1\] did not finish"):
        run_distributed(_hanging_job, 2, timeout=5)
    assert time.monotonic() - start < 30
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


@pytest.mark.parametrize(
    "env, want",
    [
        ({"LOCAL_RANK": "3", "SLURM_LOCALID": "1"}, 3),  # torchrun's wins
        ({"SLURM_LOCALID": "1"}, 1),  # srun without torchrun
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}, 2),  # mpirun
        ({}, 5),  # nothing: the global rank (one node)
    ],
)
def test_local_rank_from_env(monkeypatch, env, want):
    from lumos_mcore.parallel.state import local_rank_from_env

    for var in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert local_rank_from_env(5) == want


def test_cuda_device_index_with_one_visible_gpu_per_process():
    from lumos_mcore.parallel.state import cuda_device_index

    assert [cuda_device_index(r, 8) for r in (0, 7)] == [0, 7]
    assert [cuda_device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # --gpus-per-task=1
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES"):
        cuda_device_index(0, 0)
    with pytest.raises(RuntimeError, match="local rank 4 but only 4 CUDA devices"):
        cuda_device_index(4, 4)  # two ranks would share a GPU


def test_local_world_size_from_env(monkeypatch):
    from lumos_mcore.parallel.state import local_world_size_from_env

    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert local_world_size_from_env(16) == 16
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")  # uneven nodes: not a count
    assert local_world_size_from_env(16) == 16
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8")
    assert local_world_size_from_env(16) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_world_size_from_env(16) == 2

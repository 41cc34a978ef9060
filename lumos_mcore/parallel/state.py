"""Process-group set-up: torch.distributed + megatron-core parallel state.

``init_distributed`` starts torch.distributed from torchrun's environment (or alone, for a
single process), ``initialize_parallel`` builds megatron's TP/PP/CP/DP groups from a
validated ``ParallelConfig`` and seeds the model-parallel RNG tracker, ``destroy_parallel``
tears both down. On machines without CUDA the gloo backend is used and megatron-core is
redirected to CPU by :func:`lumos_mcore.parallel.cpu_backend.apply_cpu_backend`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.parallel.cpu_backend import apply_cpu_backend

__all__ = [
    "ParallelInfo",
    "cuda_device_index",
    "destroy_parallel",
    "find_free_port",
    "init_distributed",
    "initialize_parallel",
    "local_rank_from_env",
    "local_world_size_from_env",
]


def find_free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_rank_from_env(rank: int) -> int:
    """This process's rank on its node: torchrun's ``LOCAL_RANK``, else SLURM's ``SLURM_LOCALID``
    or Open MPI's ``OMPI_COMM_WORLD_LOCAL_RANK`` (``srun`` / ``mpirun`` without torchrun), else
    the global rank (one node)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if os.environ.get(var, "").strip():
            return int(os.environ[var])
    return rank


def local_world_size_from_env(world_size: int) -> int:
    """Processes on this node: torchrun's ``LOCAL_WORLD_SIZE``, SLURM's
    ``SLURM_NTASKS_PER_NODE`` or Open MPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``, else the world size
    (one node); sets each CPU process's share of the cores."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(var, "").strip()
        if value.isdigit():  # SLURM may write "4(x2)" for uneven nodes: not a plain count
            return int(value)
    return world_size


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of this process: ``local_rank`` among the visible devices.

    A launcher that gives each process only its own GPU (``srun --gpus-per-task=1``, or a
    per-rank ``CUDA_VISIBLE_DEVICES``) leaves one visible device: index 0 for every local
    rank. With several visible devices, a local rank beyond them is a launch error (two ranks
    would share a GPU).
    """
    if device_count < 1:
        raise RuntimeError("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES?)")
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        raise RuntimeError(
            f"local rank {local_rank} but only {device_count} CUDA devices are visible: launch "
            "at most one process per GPU (torchrun --nproc-per-node, srun --ntasks-per-node)"
        )
    return local_rank


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group; return ``(rank, world_size)``.

    Reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
    without them runs as a single process on a free local port. Uses nccl (and binds the
    local CUDA device) when CUDA is available, gloo otherwise; on CPU applies the megatron
    CPU backend and caps torch threads so co-located ranks do not oversubscribe the cores.
    Calling it again once initialised is a no-op.
    """
    has_cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if has_cuda else "gloo"
    if not has_cuda:
        apply_cpu_backend()

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = local_rank_from_env(rank)
        local_world_size = local_world_size_from_env(world_size)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise RuntimeError(
                    f"RANK/WORLD_SIZE are set (world size {world_size}) but MASTER_PORT is "
                    "not; launch with torchrun or export MASTER_ADDR and MASTER_PORT"
                )
            os.environ["MASTER_PORT"] = str(find_free_port())
    else:
        rank, world_size, local_rank, local_world_size = 0, 1, 0, 1
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))

    if backend == "nccl":
        torch.cuda.set_device(cuda_device_index(local_rank, torch.cuda.device_count()))
    elif not has_cuda:
        torch.set_num_threads(max(1, _cpu_cores() // max(1, local_world_size)))

    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=world_size,
    )
    return rank, world_size


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's coordinates in the parallel layout (sizes are group sizes)."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_rank: int
    cp_size: int
    vpp_size: int | None = None

    @property
    def is_first_stage(self) -> bool:
        """This rank runs the first pipeline stage (owns the input embedders)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank runs the last pipeline stage (computes the loss)."""
        return self.pp_rank == self.pp_size - 1


def initialize_parallel(
    cfg: ParallelConfig,
    *,
    num_attention_heads: int,
    num_layers: int,
    seed: int = 1234,
    seq_len: int | None = None,
) -> ParallelInfo:
    """Validate ``cfg``, build megatron's parallel groups and seed the RNG tracker.

    Starts torch.distributed first if needed. An existing megatron parallel state is torn
    down and rebuilt, so this can be called again with another layout. The seed gives the
    data-parallel RNG stream (same on all ranks) and the per-TP-rank model-parallel stream
    used by megatron's ``get_cuda_rng_tracker().fork()`` (the CPU generator on CPU).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    _, world_size = init_distributed()
    cfg.validate(
        world_size,
        num_attention_heads=num_attention_heads,
        num_layers=num_layers,
        seq_len=seq_len,
    )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.vpp,
        context_parallel_size=cfg.cp,
    )
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=world_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_size=parallel_state.get_context_parallel_world_size(),
        vpp_size=cfg.vpp,
    )


def destroy_parallel() -> None:
    """Tear down megatron's parallel state and the default process group (safe to repeat)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

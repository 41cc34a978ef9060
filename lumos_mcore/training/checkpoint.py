"""Sharded, atomic, resumable checkpoints on megatron ``dist_checkpointing``.

Layout under the checkpoint root::

    iter_0000500/          a complete checkpoint (dist_checkpointing format)
    iter_0001000.partial/  a save in progress (or killed mid-way): never loaded, removed on start
    latest                 text file naming the newest complete checkpoint (replaced atomically)

A save writes into ``*.partial``; only after every rank has finished does rank 0 rename it and
then replace ``latest``. A crash at any moment therefore leaves the previous checkpoint intact
and ``latest`` pointing at it. Weights are stored by *global* sharded keys, so a checkpoint
saved at one TP/PP/DP layout loads at another.

Contents: model weights (``model`` / ``model<i>`` per virtual stage), optimizer state, EMA weights
(``ema.*`` keys), lr schedule, the training state (step, consumed samples, data-loader state,
the config) and each rank's RNG states (restored when the world size is unchanged).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch import nn

from lumos_mcore.training.ema import EMA
from lumos_mcore.training.setup import unwrap

log = logging.getLogger(__name__)

_PARTIAL = ".partial"
# Optimizer state stored per parameter in model space, so a checkpoint reshards across
# TP / PP / DP like the weights (the distributed optimizer gathers its shards on save).
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
_LATEST = "latest"


def _iter_dir(step: int) -> str:
    return f"iter_{step:07d}"


def _model_sharded_state_dict(chunks: list[nn.Module]) -> dict[str, Any]:
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded(world: int) -> ShardedObject:
    rank = dist.get_rank()
    return ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Save / find / load training checkpoints under one root folder."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    # -- discovery -------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """Newest complete checkpoint (``latest`` file, else the highest ``iter_*`` folder)."""
        marker = self.root / _LATEST
        if marker.is_file():
            path = self.root / marker.read_text().strip()
            if path.is_dir():
                return path
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir() and _PARTIAL not in p.name)
        return done[-1] if done else None

    def remove_partial(self) -> None:
        """Drop saves that never completed (a run killed mid-save); rank 0 only."""
        if dist.get_rank() == 0 and self.root.is_dir():
            for p in self.root.glob(f"iter_*{_PARTIAL}"):
                log.warning("removing incomplete checkpoint %s", p)
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    # -- save ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        chunks: list[nn.Module],
        optimizer,
        scheduler,
        ema: EMA | None,
        train_state: dict[str, Any],
    ) -> Path:
        final = self.root / _iter_dir(step)
        partial = self.root / (_iter_dir(step) + _PARTIAL)
        if dist.get_rank() == 0:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        dist.barrier()

        state = _model_sharded_state_dict(chunks)
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_OPTIM_METADATA)
        if ema is not None:
            state["ema"] = ema.sharded_state_dict(chunks)
        state["scheduler"] = scheduler.state_dict()
        state["train_state"] = dict(train_state, world_size=dist.get_world_size())
        state["rng_state"] = _rng_sharded(dist.get_world_size())
        dist_checkpointing.save(state, str(partial))
        dist.barrier()

        if dist.get_rank() == 0:
            if final.exists():  # re-saving the same step (e.g. after a resume)
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = self.root / (_LATEST + ".tmp")
            tmp.write_text(final.name + "\n")
            with open(tmp) as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.root / _LATEST)
            _fsync_dir(self.root)
            self._prune(keep=final)
        dist.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir() and _PARTIAL not in p.name)
        for old in done[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------
    def load(
        self,
        path: str | os.PathLike,
        chunks: list[nn.Module],
        optimizer=None,
        scheduler=None,
        ema: EMA | None = None,
    ) -> dict[str, Any]:
        """Restore into the given objects (any may be None to skip); returns the train state."""
        path = Path(path)
        common = dist_checkpointing.load_common_state_dict(str(path))
        state = _model_sharded_state_dict(chunks)
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(
                state, is_loading=True, metadata=_OPTIM_METADATA
            )
        if ema is not None:
            state["ema"] = ema.sharded_state_dict(chunks)
        same_world = common["train_state"].get("world_size") == dist.get_world_size()
        if same_world:
            state["rng_state"] = _rng_sharded(dist.get_world_size())
        loaded = dist_checkpointing.load(state, str(path))

        for i, chunk in enumerate(chunks):
            key = "model" if len(chunks) == 1 else f"model{i}"
            unwrap(chunk).load_state_dict(loaded[key], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
        if ema is not None:
            ema.load_state_dict(loaded["ema"])
        if scheduler is not None:
            scheduler.load_state_dict(common["scheduler"])
        if same_world:
            _set_rng_state(loaded["rng_state"])
        else:
            log.info("world size changed since the save: RNG states start fresh")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return common["train_state"]

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

import dataclasses
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
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from torch import nn

from lumos_mcore.training.compat import apply_optimizer_checkpoint_fix
from lumos_mcore.training.ema import EMA
from lumos_mcore.training.setup import unwrap, use_fused_torch_adamw

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


def _prime_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam state (incl. ``step``) before a load.

    The distributed optimizer builds its loading template from ``state_dict()``, which needs
    per-parameter state to exist; megatron's own ``init_state_fn`` omits torch Adam's ``step``.
    The loaded values overwrite all of it.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                    st["step"] = torch.tensor(0.0)


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor after a load.

    megatron's distributed optimizer (torch AdamW path, no Apex/TE) restores ``step`` as one
    tensor object shared by all parameter states; torch's foreach AdamW then increments that
    shared tensor once per parameter, corrupting the bias correction from the next step on.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


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
        if common["train_state"].get("weights_only"):
            state, _ = self.load_weights(path, chunks, optimizer, ema, strict=True)
            return state
        state = _model_sharded_state_dict(chunks)
        if optimizer is not None:
            apply_optimizer_checkpoint_fix()
            _prime_optimizer_state(optimizer)
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
            _unshare_adam_steps(optimizer)
            use_fused_torch_adamw(optimizer)  # the loaded param groups carry their options
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

    def load_weights(
        self,
        path: str | os.PathLike,
        chunks: list[nn.Module],
        optimizer=None,
        ema: EMA | None = None,
        *,
        strict: bool = True,
        from_ema: bool = False,
    ) -> tuple[dict[str, Any], WeightsReport]:
        """Weights only (a converted export, or a previous stage's training checkpoint): the
        optimizer state, lr schedule, step and RNG are not read, so training starts fresh.

        ``path`` is a checkpoint folder or a checkpoint root (its newest complete checkpoint).
        Keys are matched by global sharded key and global shape, so any saved TP / PP layout
        loads. ``strict``: a model key missing from the checkpoint, a stored weight the model
        has no slot for, or a shape mismatch raises ``ValueError`` naming the keys; otherwise
        those keys are skipped (missing ones keep their initialisation) and reported.
        ``from_ema`` starts the model from the stored EMA weights. The EMA (if kept) takes the
        stored EMA where there is one, else restarts from the loaded weights. Returns the
        stored train state with ``step`` 0, and the report.
        """
        path = resolve_checkpoint(path)
        common = dist_checkpointing.load_common_state_dict(str(path))
        stored = {
            k: v
            for k, v in dist_checkpointing.load_tensors_metadata(str(path)).items()
            if isinstance(v, ShardedTensor)
        }
        has_ema = any(k.startswith(_EMA) for k in stored)
        if from_ema and not has_ema:
            raise ValueError(f"{path}: no EMA weights stored; drop checkpoint.init_from_ema")
        prefix = _EMA if from_ema else ""
        report = WeightsReport(str(path))
        request: dict[str, Any] = {}
        keep: list[set[str]] = []
        for i, chunk in enumerate(chunks):
            wanted, names = {}, set()
            for name, sh in unwrap(chunk).sharded_state_dict().items():
                if not isinstance(sh, ShardedTensor):
                    continue  # extra state objects: not weights
                key = prefix + sh.key
                if key not in stored:
                    report.missing.append(sh.key)
                    continue
                if tuple(stored[key].global_shape) != tuple(sh.global_shape):
                    got = tuple(stored[key].global_shape)
                    report.mismatched.append((sh.key, got, tuple(sh.global_shape)))
                    continue
                # fp32 buffers: EMA shadows are fp32 while bf16 runs hold bf16 weights
                data = torch.empty(sh.local_shape, dtype=torch.float32, device=sh.data.device)
                wanted[name] = dataclasses.replace(sh, key=key, data=data, dtype=torch.float32)
                names.add(name)
                report.loaded.append(sh.key)
            request[f"chunk{i}"] = wanted
            keep.append(names)
        # Every rank judges the whole model (pipeline stages hold different keys), so all
        # agree on strict failures and nothing owned by another stage counts as unexpected.
        mine = (report.loaded, report.missing, report.mismatched)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        report.loaded = [k for r in everyone for k in r[0]]
        report.missing = [k for r in everyone for k in r[1]]
        report.mismatched = sorted({tuple(m) for r in everyone for m in r[2]})
        requested = set(report.loaded) | set(report.missing) | {k for k, *_ in report.mismatched}
        report.unexpected = sorted(
            k[len(prefix) :]
            for k in stored
            if k.startswith(prefix)
            and not k.startswith(_NOT_WEIGHTS)
            and (prefix or not k.startswith(_EMA))
            and k[len(prefix) :] not in requested
        )
        report.missing, report.loaded = sorted(set(report.missing)), sorted(set(report.loaded))
        if strict and not report.ok:
            raise ValueError(
                f"checkpoint {path} does not fit the model: {report.describe()}; set "
                "checkpoint.init_strict=false to load the matching keys only"
            )
        loaded = dist_checkpointing.load(request, str(path))
        with torch.no_grad():
            for i, chunk in enumerate(chunks):
                params = dict(unwrap(chunk).state_dict(keep_vars=True))
                for name in keep[i]:
                    params[name].copy_(loaded[f"chunk{i}"][name])
        if optimizer is not None and hasattr(optimizer, "reload_model_params"):
            # Mixed precision keeps fp32 main copies of the weights: refresh them, or the first
            # step would write the initial weights back (bf16 on GPU).
            optimizer.reload_model_params()
        if ema is not None:
            ema.reset(chunks)
            if has_ema and not from_ema:
                self._load_ema_where_stored(path, stored, chunks, ema, keep)
        log.info(
            "loaded weights from %s (no optimizer state: training starts at step 0)%s",
            path,
            "" if report.ok else f"; {report.describe()}",
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {**common["train_state"], "step": 0}, report

    @staticmethod
    def _load_ema_where_stored(path: Path, stored: dict, chunks, ema: EMA, keep) -> None:
        """The stored EMA for the loaded weights that have one (others keep the reset)."""
        request = {}
        for i, chunk_sd in enumerate(ema.sharded_state_dict(chunks).values()):
            request[f"chunk{i}"] = {
                n: sh
                for n, sh in chunk_sd.items()
                if n in keep[i]
                and sh.key in stored
                and tuple(stored[sh.key].global_shape) == tuple(sh.global_shape)
            }
        loaded = dist_checkpointing.load(request, str(path))
        for i, shadow in enumerate(ema.shadow):
            for name, tensor in loaded[f"chunk{i}"].items():
                shadow[name].copy_(tensor)


_EMA = "ema."
_NOT_WEIGHTS = ("optimizer.", "rng_state", "ema.optimizer.")


@dataclasses.dataclass
class WeightsReport:
    """What a weights-only load matched (global sharded keys)."""

    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)  # in the model, not stored
    unexpected: list[str] = dataclasses.field(default_factory=list)  # stored, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 8) -> str:
        """One line naming the keys that did not load (up to ``limit`` of each kind)."""

        def few(items: list) -> str:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(str(x) for x in items[:limit]) + more

        parts = [f"{len(self.loaded)} loaded"]
        if self.missing:
            parts.append(f"missing (kept initialisation): {few(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (ignored): {few(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} checkpoint {a} vs model {b}" for k, a, b in self.mismatched]
            parts.append(f"shape mismatch (kept initialisation): {few(shapes)}")
        return "; ".join(parts)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder as given, or the newest complete checkpoint under a checkpoint root."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    found = Checkpointer(path).latest()
    if found is None:
        raise FileNotFoundError(f"{path}: not a megatron checkpoint folder or checkpoint root")
    return found


def save_weights_only(
    path: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write full (unsharded) megatron-named weights as a ``dist_checkpointing`` checkpoint.

    Keys are megatron's global sharded keys, so the result loads at any TP / PP / CP layout.
    Written into ``<path>.partial`` and renamed when complete. Needs torch.distributed (one
    process is enough).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    path = Path(path)
    partial = path.with_name(path.name + _PARTIAL)
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    state: dict[str, Any] = {
        "model": _sharded_full_weights(weights, ShardedTensor),
        "train_state": {
            "step": 0,
            "weights_only": True,
            "has_ema": ema is not None,
            "model_config": model_config,
            "world_size": dist.get_world_size(),
        },
    }
    if ema is not None:
        state["ema"] = {
            k: ShardedTensor.from_rank_offsets(
                f"ema.{k}", v.contiguous(), replica_id=dist.get_rank()
            )
            for k, v in ema.items()
        }
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        os.replace(partial, path)
    dist.barrier()
    return path


def read_full_weights(path: str | os.PathLike, *, ema: bool = False) -> tuple[dict, dict]:
    """``(weights, model_config)`` of a checkpoint, as full tensors with megatron global names.

    ``ema=True`` returns the EMA weights (error if the checkpoint has none). Accepts a checkpoint
    folder or a checkpoint root (then its newest complete checkpoint).
    """
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    path = resolve_checkpoint(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    model_config = common["train_state"].get("model_config")
    if model_config is None:
        raise ValueError(f"{path}: checkpoint has no model config (train_state.model_config)")
    tensors = {k: v for k, v in load_plain_tensors(str(path)).items() if torch.is_tensor(v)}
    prefix = "ema."
    if ema:
        weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"{path}: no EMA weights stored; drop --ema")
    else:
        weights = {k: v for k, v in tensors.items() if not k.startswith((prefix, "optimizer."))}
    weights = {k: v for k, v in weights.items() if not k.endswith("_extra_state")}
    return _unstack_layers(weights), model_config


_LAYERS = "decoder.layers."


def _unstack_layers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron stores homogeneous layers as one tensor per name with a leading layer axis
    (``decoder.layers.<name>`` of shape ``[L, ...]``); split them into per-layer names."""
    out = {}
    for key, value in weights.items():
        rest = key[len(_LAYERS) :] if key.startswith(_LAYERS) else None
        if rest is not None and not rest.split(".", 1)[0].isdigit():
            for i, layer in enumerate(value.unbind(0)):
                out[f"{_LAYERS}{i}.{rest}"] = layer.clone()
        else:
            out[key] = value
    return out


def _sharded_full_weights(weights: dict[str, torch.Tensor], sharded_cls, prefix: str = "") -> dict:
    """Full tensors as ShardedTensors under the keys a LumosDiT's sharded state dict uses:
    per-layer tensors become slices ``i`` of the stacked ``decoder.layers.<name>`` tensor."""
    rank = dist.get_rank()
    num_layers = 1 + max(
        (int(k[len(_LAYERS) :].split(".", 1)[0]) for k in weights if k.startswith(_LAYERS)),
        default=-1,
    )
    out = {}
    for key, value in weights.items():
        value = value.contiguous()
        if key.startswith(_LAYERS):
            index, rest = key[len(_LAYERS) :].split(".", 1)
            out[key] = sharded_cls.from_rank_offsets(
                f"{prefix}{_LAYERS}{rest}",
                value,
                (0, int(index), num_layers),
                replica_id=rank,
                prepend_axis_num=1,
            )
        else:
            out[key] = sharded_cls.from_rank_offsets(f"{prefix}{key}", value, replica_id=rank)
    return out

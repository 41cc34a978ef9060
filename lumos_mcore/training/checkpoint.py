"""Sharded, atomic, resumable checkpoints on megatron ``dist_checkpointing``.

Layout under the checkpoint root::

    iter_0000500/          a complete checkpoint (dist_checkpointing format)
    iter_0001000.partial/  a save in progress (or killed mid-way): never loaded, removed on start
    latest                 text file naming the newest complete checkpoint (replaced atomically)

A save writes into ``*.partial``; only after every rank has finished does rank 0 rename it and
then replace ``latest``. A crash at any moment therefore leaves the previous checkpoint intact
and ``latest`` pointing at it. Weights are stored by *global* sharded keys, so a checkpoint
saved at one TP/PP/DP layout loads at another.

``checkpoint.async_save``: the sharded tensors are written by a forked writer process while
training goes on (megatron's ``async_sharded_save`` + ``AsyncCallsQueue``); on GPU they are
first copied to host memory, on CPU the fork's copy-on-write pages freeze them. The rename
and ``latest`` happen in the request's finalize step, once every rank's writer is done, so a
crash during the background write still leaves only a ``*.partial``. One save is in flight at a
time: the next save, the end of the run and a stop signal wait for it.

Contents: model weights (``model`` / ``model<i>`` per virtual stage), optimizer state, EMA weights
(``ema.*`` keys), lr schedule, the training state (step, consumed samples, data-loader state,
the config) and each rank's RNG states (restored when the world size is unchanged).

Weights-only starts (``checkpoint.init_from``, :meth:`Checkpointer.load_weights`) also read a
Hugging Face (diffusers) model folder or a Lumos / PixArt ``.pth`` / ``.safetensors`` file,
converted by ``lumos_mcore.convert`` and sliced for each rank's TP shards / PP stages.
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
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch import nn

from lumos_mcore.durable import atomic_write_text, fsync_dir
from lumos_mcore.training.compat import apply_optimizer_checkpoint_fix
from lumos_mcore.training.ema import EMA
from lumos_mcore.training.setup import unwrap, use_fused_torch_adamw

log = logging.getLogger(__name__)

_PARTIAL = ".partial"
# A step's previous save while a re-save of that step moves in (a name every reader skips,
# as it contains _PARTIAL); restored by remove_partial when the move never completed.
_REPLACED = _PARTIAL + ".old"
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


class Checkpointer:
    """Save / find / load training checkpoints under one root folder."""

    def __init__(
        self,
        root: str | os.PathLike,
        keep_last: int = 2,
        async_save: bool = False,
        keep_every: int = 0,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every  # steps that are multiples of it are never pruned
        self.async_save = async_save
        self._queue: AsyncCallsQueue | None = None  # created by the first async save
        self._pending: Path | None = None  # the async save in flight

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
            for p in self.root.glob(f"iter_*{_REPLACED}"):
                final = p.with_name(p.name[: -len(_REPLACED)])
                if final.is_dir():  # the re-save landed: the old copy is garbage
                    shutil.rmtree(p, ignore_errors=True)
                else:  # killed between the two renames: the previous save is still good
                    log.warning("restoring checkpoint %s (its re-save never completed)", final)
                    os.replace(p, final)
            fsync_dir(self.root)
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
        """Write step ``step``; returns its final folder. With ``async_save`` the folder
        appears once the background write is finalized (:meth:`finalize`)."""
        self.finalize(blocking=True)  # one save in flight at a time
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
        if not self.async_save:
            dist_checkpointing.save(state, str(partial))
            dist.barrier()
            self._commit(step)
            return final
        request = dist_checkpointing.save(state, str(partial), async_sharded_save=True)
        request.add_finalize_fn(lambda: self._commit(step))
        if self._queue is None:
            self._queue = AsyncCallsQueue(persistent=False)
        self._queue.schedule_async_request(request)
        self._pending = final
        return final

    def _commit(self, step: int) -> None:
        """Every rank's shards are on disk: rename the partial save and point ``latest`` at
        it (rank 0), then let every rank go on."""
        final = self.root / _iter_dir(step)
        partial = self.root / (_iter_dir(step) + _PARTIAL)
        if dist.get_rank() == 0:
            replaced = self.root / (_iter_dir(step) + _REPLACED)
            if final.exists():  # re-saving the same step (e.g. after a resume): keep the old
                shutil.rmtree(replaced, ignore_errors=True)  # copy until the new one is in
                os.replace(final, replaced)
            os.replace(partial, final)
            shutil.rmtree(replaced, ignore_errors=True)
            atomic_write_text(self.root / _LATEST, final.name + "\n")
            self._prune(keep=final)
        dist.barrier()

    def finalize(self, blocking: bool = False) -> Path | None:
        """Commit an async save whose writers are done on every rank (all ranks call this;
        it agrees over one all-reduce). ``blocking`` waits for it. Returns the committed
        folder, or None when nothing was committed. A writer's error is raised here, on
        every rank, and the checkpoint stays ``*.partial``."""
        if self._queue is None or self._pending is None:
            return None
        if not self._queue.maybe_finalize_async_calls(blocking=blocking):
            return None
        done, self._pending = self._pending, None
        log.info("checkpoint %s written in the background", done.name)
        return done

    @property
    def save_in_flight(self) -> bool:
        return self._pending is not None

    def _prune(self, keep: Path) -> None:
        """Delete complete checkpoints older than the newest ``keep_last``, except ``keep``
        (the one just written) and the milestones every ``keep_every`` steps."""
        if self.keep_last <= 0:
            return
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir() and _PARTIAL not in p.name)
        for old in done[: -self.keep_last]:
            if old == keep or self._milestone(old):
                continue
            shutil.rmtree(old, ignore_errors=True)

    def _milestone(self, path: Path) -> bool:
        if self.keep_every <= 0:
            return False
        try:
            step = int(path.name[len("iter_") :])
        except ValueError:  # a folder this class did not name: not ours to judge, keep it
            return True
        return step % self.keep_every == 0

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

        ``path`` is a megatron checkpoint folder or checkpoint root (its newest complete
        checkpoint), or any other source :func:`detect_init_source` recognises (a diffusers
        folder, a ``.pth`` / ``.safetensors`` file; see :func:`_load_converted_weights`).
        Keys are matched by global sharded key and global shape, so any saved TP / PP layout
        loads. ``strict``: a model key missing from the checkpoint, a stored weight the model
        has no slot for, or a shape mismatch raises ``ValueError`` naming the keys; otherwise
        those keys are skipped (missing ones keep their initialisation) and reported.
        ``from_ema`` starts the model from the stored EMA weights. The EMA (if kept) takes the
        stored EMA where there is one, else restarts from the loaded weights. Returns the
        stored train state with ``step`` 0, and the report.
        """
        kind = detect_init_source(path)
        if kind != "mcore":
            return _load_converted_weights(
                path, kind, chunks, optimizer, ema, strict=strict, from_ema=from_ema
            )
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
        requested = _gather_report(report)
        report.unexpected = sorted(
            k[len(prefix) :]
            for k in stored
            if k.startswith(prefix)
            and not k.startswith(_NOT_WEIGHTS)
            and (prefix or not k.startswith(_EMA))
            and k[len(prefix) :] not in requested
        )
        if strict and not report.ok:
            raise _does_not_fit(f"checkpoint {path}", report)
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


def _gather_report(report: WeightsReport) -> set[str]:
    """Merge the ranks' loaded / missing / mismatched keys into ``report`` (sorted, deduplicated)
    and return every key some rank asked for.

    Every rank judges the whole model (pipeline stages hold different keys), so all agree on
    strict failures and nothing owned by another stage counts as unexpected.
    """
    mine = (report.loaded, report.missing, report.mismatched)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    report.loaded = sorted({k for r in everyone for k in r[0]})
    report.missing = sorted({k for r in everyone for k in r[1]})
    report.mismatched = sorted({tuple(m) for r in everyone for m in r[2]})
    return set(report.loaded) | set(report.missing) | {k for k, *_ in report.mismatched}


def _does_not_fit(what: str, report: WeightsReport) -> ValueError:
    return ValueError(
        f"{what} does not fit the model: {report.describe()}; set "
        "checkpoint.init_strict=false to load the matching keys only"
    )


# -- weights-only starts from other formats (checkpoint.init_from) ---------------------------
# What ``checkpoint.init_from`` accepts besides megatron checkpoints, by detect_init_source kind.
INIT_SOURCE_KINDS = {
    "mcore": "megatron checkpoint",
    "hf": "Hugging Face (diffusers) LumosTransformer2DModel / LumosTransformer3DModel folder",
    "pixart-diffusers": "diffusers PixArtTransformer2DModel folder",
    "lumos-pth": "Lumos / PixArt .pth file",
    "safetensors": ".safetensors file",
}
_PTH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
_KINDS_HELP = (
    "expected a megatron checkpoint folder or root (metadata.json / latest / iter_*), a "
    "diffusers model folder (config.json + *.safetensors, or a pipeline's transformer/), a "
    f"{' / '.join(_PTH_SUFFIXES)} file or a .safetensors file"
)


def detect_init_source(path: str | os.PathLike) -> str:
    """The kind of a ``checkpoint.init_from`` source (a key of :data:`INIT_SOURCE_KINDS`).

    Folders: a megatron checkpoint (``metadata.json``) or checkpoint root (``latest`` /
    ``iter_*``) is ``mcore``; a diffusers model folder (``config.json``, directly or in
    ``transformer/``) is ``hf`` or ``pixart-diffusers`` by its ``_class_name``. Files: ``.pth`` /
    ``.pt`` / ``.ckpt`` / ``.bin`` are ``torch.save`` state dicts or training containers
    (``lumos-pth``); ``.safetensors`` is a state dict in the released naming. Raises
    ``FileNotFoundError`` for a missing path, ``ValueError`` for anything else.
    """
    from lumos_mcore.convert.mcore_reader import is_mcore_checkpoint
    from lumos_mcore.convert.sources import detect_format

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return "safetensors"
        if suffix in _PTH_SUFFIXES:
            return "lumos-pth"
        raise ValueError(
            f"{path}: cannot tell the kind of a {suffix or 'suffix-less'} file; {_KINDS_HELP}"
        )
    if is_mcore_checkpoint(path):
        return "mcore"
    if not any((d / "config.json").is_file() for d in (path, path / "transformer")):
        raise ValueError(f"{path}: not a recognised checkpoint folder; {_KINDS_HELP}")
    return detect_format(path)  # hf / pixart-diffusers, or ConversionError naming the class


def _open_init_source(path: Path, kind: str, model_cfg, *, ema: bool):
    """``convert.sources`` WeightSource of a non-megatron init source. A ``.pth`` /
    ``.safetensors`` file records no head count: it gets the live model's."""
    from lumos_mcore.convert.sources import open_safetensors_file, open_source
    from lumos_mcore.models.dit.hf_adapter import ConversionError

    if kind == "safetensors":
        return open_safetensors_file(path, num_heads=model_cfg.num_heads_)
    if kind == "lumos-pth":
        try:
            return open_source(path, kind, ema=ema, num_heads=model_cfg.num_heads_)
        except ConversionError as err:
            if ema and "no EMA weights" in str(err):
                raise ValueError(
                    f"{path}: holds no EMA weights (no ema / state_dict_ema / model_ema "
                    "container); drop checkpoint.init_from_ema"
                ) from None
            raise
    return open_source(path, kind, cond_tokens=model_cfg.cond_tokens)


def _pth_ema_source(path: Path, model_cfg):
    """The EMA weights of a ``.pth`` training container, or None when it stores none."""
    from lumos_mcore.models.dit.hf_adapter import ConversionError

    try:
        return _open_init_source(path, "lumos-pth", model_cfg, ema=True)
    except (ConversionError, ValueError):
        return None


def _global_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    from lumos_mcore.models.dit.state_dict import tp_partition

    shape, dim = list(param.shape), tp_partition(param)
    if dim is not None:
        shape[dim] *= tp_size
    return tuple(shape)


def _stream_into(source, slots: dict[str, list]) -> None:
    """Copy ``source``'s weights (converted to megatron names, one tensor at a time) into this
    rank's shards: ``slots`` maps a global name to the ``(tensor, param)`` pairs to fill (a
    replicated embedder appears once per virtual stage)."""
    from contextlib import closing

    from megatron.core import parallel_state

    from lumos_mcore.convert.pipeline import convert_stream, resolve_model_config
    from lumos_mcore.models.dit.state_dict import shard_for_rank

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    stream = convert_stream(source, resolve_model_config(source), "mcore")
    with torch.no_grad(), closing(stream):
        for name, full in stream:
            for dst, param in slots.get(name, ()):
                dst.copy_(shard_for_rank(full, param, tp_rank, tp_size))


def _load_converted_weights(
    path: str | os.PathLike,
    kind: str,
    chunks: list[nn.Module],
    optimizer=None,
    ema: EMA | None = None,
    *,
    strict: bool = True,
    from_ema: bool = False,
) -> tuple[dict[str, Any], WeightsReport]:
    """``Checkpointer.load_weights`` for a diffusers folder or a ``.pth`` / ``.safetensors``.

    The source is opened and converted to full megatron names by ``lumos_mcore.convert``
    (checked against its own recorded or inferred architecture), then every rank streams it
    and keeps the slices of its own TP shards / PP stages. Keys are full megatron parameter
    names with global layer indices (``decoder.layers.<i>.<name>``); fit is judged on names
    and global shapes before any weight is copied. ``from_ema``: only a ``.pth`` training
    container holds EMA weights besides the training ones (``ema`` / ``state_dict_ema`` /
    ``model_ema``); its EMA also seeds the run's EMA when training weights are loaded. Other
    sources hold one set of weights: ``from_ema`` is an error, the EMA restarts from them.
    """
    from megatron.core import parallel_state

    from lumos_mcore.convert.pipeline import plan_conversion, resolve_model_config
    from lumos_mcore.models.dit.state_dict import global_name

    path = Path(path)
    model_cfg = unwrap(chunks[0]).model_cfg
    if from_ema and kind != "lumos-pth":
        raise ValueError(
            f"{path}: a {INIT_SOURCE_KINDS[kind]} holds one set of weights (no EMA); drop "
            "checkpoint.init_from_ema (tools/convert_checkpoint.py --ema exports a megatron "
            "checkpoint's EMA weights)"
        )
    source = _open_init_source(path, kind, model_cfg, ema=from_ema)
    src_cfg = resolve_model_config(source)
    if (
        source.config_is_recorded
        and src_cfg.hidden_size_ == model_cfg.hidden_size_
        and src_cfg.num_heads_ != model_cfg.num_heads_
    ):
        raise ValueError(
            f"model.num_heads={model_cfg.num_heads_}: {source.description} has "
            f"num_heads={src_cfg.num_heads_}; fused QKV rows are grouped per head, so the head "
            "count of a trained model cannot change"
        )
    stored = {s.name: tuple(s.shape) for s in plan_conversion(source, src_cfg, "mcore")}

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    report = WeightsReport(source.description)
    slots: dict[str, list] = {}  # global name -> [(destination, the param it is sliced like)]
    local: list[tuple[int, str, str]] = []  # (chunk, local name, global name) of loaded params
    for i, chunk in enumerate(chunks):
        core = unwrap(chunk)
        for name, param in core.named_parameters():
            key, want = global_name(core, name), _global_shape(param, tp_size)
            if key not in stored:
                report.missing.append(key)
            elif stored[key] != want:
                report.mismatched.append((key, stored[key], want))
            else:
                report.loaded.append(key)
                slots.setdefault(key, []).append((param, param))
                local.append((i, name, key))
    requested = _gather_report(report)
    report.unexpected = sorted(k for k in stored if k not in requested)
    if strict and not report.ok:
        raise _does_not_fit(source.description, report)

    _stream_into(source, slots)
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()  # fp32 main copies (see load_weights)
    if ema is not None:
        ema.reset(chunks)
        # A .pth training container's EMA seeds the run's EMA, as a megatron checkpoint's does.
        ema_source = None
        if kind == "lumos-pth" and not from_ema:
            ema_source = _pth_ema_source(path, model_cfg)
        if ema_source is not None:
            ema_cfg = resolve_model_config(ema_source)
            has = {s.name: tuple(s.shape) for s in plan_conversion(ema_source, ema_cfg, "mcore")}
            params = [dict(unwrap(c).named_parameters()) for c in chunks]
            ema_slots: dict[str, list] = {}
            for i, name, key in local:
                if has.get(key) == stored[key]:
                    ema_slots.setdefault(key, []).append((ema.shadow[i][name], params[i][name]))
            _stream_into(ema_source, ema_slots)
    log.info(
        "loaded weights from %s (no optimizer state: training starts at step 0)%s",
        source.description,
        "" if report.ok else f"; {report.describe()}",
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"step": 0, "weights_only": True, "source_format": kind}, report


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

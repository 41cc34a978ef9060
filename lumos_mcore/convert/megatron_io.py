"""One-process megatron ``LumosDiT`` for writing checkpoints and for inference.

Writing a megatron checkpoint goes through the model itself: a TP=1, PP=1 ``LumosDiT`` built
from the target config takes the full weights (every parameter must be there, with its shape),
and its own ``sharded_state_dict`` names what is stored. The checkpoint therefore holds exactly
what the trainer requests when it loads (global keys, stacked layers, per-layer
``_extra_state``) and, like a training checkpoint, loads at any TP / PP / CP / DP layout.

Everything here needs torch.distributed and megatron's parallel state; ``one_process`` starts
both for a single process (gloo on CPU) when absent.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.models.dit.hf_adapter import ConversionError

__all__ = [
    "build_megatron_model",
    "checkpoint_writer_config",
    "inference_config",
    "load_megatron_for_inference",
    "one_process",
    "save_megatron_checkpoint",
]


def _init_one_process(cfg: ModelConfig, seed: int, tp: int = 1, cp: int = 1) -> bool:
    """Start torch.distributed (if needed) and megatron's parallel state with PP=1 and the
    given TP / CP (default: one model per process); True if torch.distributed was started."""
    import torch.distributed as dist

    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel.state import initialize_parallel

    started = not (dist.is_available() and dist.is_initialized())
    initialize_parallel(
        ParallelConfig(tp=tp, cp=cp),
        num_attention_heads=cfg.num_heads_,
        num_layers=cfg.depth_,
        seed=seed,
    )
    return started


@contextmanager
def one_process(cfg: ModelConfig, seed: int = 0) -> Iterator[None]:
    """megatron parallel state for one process (TP=PP=CP=1) for the duration of the block;
    torch.distributed is shut down afterwards if it was started here."""
    import torch.distributed as dist

    from lumos_mcore.parallel.state import destroy_parallel

    started = False
    try:
        started = _init_one_process(cfg, seed)
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"checkpoint conversion runs in one process (world size {dist.get_world_size()})"
            )
        yield
    finally:
        if started:
            destroy_parallel()


def checkpoint_writer_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` as the model that *writes* a weights-only checkpoint is built: the local spec,
    no FP8, no recompute.

    These options choose how a model runs (TransformerEngine kernels, FP8 GEMMs, activation
    recomputation), not which parameters it has: the TE and local specs have the same
    parameter names and shapes (TE's linears / norms use megatron's ``weight`` / ``bias``, the
    adaLN norms are outside TE's fused LayerNorm-Linear), and a weights-only load
    (``Checkpointer.load_weights``) matches parameters only, skipping the per-module
    ``_extra_state`` (TE's FP8 metadata), which starts fresh. So a checkpoint recorded with
    ``model.spec=te`` / ``model.fp8`` converts on a machine without TransformerEngine or CUDA,
    and the written checkpoint still records the original config.
    """
    return dataclasses.replace(cfg, spec="local", fp8=None, recompute="none")


def build_megatron_model(
    cfg: ModelConfig,
    weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    *,
    allow_new: bool = False,
    bf16: bool = False,
    seed: int = 0,
    for_checkpoint: bool = False,
) -> tuple[nn.Module, list[str]]:
    """A PP=1 ``LumosDiT`` for ``cfg`` at the current TP / CP layout holding ``weights`` (full
    megatron names and shapes; a mapping or a stream of pairs, copied in one at a time so a
    stream needs no second copy of the model in memory). Under TP each rank keeps its slice.

    Every tensor must be a parameter of the model with the parameter's global shape
    (``ConversionError`` naming the tensor and both shapes otherwise). Parameters without a
    tensor are an error, unless ``allow_new``: they then keep the model's initialisation
    (seeded by ``seed``) and their names are returned. ``for_checkpoint``: the model only
    carries the weights into a checkpoint, built per :func:`checkpoint_writer_config` (record
    ``cfg`` itself with :func:`save_megatron_checkpoint`). Needs megatron's parallel state.
    """
    from megatron.core import parallel_state

    from lumos_mcore.models.dit.model import build_lumos_dit, build_transformer_config
    from lumos_mcore.models.dit.state_dict import global_name, shard_for_rank, tp_partition

    if for_checkpoint:
        cfg = checkpoint_writer_config(cfg)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    cp = parallel_state.get_context_parallel_world_size()
    torch.manual_seed(seed)
    model = build_lumos_dit(cfg, build_transformer_config(cfg, tp=tp, cp=cp, bf16=bf16))
    params = {global_name(model, n): p for n, p in model.named_parameters()}
    seen: set[str] = set()
    items = weights.items() if isinstance(weights, Mapping) else weights
    with torch.no_grad():
        for name, tensor in items:
            param = params.get(name)
            if param is None:
                raise ConversionError(
                    f"mcore tensor {name!r} is not a parameter of the megatron model for this "
                    f"config (variant={cfg.variant!r})"
                )
            shape, dim = list(param.shape), tp_partition(param)
            if dim is not None:
                shape[dim] *= tp
            if tuple(tensor.shape) != tuple(shape):
                raise ConversionError(
                    f"mcore tensor {name!r} has shape {tuple(tensor.shape)}, but the megatron "
                    f"model for this config has {tuple(shape)}"
                )
            param.copy_(shard_for_rank(tensor, param, tp_rank, tp))
            seen.add(name)
    new = [n for n in params if n not in seen]
    if new and not allow_new:
        raise ConversionError(
            f"the weights lack {len(new)} parameter(s) of the megatron model for this config, "
            f"e.g. {new[:5]}"
        )
    return model, new


def save_megatron_checkpoint(
    path: str | os.PathLike, model: nn.Module, cfg: ModelConfig, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (one process) as a weights-only checkpoint folder ``path`` (created).

    The common state marks it ``weights_only``: ``Checkpointer.load`` then starts training at
    step 0 with a fresh optimizer and EMA = the weights.
    """
    from megatron.core import dist_checkpointing

    from lumos_mcore.config.loader import config_to_dict

    path = Path(path)
    path.mkdir()
    train_state = {
        "step": 0,
        "weights_only": True,
        "has_ema": False,
        "model_config": config_to_dict(cfg),
        "world_size": 1,
        **(extra or {}),
    }
    dist_checkpointing.save(
        {"model": model.sharded_state_dict(), "train_state": train_state}, str(path)
    )
    return path


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` as a model runs for sampling: no FP8 (bf16 / fp32 GEMMs), no recompute, and
    the TransformerEngine spec only where it imports (a ``model.spec=te`` run samples on a
    machine without TE). These choose kernels, not parameters (see
    :func:`checkpoint_writer_config`), so the weights load unchanged."""
    spec = "auto" if cfg.spec == "te" else cfg.spec
    return dataclasses.replace(cfg, spec=spec, fp8=None, recompute="none")


def load_megatron_for_inference(
    cfg: ModelConfig,
    weights: Mapping[str, Tensor],
    *,
    bf16: bool = False,
    seed: int = 0,
    tp: int = 1,
    cp: int = 1,
) -> nn.Module:
    """``LumosDiT`` for sampling, per :func:`inference_config` (parallel state started and
    kept). With ``tp`` / ``cp`` > 1 each group of ``tp * cp`` ranks (under torchrun) holds one
    model: TP ranks their weight slices, CP ranks their share of the tokens; every rank of the
    group calls it with the same inputs and gets the whole prediction."""
    _init_one_process(cfg, seed, tp=tp, cp=cp)
    model, _ = build_megatron_model(inference_config(cfg), weights, bf16=bf16, seed=seed)
    return model

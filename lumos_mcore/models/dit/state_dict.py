"""Map between one rank's sharded LumosDiT parameters and the full (single-process) model, and
initialise a video / NVS model from image (I2I) weights.

A rank holds a pipeline stage's layers (local indices 0..k-1, global ``offset + i``) and, for
tensor-parallel weights, one slice along ``partition_dim``. megatron's fused QKV / KV weights are
stored per head (``[q_h, k_h, v_h]`` for each head h), so a rank's heads are a contiguous block of
rows of the full fused matrix and TP slicing is a plain ``chunk``.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state
from torch import Tensor, nn

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(model: nn.Module, name: str) -> str:
    """``decoder.layers.<local>.x`` -> ``decoder.layers.<global>.x`` (other names unchanged)."""
    m = _LAYER.match(name)
    if m is None:
        return name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + name[m.end() :]


def tp_partition(param: Tensor) -> int | None:
    """Dimension along which ``param`` is split over tensor-parallel ranks (None: replicated)."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def shard_for_rank(full: Tensor, param: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's slice of a full tensor, shaped like ``param``."""
    dim = tp_partition(param)
    piece = full if dim is None else full.chunk(tp_size, dim=dim)[tp_rank]
    if piece.shape != param.shape:
        raise ValueError(
            f"tensor of shape {tuple(full.shape)} gives a TP-{tp_size} shard of shape "
            f"{tuple(piece.shape)}, but the model parameter is {tuple(param.shape)}"
        )
    return piece


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, Tensor], strict: bool = True) -> None:
    """Copy a full-model state dict into this rank's stage/shards of ``model``."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    missing = []
    for name, param in model.named_parameters():
        key = global_name(model, name)
        if key not in full:
            missing.append(key)
            continue
        param.copy_(shard_for_rank(full[key], param, tp_rank, tp_size))
    if strict and missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:5]}")


def local_shards(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, tuple]:
    """``{global_name: (tensor, partition_dim, tp_rank, tp_size)}`` for gathering elsewhere."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    return {
        global_name(model, n): (t.detach().cpu().clone(), tp_partition(params[n]), tp_rank, tp_size)
        for n, t in tensors.items()
    }


def assemble(shards_per_rank: list[dict[str, tuple]]) -> dict[str, Tensor]:
    """Rebuild full tensors from :func:`local_shards` of all ranks (TP slices concatenated)."""
    pieces: dict[str, dict[int, tuple[Tensor, int | None]]] = {}
    for shards in shards_per_rank:
        for name, (tensor, dim, tp_rank, _) in shards.items():
            pieces.setdefault(name, {})[tp_rank] = (tensor, dim)
    full = {}
    for name, by_rank in pieces.items():
        dim = by_rank[0][1]
        parts = [by_rank[r][0] for r in sorted(by_rank)]
        full[name] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return full


# Parameters an image (I2I / T2I) checkpoint does not have: they keep their initialisation,
# which makes the new parts start as no-ops (zeroed temporal output projection, zeroed camera
# output layer).
NEW_IN_VIDEO = ("temporal_attention.", "temporal_norm.", "camera_embedder.")


@torch.no_grad()
def load_image_weights(model: nn.Module, image_state: dict[str, Tensor]) -> list[str]:
    """Load a full image-model state dict (I2I) into an I2V or NVS ``LumosDiT`` on this rank.

    Every parameter the image model has is copied (TP-sharded as needed); the temporal attention
    of the spatial + temporal video blocks and the NVS camera embedder keep their
    initialisation (zero output), and the NVS patch embedder takes the image weights for the
    noisy-latent channels with zeros for the concatenated input-view channels. At this point
    the I2V model applied to a video equals the I2I model applied to each frame, and the NVS
    model equals the I2I model on the noisy view. Returns the parameters left at their init.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    kept, missing = [], []
    for name, param in model.named_parameters():
        key = global_name(model, name)
        if key not in image_state:
            (kept if any(k in key for k in NEW_IN_VIDEO) else missing).append(key)
            continue
        full = image_state[key]
        if key == "x_embedder.proj.weight" and full.shape[1] < param.shape[1]:
            # NVS: [D, C, p, p] image kernel -> [D, 2C, p, p] with zero input-view channels.
            full = torch.cat(
                [
                    full,
                    full.new_zeros(full.shape[0], param.shape[1] - full.shape[1], *full.shape[2:]),
                ],
                1,
            )
        param.copy_(shard_for_rank(full, param, tp_rank, tp_size))
    if missing:
        raise KeyError(
            f"image state dict lacks {len(missing)} parameters the model needs, e.g. "
            f"{missing[:5]}; only {', '.join(NEW_IN_VIDEO)} may be new"
        )
    return kept

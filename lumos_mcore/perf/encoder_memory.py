"""Device memory of the frozen encoders of a raw-media job, counted from their configs.

Why: online encoding puts the VAE and the condition encoder (DINO or T5) on every training GPU
next to the DiT. Their weights can dwarf a small DiT's (a T5-XXL encoder is 4.8B parameters:
19 GiB in fp32) and the VAE's full-resolution feature maps at 1024 px reach several GiB per
image, so a "will it fit" answer that leaves them out is wrong for exactly the jobs that matter.

What is counted, for a rank that encodes (only the first rank of each model replica loads and
runs the encoders, the others receive the encodings; global rank 0, the rank the trainer's
estimate describes, is always one):

- **weights**: each loaded encoder's parameters and floating buffers in ``media.encoders.dtype``,
  counted exactly by building the architecture from the local directory's config on the
  ``meta`` device (nothing is read but config.json). Zero with ``media.encoders.device=cpu``.
- **encode working set**: the peak of one encode call. The diffusers VAE encoder dominates: at
  level ``l`` of ``block_out_channels`` its down block holds the block input while a ResNet
  block keeps its input, norm / SiLU / conv outputs and the residual sum alive, which is
  ``c_in + 3 c_out`` (+ ``c_out`` for the channel-changing shortcut, or for a second ResNet
  block) maps of ``(H / 2^l) x (W / 2^l)`` per frame, for ``media.encoders.vae_batch`` frames
  at a time, plus the micro-batch's pixels on the device. :class:`LiveTensorBytes` measures it
  on CPU and tests/perf/test_encoder_memory.py checks the formula is exact for several VAE
  shapes. The condition encoder runs after the VAE on small inputs (224-518 px, 120 tokens);
  its term is a bound (input pixels and preprocessing copies, one MLP hidden per token).

The mid-block self-attention of the VAE is assumed to run on a fused SDPA kernel (as it does on
CUDA: no ``tokens x tokens`` matrix). Encoding happens between the schedule's micro-batches
(or, under pipeline parallelism, before the step), when no DiT activations are alive, so the
trainer's peak is ``static + encoders + max(train activations, encode working set)``.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
from lumos_mcore.encoders.common import resolve_dtype

__all__ = [
    "EncoderMemory",
    "LiveTensorBytes",
    "encode_working_bytes",
    "encoder_weight_bytes",
    "estimate_encoder_memory",
    "estimate_media_encoder_memory",
    "vae_encode_peak_bytes",
]


def _itemsize(cfg: EncodersConfig) -> int:
    """Bytes per element of ``media.encoders.dtype`` (the encoders' own dtype resolution)."""
    return resolve_dtype(cfg.dtype).itemsize


@dataclass(frozen=True)
class EncoderMemory:
    """Bytes the frozen encoders take on the training device of one rank."""

    weights: dict[str, int] = field(default_factory=dict)  # encoder name -> weight bytes
    working: int = 0  # peak of one encode call, on top of the weights
    on_device: bool = True  # False with media.encoders.device=cpu: nothing on the GPU

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())


def _count(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module.to(dtype)``: floating tensors take the dtype, the rest keep theirs."""
    total = 0
    tensors = list(module.parameters()) + list(module.buffers())
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen:  # tied weights count once (parameters() already dedups, buffers may not)
            continue
        seen.add(id(t))
        size = dtype.itemsize if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def _vae_config(cfg: EncodersConfig) -> dict[str, Any]:
    path = Path(cfg.vae) / cfg.vae_subfolder / "config.json"  # type: ignore[arg-type]
    return json.loads(path.read_text())


def encoder_weight_bytes(cfg: EncodersConfig) -> dict[str, int]:
    """``{"vae": bytes, "dino" | "t5": bytes}`` of the encoders :class:`FrozenEncoders` loads
    for ``cfg``, in ``cfg.dtype``, from the local directories' configs (no weights read)."""
    from diffusers import AutoencoderKL
    from transformers import AutoConfig, AutoModel, T5Config, T5EncoderModel

    cfg.check_complete()
    dtype = resolve_dtype(cfg.dtype)
    out: dict[str, int] = {}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(_vae_config(cfg))
        out["vae"] = _count(vae, dtype)
        if cfg.cond in ("dino_cls", "dino_patch"):
            config = AutoConfig.from_pretrained(cfg.dino)
            kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}
            out["dino"] = _count(AutoModel.from_config(config, **kwargs), dtype)
        else:
            config = T5Config.from_pretrained(cfg.t5)
            out["t5"] = _count(T5EncoderModel(config), dtype)
    return out


def vae_encode_peak_bytes(
    vae_config: dict[str, Any], *, frames: int, height: int, width: int, dtype_bytes: int
) -> int:
    """Peak bytes a diffusers ``AutoencoderKL`` encoder allocates for ``frames`` images of
    ``height x width`` (its input excluded): the widest down-block level (module docstring)."""
    chans = list(vae_config["block_out_channels"])
    per_block = int(vae_config.get("layers_per_block", 2))
    best = 0
    c_in = chans[0]  # conv_in output: the first block's input
    for level, c_out in enumerate(chans):
        area = math.ceil(height / 2**level) * math.ceil(width / 2**level)
        first = c_in + 3 * c_out + (c_out if c_in != c_out else 0)
        later = c_in + 4 * c_out if per_block > 1 else 0
        best = max(best, max(first, later) * area)
        c_in = c_out
    return best * frames * dtype_bytes


def _cond_peak_bytes(cfg: EncodersConfig, images: int, height: int, width: int) -> int:
    """A bound on the condition encoder's working set for ``images`` first frames (DINO) or
    captions (T5): fp32 input copies made while preprocessing, then one MLP hidden per token."""
    if cfg.cond == "t5":
        from transformers import T5Config

        c = T5Config.from_pretrained(cfg.t5)
        per_token = 2 * c.d_ff + 4 * c.d_model + c.num_heads * cfg.t5_max_length
        return images * cfg.t5_max_length * per_token * _itemsize(cfg)
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(cfg.dino)
    side = cfg.dino_image_size
    tokens = (side // c.patch_size) ** 2 + 1 + int(getattr(c, "num_register_tokens", 0) or 0)
    mlp = getattr(c, "intermediate_size", None) or int(c.hidden_size * getattr(c, "mlp_ratio", 4))
    pixels = 3 * images * 3 * height * width * 4  # to fp32, (x + 1) / 2, the resized crop
    model = images * tokens * (2 * mlp + 4 * c.hidden_size) * _itemsize(cfg)
    return pixels + model


def encode_working_bytes(
    cfg: EncodersConfig,
    *,
    samples: int,
    frames: int,
    height: int,
    width: int,
    vae_config: dict[str, Any] | None = None,
) -> int:
    """Peak bytes of one ``FrozenEncoders.encode`` call on ``samples`` clips of ``frames``
    frames (1: images) of ``height x width`` pixels: the VAE phase (pixels, their copy in the
    encoder dtype, one ``vae_batch`` chunk, the latents) or the condition phase after it."""
    vae = vae_config if vae_config is not None else _vae_config(cfg)
    down = 2 ** (len(vae["block_out_channels"]) - 1)
    a = _itemsize(cfg)
    n = samples * frames
    pixels = n * 3 * height * width * 4  # the decoded micro-batch, fp32 on the device
    vae_in = n * 3 * height * width * a  # its frames in the VAE dtype
    chunk = vae_encode_peak_bytes(
        vae, frames=min(cfg.vae_batch, n), height=height, width=width, dtype_bytes=a
    )
    latents = n * vae["latent_channels"] * (height // down) * (width // down) * 4
    vae_phase = pixels + vae_in + chunk + latents
    cond_phase = pixels + latents + _cond_peak_bytes(cfg, samples, height, width)
    return max(vae_phase, cond_phase)


def estimate_encoder_memory(
    cfg: EncodersConfig,
    *,
    buckets: list[list[int]],
    clip_lengths: list[int],
    micro_batch_size: int,
    pack_capacity: int | None = None,
    patch_size: int = 2,
) -> EncoderMemory:
    """Weights and worst-case encode working set of the encoders ``cfg`` for one micro-batch
    (one pack with ``pack_capacity``) over the job's ``buckets`` ``[H, W]`` and
    ``clip_lengths`` (``media.num_frames``; ``[1]`` for images): the shape that puts the most
    through the encoders in one call."""
    weights = encoder_weight_bytes(cfg)
    if cfg.device == "cpu":
        return EncoderMemory(weights={k: 0 for k in weights}, working=0, on_device=False)
    vae = _vae_config(cfg)
    down = 2 ** (len(vae["block_out_channels"]) - 1)
    working = 0
    for h, w in buckets:
        for t in clip_lengths:
            if pack_capacity:  # a pack encodes its same-shape samples together
                tokens = t * (h // down // patch_size) * (w // down // patch_size)
                samples = max(1, pack_capacity // max(tokens, 1))
            else:
                samples = micro_batch_size
            shape = dict(samples=samples, frames=t, height=h, width=w, vae_config=vae)
            working = max(working, encode_working_bytes(cfg, **shape))
    return EncoderMemory(weights=weights, working=working, on_device=True)


def estimate_media_encoder_memory(
    media: MediaDataConfig, *, micro_batch_size: int, patch_size: int = 2
) -> EncoderMemory:
    """:func:`estimate_encoder_memory` for a raw-media job's ``media`` section."""
    return estimate_encoder_memory(
        media.encoders,
        buckets=media.buckets,
        clip_lengths=media.num_frames if media.modality == "video" else [1],
        micro_batch_size=micro_batch_size,
        pack_capacity=media.pack_capacity if media.pack else None,
        patch_size=patch_size,
    )


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the ``with`` block that are alive at once:
    every op output storage is counted when it appears and released when its last tensor is
    garbage collected. Views and in-place results of existing storages are not new memory.
    Device- and allocator-independent (exact on CPU), for checking working-set formulas like
    :func:`vae_encode_peak_bytes`; tensors created before the block are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[int]] = {}  # storage pointer -> [bytes, live tensors]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key in inputs and key not in self._live:  # a view / in-place of older memory
                continue
            entry = self._live.get(key)
            if entry is None:
                entry = self._live[key] = [t.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out

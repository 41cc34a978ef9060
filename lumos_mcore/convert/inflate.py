"""Weight inflation: an I2I image checkpoint -> the initial checkpoint of an I2V video model.

The I2V model is the I2I model plus, per block, a temporal self-attention (spatial + temporal
mode, ``model.video_attention="spatial_temporal"``); ``full_3d`` adds no parameters. Every I2I
tensor is copied unchanged; the new temporal parameters keep the I2V model's own (seeded)
initialisation, with the temporal out-projection zero. A zero out-projection makes each new
branch contribute nothing, so the inflated model computes the I2I model on every frame (the
spatial + temporal mode positions each frame with the image's 2-D table), while its Q/K/V
projections are random so that the branch receives gradients from the first step (with Q/K/V
zero as well, the branch would stay zero).
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.convert.pipeline import (
    CONVERSION_RECORD,
    atomic_output,
    head_count,
    stream_weights,
    written_dtype,
)
from lumos_mcore.durable import write_durably
from lumos_mcore.models.dit.hf_adapter import ConversionError

__all__ = ["inflate_i2i_to_i2v"]

_TEMPORAL = ".temporal_attention."
_ZERO = (".temporal_attention.linear_proj.weight", ".temporal_attention.linear_proj.bias")


def inflate_i2i_to_i2v(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    src_format: str | None = None,
    num_frames: int = 16,
    video_attention: str = "spatial_temporal",
    model_config: ModelConfig | None = None,
    ema: bool | None = None,
    seed: int = 0,
    overwrite: bool = False,
    num_heads: int | None = None,
    **overrides: Any,
) -> Path:
    """Write the initial I2V megatron checkpoint ``dst`` from the I2I checkpoint ``src``.

    ``src`` may be in any readable format (``src_format`` None: detected); ``ema`` None takes
    its EMA weights when stored. The I2V config is the I2I one with ``variant="i2v"``,
    ``num_frames``, ``video_attention`` and ``overrides``, or ``model_config`` as given (its
    architecture must match the I2I model). ``seed`` seeds the new temporal Q/K/V.
    ``num_heads``: head count of a ``.pth`` source, which records none (default
    ``model_config``'s, else hidden // 72; it must agree with ``model_config``): fused QKV rows
    are regrouped per head, so a wrong count would scramble the attention silently. The
    weights are written in bf16 if the source holds any bf16 tensor, else fp32 (an fp16 source
    is widened); ``conversion.json`` records which. Returns ``dst``; train from it with
    ``checkpoint.load=<dst>``.
    """
    from lumos_mcore.convert.megatron_io import (
        build_megatron_model,
        one_process,
        save_megatron_checkpoint,
    )
    from lumos_mcore.models.dit.state_dict import global_name

    heads = head_count(num_heads, model_config)
    i2i_cfg, specs, stream = stream_weights(
        src, src_format, layout="mcore", ema=ema, num_heads=heads
    )
    if i2i_cfg.variant != "i2i":
        raise ConversionError(
            f"model.variant={i2i_cfg.variant!r}: inflation starts from an I2I checkpoint"
        )
    if model_config is None:
        target = dataclasses.replace(
            i2i_cfg,
            variant="i2v",
            num_frames=num_frames,
            video_attention=video_attention,
            **overrides,
        )
    else:
        target = model_config
    if target.variant != "i2v":
        raise ConversionError(f"model.variant={target.variant!r}: the target must be 'i2v'")
    for field in ("depth_", "hidden_size_", "num_heads_", "patch_size", "in_channels"):
        if getattr(target, field) != getattr(i2i_cfg, field):
            raise ConversionError(
                f"model.{field.rstrip('_')}={getattr(target, field)}: the I2I checkpoint has "
                f"{field.rstrip('_')}={getattr(i2i_cfg, field)}; inflation keeps the architecture"
            )

    with atomic_output(dst, overwrite) as stage, closing(stream):
        bf16 = any(s.dtype == torch.bfloat16 for s in specs)
        with one_process(target, seed):
            model, new = build_megatron_model(
                target, stream, allow_new=True, bf16=bf16, seed=seed, for_checkpoint=True
            )
            other = [n for n in new if _TEMPORAL not in n]
            if other:
                raise ConversionError(
                    f"the I2V config adds {len(other)} non-temporal parameter(s), e.g. "
                    f"{other[:5]}; inflation only adds the temporal attention (keep the "
                    "other model options of the I2I checkpoint)"
                )
            zeroed = []
            with torch.no_grad():
                for name, param in model.named_parameters():
                    full = global_name(model, name)
                    if full in new and full.endswith(_ZERO):
                        param.zero_()
                        zeroed.append(full)
            out = save_megatron_checkpoint(stage / "out", model, target)
        record = {
            "source": str(Path(src).absolute()),
            "inflated": "i2i -> i2v",
            "num_frames": target.num_frames,
            "video_attention": target.video_attention,
            "seed": seed,
            "dtype": written_dtype(model),
            "new_parameters": new,
            "zero_initialised": zeroed,
        }
        write_durably(out / CONVERSION_RECORD, json.dumps(record, indent=2) + "\n")
    return Path(dst).absolute()

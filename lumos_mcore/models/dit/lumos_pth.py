"""Read the released Lumos checkpoints (``Lumos_I2I.pth``, ``Lumos_T2I.pth``).

They are plain ``torch.save`` state dicts in the released code's naming (that of
``LumosTransformer2DModel``), sometimes inside a training container (``{"state_dict": ...}``,
``{"model": ...}``, ``{"ema": ...}``, keys prefixed ``module.`` by DDP). They carry no config, so
the architecture is read off the tensors:

- depth: number of ``blocks.{i}``; hidden size, input channels, patch size: the patch-embedding
  conv ``x_embedder.proj.weight [D, C, p, p]``;
- heads: ``D // 72`` (DiT-XL/2 and Lumos use 72-wide heads; pass ``num_heads`` otherwise);
- condition channels / tokens: the null condition ``y_embedder.y_embedding [Lc, Cc]``;
- learned sigma: ``final_layer.linear [p*p*C_out, D]`` with ``C_out = 2*C``;
- adaLN flavour: per-block ``adaLN_modulation.1`` (Lumos adaLN-Zero) or ``t_block`` + per-block
  ``scale_shift_table`` (PixArt adaLN-single); size conditioning: ``csize_embedder`` present;
- latent size and position interpolation scale: the stored fixed ``pos_embed [1, N, D]`` table
  (checked against our sin-cos table, then dropped — the models recompute it).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.models.common.embeddings import get_2d_sincos_pos_embed
from lumos_mcore.models.dit.hf_adapter import (
    ConversionError,
    check_state_dict,
    model_config_from_hf_config,
)

__all__ = ["infer_model_config", "load_lumos_pth", "unwrap_state_dict"]

HEAD_DIM = 72  # DiT-XL/2 head width (1152 / 16)
DEFAULT_LATENT_SIZE = 32  # 256 px through the SD-VAE, used when the file has no pos_embed
_CONTAINERS_EMA_FIRST = ("ema", "state_dict_ema", "model_ema", "state_dict", "model", "module")
_CONTAINERS_RAW_FIRST = ("state_dict", "model", "module", "ema", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "model.", "_orig_mod.")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def unwrap_state_dict(obj: Any, prefer_ema: bool = True, source: str = "checkpoint") -> dict:
    """The tensor dict inside a training container, with DDP / wrapper prefixes removed.

    Containers are opened by key (``ema``/``state_dict_ema``/``model_ema`` first when
    ``prefer_ema``, then ``state_dict``/``model``/``module``) until a dict of tensors remains.
    """
    order = _CONTAINERS_EMA_FIRST if prefer_ema else _CONTAINERS_RAW_FIRST
    path = []
    while True:
        if not isinstance(obj, Mapping):
            where = "/".join(path) or "top level"
            raise ConversionError(
                f"{source}: expected a dict of tensors at {where}, got {type(obj).__name__}"
            )
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        key = next((k for k in order if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            bad = [k for k, v in obj.items() if not isinstance(v, Tensor)][:5]
            raise ConversionError(
                f"{source}: no state dict found at {'/'.join(path) or 'top level'} (keys "
                f"{list(obj)[:10]}); non-tensor entries {bad} are not a known container "
                f"({', '.join(order)})"
            )
        path.append(key)
        obj = obj[key]
    sd = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _need(sd: Mapping[str, Tensor], name: str, ndim: int) -> Tensor:
    if name not in sd:
        raise ConversionError(f"checkpoint lacks {name!r}, which every Lumos model has")
    t = sd[name]
    if t.ndim != ndim:
        raise ConversionError(
            f"checkpoint tensor {name!r} has shape {tuple(t.shape)}: not {ndim}-D"
        )
    return t


def _pos_embed_geometry(table: Tensor, hidden: int) -> tuple[int, float]:
    """``(grid side, interpolation scale)`` of a stored square sin-cos table ``[1, N, D]``.

    The table was built for its own grid (base size = grid), so token 1 (row 0, column 1) sits
    at column position ``1 / scale``; channel 0 is ``sin`` and channel ``D/4`` is ``cos`` of it.
    """
    t = table.reshape(-1, table.shape[-1]).double()
    n = t.shape[0]
    grid = math.isqrt(n)
    if table.shape[-1] != hidden or grid * grid != n:
        raise ConversionError(
            f"checkpoint tensor 'pos_embed' has shape {tuple(table.shape)}: expected "
            f"[1, grid*grid, {hidden}] for a square token grid"
        )
    scale = 1.0
    if grid > 1:
        w = math.atan2(float(t[1, 0]), float(t[1, hidden // 4]))
        if w <= 0:
            raise ConversionError(
                "checkpoint tensor 'pos_embed' is not a 2-D sin-cos table (token 1 has no "
                "positive column position)"
            )
        scale = round(1.0 / w, 4)
    ref = get_2d_sincos_pos_embed(hidden, (grid, grid), base_size=grid, interpolation_scale=scale)
    atol = 1e-4 if table.dtype in (torch.float32, torch.float64) else 4e-3
    err = float((t - ref.double()).abs().max())
    if err > atol:
        raise ConversionError(
            f"checkpoint tensor 'pos_embed' is not the 2-D sin-cos table of a {grid}x{grid} grid "
            f"(interpolation scale {scale}): max deviation {err:.2e}"
        )
    return grid, scale


def infer_model_config(
    sd: Mapping[str, Tensor],
    *,
    num_heads: int | None = None,
    head_dim: int = HEAD_DIM,
    latent_size: int | None = None,
    pos_embed: Tensor | None = None,
    **overrides: Any,
) -> ModelConfig:
    """Architecture of a Lumos state dict in the released naming (see the module docstring).

    ``latent_size`` defaults to the side of ``pos_embed`` times the patch size (else 32);
    ``overrides`` set non-architecture ``ModelConfig`` fields (``spec``, ``norm_eps``, ...).
    """
    w = _need(sd, "x_embedder.proj.weight", 4)
    d, in_ch, p, p2 = w.shape
    if p != p2:
        raise ConversionError(
            f"checkpoint tensor 'x_embedder.proj.weight' has a non-square kernel {p}x{p2}"
        )
    blocks = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))})
    if not blocks:
        raise ConversionError("checkpoint has no 'blocks.{i}.*' tensors")
    if blocks != list(range(len(blocks))):
        gap = sorted(set(range(blocks[-1] + 1)) - set(blocks))
        raise ConversionError(f"checkpoint has blocks up to {blocks[-1]} but lacks blocks {gap}")
    if num_heads is None:
        if d % head_dim:
            raise ConversionError(
                f"hidden size {d} (from 'x_embedder.proj.weight') is not a multiple of "
                f"head_dim={head_dim}; pass num_heads= (or model_cfg) explicitly"
            )
        num_heads = d // head_dim
    y_emb = _need(sd, "y_embedder.y_embedding", 2)
    cond_tokens, cond_channels = y_emb.shape
    out_f = _need(sd, "final_layer.linear.weight", 2).shape[0]
    if out_f % (p * p) or out_f // (p * p) not in (in_ch, 2 * in_ch):
        raise ConversionError(
            f"checkpoint tensor 'final_layer.linear.weight' has {out_f} outputs: expected "
            f"{p * p * in_ch} (learn_sigma=False) or {2 * p * p * in_ch} (learn_sigma=True) for "
            f"patch {p} and {in_ch} input channels"
        )
    zero = "blocks.0.adaLN_modulation.1.weight" in sd
    single = "blocks.0.scale_shift_table" in sd
    if zero == single:
        raise ConversionError(
            "checkpoint has "
            + ("both" if zero else "neither")
            + " 'blocks.0.adaLN_modulation.1.weight' (adaLN-Zero) and "
            "'blocks.0.scale_shift_table' (adaLN-single): cannot tell the block type"
        )
    fc1 = _need(sd, "blocks.0.mlp.fc1.weight", 2)
    scale = 1.0
    if pos_embed is not None:
        grid, scale = _pos_embed_geometry(pos_embed, d)
        if latent_size is None:
            latent_size = grid * p
    hf_cfg = dict(
        sample_size=latent_size if latent_size is not None else DEFAULT_LATENT_SIZE,
        patch_size=p,
        in_channels=in_ch,
        learn_sigma=out_f // (p * p) == 2 * in_ch,
        hidden_size=d,
        depth=len(blocks),
        num_heads=num_heads,
        mlp_ratio=fc1.shape[0] / d,
        cond_channels=cond_channels,
        cond_tokens=cond_tokens,
        adaln_type="zero" if zero else "single",
        use_size_conditioning="csize_embedder.mlp.0.weight" in sd,
        pos_interpolation_scale=scale,
    )
    return model_config_from_hf_config(hf_cfg, **overrides)


_ARCH_FIELDS = (
    "depth_",
    "hidden_size_",
    "in_channels",
    "patch_size",
    "learn_sigma",
    "cond_channels",
    "cond_tokens",
    "adaln_type",
    "use_size_conditioning",
)


def load_lumos_pth(
    path: str | os.PathLike,
    model_cfg: ModelConfig | None = None,
    *,
    num_heads: int | None = None,
    prefer_ema: bool = True,
) -> tuple[dict[str, Tensor], ModelConfig]:
    """Load a released Lumos ``.pth`` as ``(LumosTransformer2DModel state dict, ModelConfig)``.

    Without ``model_cfg`` the architecture is inferred from the tensors (``num_heads``
    overrides the ``hidden // 72`` rule). With ``model_cfg`` the checkpoint must match its
    architecture and ``model_cfg`` is returned (its heads, norm eps, latent size and runtime
    options are used as given). Every tensor is checked by name and shape; the state dict loads
    into ``LumosTransformer2DModel(**hf_config_from_model_config(cfg))`` with ``strict=True``
    and into megatron through ``hf_adapter.hf_to_mcore``.
    """
    raw = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    sd = unwrap_state_dict(raw, prefer_ema=prefer_ema, source=os.fspath(path))
    pos_embed = sd.pop("pos_embed", None)
    heads = num_heads if num_heads is not None else (model_cfg.num_heads_ if model_cfg else None)
    inferred = infer_model_config(sd, num_heads=heads, pos_embed=pos_embed)
    if model_cfg is None:
        cfg = inferred
    else:
        for field in _ARCH_FIELDS:
            want, have = getattr(model_cfg, field), getattr(inferred, field)
            if want != have:
                raise ConversionError(
                    f"model.{field.rstrip('_')}={want!r} but {os.fspath(path)} holds a model "
                    f"with {field.rstrip('_')}={have!r}"
                )
        cfg = model_cfg
    try:
        check_state_dict(sd, cfg, "hf")
    except ConversionError as err:
        raise ConversionError(f"{os.fspath(path)}: {err}") from None
    return sd, cfg

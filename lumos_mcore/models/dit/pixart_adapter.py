"""Map diffusers' ``PixArtTransformer2DModel`` (PixArt-alpha, adaLN-single) to / from our
``LumosTransformer2DModel`` layout, and from there to megatron through ``hf_adapter``.

What diffusers' PixArt computes (diffusers 0.42, ``pixart_transformer_2d.py``) and its image
in ``LumosTransformer2DModel(adaln_type="single")``:

===================================  ==================================================
diffusers PixArt                     LumosTransformer2DModel
===================================  ==================================================
``pos_embed.proj`` conv + sin-cos,   ``x_embedder.proj``; ``pos_base_size`` =
base ``sample_size // patch``,       ``sample_size // patch``, ``pos_interpolation_scale``
scale ``interpolation_scale`` or     = the same rule
``max(sample_size // 64, 1)``
``adaln_single.emb`` (Timesteps      ``t_embedder.mlp.{0,2}`` (same sinusoid: 256 ch, cos
256, flip, shift 0; SiLU MLP)        first, shift 0)
``resolution/aspect_ratio_embedder`` ``csize_embedder`` / ``ar_embedder`` (D/3 each);
when ``use_additional_conditions``   ``use_size_conditioning``; PixArt's default is
                                     ``sample_size == 128``
``adaln_single.linear``              ``t_block.1``
``caption_projection`` (GELU-tanh)   ``y_embedder.y_proj.{fc1,fc2}`` (GELU-tanh)
block ``scale_shift_table``          ``blocks.{i}.scale_shift_table``
``attn1.to_{q,k,v}``, ``to_out.0``   ``attn.qkv`` = ``[Q; K; V]``, ``attn.proj``
``attn2.to_q``, ``to_{k,v}``,        ``cross_attn.q_linear``, ``kv_linear`` = ``[K; V]``,
``to_out.0`` (no norm before)        ``cross_attn.proj`` (no norm before, no gate)
``ff.net.0.proj``, ``ff.net.2``      ``mlp.fc1``, ``mlp.fc2`` (GELU-tanh, ratio 4)
block norms: ``norm_eps``            ``norm_eps``
``norm_out`` eps 1e-6 (fixed),       ``final_layer`` (eps ``norm_eps``),
``scale_shift_table``, ``proj_out``  ``final_layer.scale_shift_table``, ``.linear``
mask -> bias -10000                  mask -> -inf (same result in fp32 unless a sample's
                                     tokens are all masked, which our class rejects)
===================================  ==================================================

Limits of the mapping (raised as ``ConversionError`` naming the config field): PixArt configs
our class cannot express are ``norm_eps != 1e-6`` (PixArt's final norm ignores it, ours does
not), ``norm_elementwise_affine=True`` (affine block norms), ``attention_bias=False``,
``activation_fn`` other than ``"gelu-approximate"``, ``caption_channels=None`` (no caption
projection), ``cross_attention_dim != heads * head_dim``, ``attention_type != "default"``
(GLIGEN) and ``dropout > 0`` (ours has no dropout). PixArt has no learned null caption (its
pipeline encodes the empty prompt): the converted ``y_embedder.y_embedding`` is ``null_cond``
(zeros by default) and ``hf_to_pixart`` drops it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lumos_mcore.models.dit.hf_adapter import (
    HF_CLASS,
    ConversionError,
    hf_class_of_config,
    hf_config_defaults,
)

__all__ = [
    "hf_config_from_pixart_config",
    "hf_to_pixart",
    "pixart_config_from_hf_config",
    "pixart_to_hf",
]

PIXART_FINAL_NORM_EPS = 1e-6  # PixArtTransformer2DModel.norm_out, not configurable
MLP_RATIO = 4.0  # diffusers FeedForward(mult=4) as PixArt builds it
# Transformer2DModel-era config fields found in PixArt config.json files on the Hub, with the
# only values under which PixArtTransformer2DModel means the same model.
_LEGACY_FIELDS = {
    "only_cross_attention": False,
    "double_self_attention": False,
    "use_linear_projection": False,
    "num_vector_embeds": None,
}


def _pixart_defaults() -> dict[str, Any]:
    from diffusers import PixArtTransformer2DModel

    sig = inspect.signature(PixArtTransformer2DModel.__init__)
    return {k: v.default for k, v in sig.parameters.items() if k != "self"}


def _full_pixart_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    defaults = _pixart_defaults()
    out = dict(defaults)
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        if key in _LEGACY_FIELDS:
            if value != _LEGACY_FIELDS[key]:
                raise ConversionError(
                    f"pixart config.{key}={value!r}: only {_LEGACY_FIELDS[key]!r} is a PixArt model"
                )
            continue
        if key not in defaults:
            raise ConversionError(
                f"pixart config.{key}: not a PixArtTransformer2DModel argument "
                f"({', '.join(defaults)})"
            )
        out[key] = value
    return out


def _require(cfg: Mapping[str, Any], key: str, ok: bool, why: str) -> None:
    if not ok:
        raise ConversionError(f"pixart config.{key}={cfg[key]!r}: {why}")


def hf_config_from_pixart_config(
    pixart_config: Mapping[str, Any], *, cond_tokens: int = 120
) -> dict[str, Any]:
    """``LumosTransformer2DModel`` kwargs computing what the PixArt config computes.

    ``cond_tokens`` sizes the null caption (PixArt has none; 120 T5 tokens for PixArt-alpha).
    """
    c = _full_pixart_config(pixart_config)
    heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
    inner = heads * head_dim
    _require(c, "norm_type", c["norm_type"] == "ada_norm_single", "only adaLN-single exists")
    _require(
        c,
        "norm_eps",
        c["norm_eps"] == PIXART_FINAL_NORM_EPS,
        f"PixArt's final norm uses eps {PIXART_FINAL_NORM_EPS} whatever norm_eps is, while "
        "LumosTransformer2DModel uses one eps for all norms",
    )
    _require(
        c,
        "norm_elementwise_affine",
        not c["norm_elementwise_affine"],
        "affine block norms have no slot in LumosTransformer2DModel",
    )
    _require(c, "attention_bias", bool(c["attention_bias"]), "Q/K/V projections must have bias")
    _require(
        c,
        "activation_fn",
        c["activation_fn"] == "gelu-approximate",
        "the MLP is GELU with tanh approximation",
    )
    _require(
        c,
        "caption_channels",
        c["caption_channels"] is not None,
        "LumosTransformer2DModel always projects the condition (set the caption width)",
    )
    _require(
        c,
        "cross_attention_dim",
        c["cross_attention_dim"] == inner,
        f"cross-attention reads the projected caption, width heads*head_dim={inner}",
    )
    _require(
        c,
        "attention_type",
        c["attention_type"] in ("default", None),
        "GLIGEN gated attention is not supported",
    )
    _require(c, "dropout", not c["dropout"], "LumosTransformer2DModel has no dropout")
    sample, patch = c["sample_size"], c["patch_size"]
    use_add = c["use_additional_conditions"]
    if use_add is None:  # PixArtTransformer2DModel.__init__'s rule
        use_add = sample == 128
    interp = c["interpolation_scale"]
    if interp is None:  # PixArtTransformer2DModel.__init__'s rule
        interp = max(sample // 64, 1)
    in_ch = c["in_channels"]
    out_ch = in_ch if c["out_channels"] is None else c["out_channels"]
    return dict(
        sample_size=sample,
        patch_size=patch,
        in_channels=in_ch,
        out_channels=out_ch,
        learn_sigma=out_ch == 2 * in_ch,
        hidden_size=inner,
        depth=c["num_layers"],
        num_heads=heads,
        mlp_ratio=MLP_RATIO,
        cond_channels=c["caption_channels"],
        cond_tokens=cond_tokens,
        adaln_type="single",
        use_size_conditioning=bool(use_add),
        pos_base_size=None,  # = sample_size // patch_size, PatchEmbed's base_size
        pos_interpolation_scale=float(interp),
        cond_dropout_prob=0.0,  # no learned null caption to drop to
        norm_eps=PIXART_FINAL_NORM_EPS,
    )


# Lumos options diffusers' PixArt class has no slot for, with the value it computes.
_PLAIN_IMAGE_MODEL = {
    "camera_dim": None,
    "norm_type": "layernorm",
    "qk_norm": False,
    "pos_embed_type": "sincos",
    "cross_attn_gate": False,
}


def pixart_config_from_hf_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """``PixArtTransformer2DModel`` kwargs computing what the Lumos HF config computes."""
    c = {**hf_config_defaults(), **{k: v for k, v in hf_config.items() if not k.startswith("_")}}

    def need(key: str, ok: bool, why: str) -> None:
        if not ok:
            raise ConversionError(f"config.{key}={c[key]!r}: {why}")

    if hf_class_of_config(hf_config) != HF_CLASS:
        raise ConversionError(
            f"{hf_class_of_config(hf_config)}: PixArtTransformer2DModel holds image models only"
        )
    need("adaln_type", c["adaln_type"] == "single", "PixArt blocks are adaLN-single")
    for key, plain in _PLAIN_IMAGE_MODEL.items():
        need(key, c[key] == plain, f"PixArtTransformer2DModel only has {key}={plain!r}")
    need("mlp_ratio", c["mlp_ratio"] == MLP_RATIO, f"PixArt's MLP ratio is {MLP_RATIO:g}")
    need(
        "norm_eps",
        c["norm_eps"] == PIXART_FINAL_NORM_EPS,
        f"PixArt's final norm always uses eps {PIXART_FINAL_NORM_EPS}",
    )
    base = c["sample_size"] // c["patch_size"]
    need(
        "pos_base_size",
        c["pos_base_size"] in (None, base),
        f"PixArt stretches positions to sample_size // patch_size = {base}",
    )
    in_ch, learn_sigma = c["in_channels"], c["learn_sigma"]
    out_ch = c["out_channels"] or (2 * in_ch if learn_sigma else in_ch)
    hidden, heads = c["hidden_size"], c["num_heads"]
    scale = float(c["pos_interpolation_scale"])
    return dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=in_ch,
        out_channels=out_ch,
        num_layers=c["depth"],
        dropout=0.0,
        cross_attention_dim=hidden,
        attention_bias=True,
        sample_size=c["sample_size"],
        patch_size=c["patch_size"],
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        upcast_attention=False,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=PIXART_FINAL_NORM_EPS,
        interpolation_scale=int(scale) if scale.is_integer() else scale,
        use_additional_conditions=bool(c["use_size_conditioning"]),
        caption_channels=c["cond_channels"],
        attention_type="default",
    )


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------
def _name_map(depth: int, size_cond: bool) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """``(one-to-one PixArt -> HF prefixes, fused HF prefix -> PixArt prefixes in order)``."""
    plain = {
        "pos_embed.proj": "x_embedder.proj",
        "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "adaln_single.linear": "t_block.1",
        "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "scale_shift_table": "final_layer.scale_shift_table",
        "proj_out": "final_layer.linear",
    }
    if size_cond:
        for src, dst in (("resolution", "csize"), ("aspect_ratio", "ar")):
            plain[f"adaln_single.emb.{src}_embedder.linear_1"] = f"{dst}_embedder.mlp.0"
            plain[f"adaln_single.emb.{src}_embedder.linear_2"] = f"{dst}_embedder.mlp.2"
    fused: dict[str, tuple[str, ...]] = {}
    for i in range(depth):
        p, h = f"transformer_blocks.{i}.", f"blocks.{i}."
        plain[p + "scale_shift_table"] = h + "scale_shift_table"
        plain[p + "attn1.to_out.0"] = h + "attn.proj"
        plain[p + "attn2.to_q"] = h + "cross_attn.q_linear"
        plain[p + "attn2.to_out.0"] = h + "cross_attn.proj"
        plain[p + "ff.net.0.proj"] = h + "mlp.fc1"
        plain[p + "ff.net.2"] = h + "mlp.fc2"
        fused[h + "attn.qkv"] = tuple(p + f"attn1.to_{x}" for x in "qkv")
        fused[h + "cross_attn.kv_linear"] = tuple(p + f"attn2.to_{x}" for x in "kv")
    return plain, fused


def _split_param(name: str) -> tuple[str, str]:
    """``"a.b.weight" -> ("a.b", "weight")``; a bare parameter has an empty suffix."""
    for suffix in ("weight", "bias"):
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return name, ""


def _join(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if suffix else prefix


def _get(sd: Mapping[str, Tensor], name: str, layout: str) -> Tensor:
    if name not in sd:
        raise ConversionError(f"{layout} state dict lacks tensor {name!r}")
    return sd[name]


def _check_shapes(sd: Mapping[str, Tensor], hf_config: Mapping[str, Any], layout: str) -> None:
    """Compare converted tensors with a meta-device model of the target class."""
    from diffusers import PixArtTransformer2DModel

    from lumos_mcore.hf.lumos_transformer_2d import LumosTransformer2DModel

    model_cls = PixArtTransformer2DModel if layout == "pixart" else LumosTransformer2DModel
    with torch.device("meta"):
        ref = model_cls(**hf_config).state_dict()
    extra, missing = sorted(set(sd) - set(ref)), sorted(set(ref) - set(sd))
    if extra or missing:
        raise ConversionError(
            f"{layout} tensors do not match the config: extra {extra}, missing {missing}"
        )
    for name, t in sd.items():
        if tuple(t.shape) != tuple(ref[name].shape):
            raise ConversionError(
                f"{layout} tensor {name!r} would have shape {tuple(t.shape)}, but the config "
                f"gives {tuple(ref[name].shape)}"
            )


def pixart_to_hf(
    sd: Mapping[str, Tensor],
    pixart_config: Mapping[str, Any],
    *,
    cond_tokens: int = 120,
    null_cond: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """diffusers PixArt state dict + config -> ``LumosTransformer2DModel`` state dict + kwargs.

    ``null_cond [cond_tokens, caption_channels]`` becomes the learned null caption (zeros when
    not given, e.g. replace by the T5 embedding of the empty prompt for classifier-free
    guidance training).
    """
    hf_config = hf_config_from_pixart_config(pixart_config, cond_tokens=cond_tokens)
    plain, fused = _name_map(hf_config["depth"], hf_config["use_size_conditioning"])
    fused_parts = {part: dst for dst, parts in fused.items() for part in parts}
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if name == "pos_embed.pos_embed":
            continue  # fixed sin-cos buffer, recomputed by both classes
        prefix, suffix = _split_param(name)
        if prefix in plain and suffix in ("weight", "bias", ""):
            out[_join(plain[prefix], suffix)] = t
        elif prefix in fused_parts and suffix:
            continue  # concatenated below, once all parts are known to exist
        else:
            raise ConversionError(
                f"pixart tensor {name!r}: not a tensor of this PixArt config "
                f"(num_layers={hf_config['depth']}, "
                f"use_additional_conditions={hf_config['use_size_conditioning']})"
            )
    for dst, parts in fused.items():
        for suffix in ("weight", "bias"):
            out[_join(dst, suffix)] = torch.cat(
                [_get(sd, f"{p}.{suffix}", "pixart") for p in parts]
            )
    cc = hf_config["cond_channels"]
    if null_cond is None:
        null_cond = torch.zeros(cond_tokens, cc, dtype=out["y_embedder.y_proj.fc1.weight"].dtype)
    if tuple(null_cond.shape) != (cond_tokens, cc):
        raise ConversionError(
            f"null_cond has shape {tuple(null_cond.shape)}, expected ({cond_tokens}, {cc}) "
            "(cond_tokens, caption_channels)"
        )
    out["y_embedder.y_embedding"] = null_cond
    _check_shapes(out, hf_config, "hf")
    return out, hf_config


def hf_to_pixart(
    sd: Mapping[str, Tensor], hf_config: Mapping[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``LumosTransformer2DModel`` state dict + config -> diffusers PixArt state dict + kwargs.

    Only adaLN-single models with PixArt's norm eps have a PixArt twin; the null caption
    ``y_embedder.y_embedding`` has no PixArt slot and is dropped.
    """
    pixart_config = pixart_config_from_hf_config(hf_config)
    d = pixart_config["num_attention_heads"] * pixart_config["attention_head_dim"]
    plain, fused = _name_map(
        pixart_config["num_layers"], pixart_config["use_additional_conditions"]
    )
    inverse = {hf: px for px, hf in plain.items()}
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if name == "y_embedder.y_embedding":
            continue
        prefix, suffix = _split_param(name)
        if prefix in inverse and suffix in ("weight", "bias", ""):
            out[_join(inverse[prefix], suffix)] = t
        elif prefix in fused and suffix:
            parts = fused[prefix]
            if t.shape[0] != len(parts) * d:
                raise ConversionError(
                    f"hf tensor {name!r} has shape {tuple(t.shape)}: expected "
                    f"{len(parts) * d} rows ({len(parts)} x hidden {d})"
                )
            for part, piece in zip(parts, t.chunk(len(parts), dim=0)):
                out[f"{part}.{suffix}"] = piece.clone()
        else:
            raise ConversionError(
                f"hf tensor {name!r}: not a tensor of a PixArt-compatible model with "
                f"depth={pixart_config['num_layers']}, "
                f"use_size_conditioning={pixart_config['use_additional_conditions']}"
            )
    _check_shapes(out, pixart_config, "pixart")
    return out, pixart_config

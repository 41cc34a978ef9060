"""Map full megatron ``LumosDiT`` state dicts to / from the HF classes' ones
(``LumosTransformer2DModel`` for I2I / T2I / NVS, ``LumosTransformer3DModel`` for I2V).

Both sides are *full* state dicts: unsharded tensors, global layer indices (what
``state_dict.assemble`` builds from the ranks and ``state_dict.load_full_state_dict`` shards
again). Names differ only inside the transformer blocks::

    megatron  decoder.layers.{i}.                     HF (released Lumos)  blocks.{i}.
      adaln.linear                                      adaLN_modulation.1     (adaln "zero")
      adaln.scale_shift_table                           scale_shift_table      (adaln "single")
      self_attention.linear_qkv   [q_h; k_h; v_h]_h     attn.qkv               [Q; K; V]
      self_attention.linear_proj                        attn.proj
      cross_attention.linear_q                          cross_attn.q_linear
      cross_attention.linear_kv   [k_h; v_h]_h          cross_attn.kv_linear   [K; V]
      cross_attention.linear_proj                       cross_attn.proj
      mlp.linear_fc1 / linear_fc2                       mlp.fc1 / mlp.fc2
      temporal_attention.linear_qkv / linear_proj       temporal_attn.qkv / proj (I2V s+t)
      {self,temporal}_attention.{q,k}_layernorm         {attn,temporal_attn}.{q,k}_norm
      cross_attention.core_attention.gate               cross_attn.gate        (gated)

Embedders (``x_embedder``, ``t_embedder``, ``y_embedder``, ``csize_embedder``, ``ar_embedder``,
``t_block``, ``camera_embedder``) and ``final_layer`` have the same names on both sides.
megatron fuses Q/K/V *per head* (so that a tensor-parallel rank's heads are one contiguous row
block), the released code fuses them *per projection*; the fused weights and biases are permuted
accordingly — a pure permutation, so a round trip is bit-exact.

Every tensor maps to exactly one tensor, so :class:`StateDictConverter` converts tensor by
tensor (streaming a large checkpoint needs no more memory than one tensor); it checks every
name and shape against the architecture in the ``ModelConfig`` and reports unknown, repeated and
missing tensors by name. No megatron import: this runs wherever the checkpoint is.
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.models.common.registry import MODEL_SIZES

__all__ = [
    "ConversionError",
    "StateDictConverter",
    "check_state_dict",
    "HF_CLASS",
    "HF_CLASSES",
    "HF_VIDEO_CLASS",
    "hf_class_name",
    "hf_class_of_config",
    "hf_config_defaults",
    "hf_model_class",
    "hf_config_from_model_config",
    "hf_shapes",
    "hf_to_mcore",
    "mcore_shapes",
    "mcore_to_hf",
    "model_config_from_hf_config",
]

FREQ_DIM = 256  # sinusoidal feature width of the timestep / size embedders
LAYOUTS = ("mcore", "hf")


class ConversionError(ValueError):
    """A state dict does not fit the architecture it is converted for."""


# ---------------------------------------------------------------------------------------------
# the name / shape table
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """One tensor: its name on both sides, its shape, and how the rows are permuted."""

    mcore: str
    hf: str
    shape: tuple[int, ...]
    fused: int = 0  # 0: plain copy; 3: per-head QKV; 2: per-head KV


def _table(cfg: ModelConfig) -> list[_Entry]:
    d, p = cfg.hidden_size_, cfg.patch_size
    f = int(d * cfg.mlp_ratio)
    entries: list[_Entry] = []

    def same(name: str, shape: tuple[int, ...]) -> None:
        entries.append(_Entry(name, name, shape))

    def linear(name: str, out_f: int, in_f: int) -> None:
        same(f"{name}.weight", (out_f, in_f))
        same(f"{name}.bias", (out_f,))

    same("x_embedder.proj.weight", (d, cfg.model_in_channels, p, p))
    same("x_embedder.proj.bias", (d,))
    linear("t_embedder.mlp.0", d, FREQ_DIM)
    linear("t_embedder.mlp.2", d, d)
    if cfg.use_size_conditioning:
        for emb in ("csize_embedder", "ar_embedder"):
            linear(f"{emb}.mlp.0", d // 3, FREQ_DIM)
            linear(f"{emb}.mlp.2", d // 3, d // 3)
    if cfg.adaln_type == "single":
        linear("t_block.1", 6 * d, d)
    linear("y_embedder.y_proj.fc1", d, cfg.cond_channels)
    linear("y_embedder.y_proj.fc2", d, d)
    same("y_embedder.y_embedding", (cfg.cond_tokens, cfg.cond_channels))
    if cfg.variant == "nvs":
        linear("camera_embedder.mlp.fc1", d, cfg.camera_dim)
        linear("camera_embedder.mlp.fc2", d, d)

    layer_map = [
        ("self_attention.linear_qkv", "attn.qkv", 3 * d, d, 3),
        ("self_attention.linear_proj", "attn.proj", d, d, 0),
        ("cross_attention.linear_q", "cross_attn.q_linear", d, d, 0),
        ("cross_attention.linear_kv", "cross_attn.kv_linear", 2 * d, d, 2),
        ("cross_attention.linear_proj", "cross_attn.proj", d, d, 0),
        ("mlp.linear_fc1", "mlp.fc1", f, d, 0),
        ("mlp.linear_fc2", "mlp.fc2", d, f, 0),
    ]
    if cfg.adaln_type == "zero":
        layer_map.insert(0, ("adaln.linear", "adaLN_modulation.1", 6 * d, d, 0))
    attentions = [("self_attention", "attn")]
    if cfg.temporal_attention:
        attentions.append(("temporal_attention", "temporal_attn"))
        layer_map += [
            ("temporal_attention.linear_qkv", "temporal_attn.qkv", 3 * d, d, 3),
            ("temporal_attention.linear_proj", "temporal_attn.proj", d, d, 0),
        ]
    # Per-head QK-norm (megatron's q/k_layernorm: torch / TE LayerNorm with bias, RMSNorm
    # without) and the per-head cross-attention gate: plain copies.
    norm_params = ("weight", "bias") if cfg.norm == "layernorm" else ("weight",)
    head_dim = d // cfg.num_heads_
    for i in range(cfg.depth_):
        m, h = f"decoder.layers.{i}.", f"blocks.{i}."
        if cfg.adaln_type == "single":
            entries.append(_Entry(m + "adaln.scale_shift_table", h + "scale_shift_table", (6, d)))
        for mname, hname, out_f, in_f, fused in layer_map:
            entries.append(_Entry(f"{m}{mname}.weight", f"{h}{hname}.weight", (out_f, in_f), fused))
            entries.append(_Entry(f"{m}{mname}.bias", f"{h}{hname}.bias", (out_f,), fused))
        if cfg.qk_norm:
            for (mattn, hattn), qk, param in itertools.product(attentions, "qk", norm_params):
                entries.append(
                    _Entry(
                        f"{m}{mattn}.{qk}_layernorm.{param}",
                        f"{h}{hattn}.{qk}_norm.{param}",
                        (head_dim,),
                    )
                )
        if cfg.cross_attn_gate:
            entries.append(
                _Entry(
                    f"{m}cross_attention.core_attention.gate",
                    f"{h}cross_attn.gate",
                    (cfg.num_heads_,),
                )
            )

    linear("final_layer.linear", p * p * cfg.out_channels, d)
    same("final_layer.scale_shift_table", (2, d))
    return entries


def mcore_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a full megatron ``LumosDiT`` and its shape."""
    return {e.mcore: e.shape for e in _table(model_cfg)}


def hf_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the matching ``LumosTransformer2DModel`` state dict and its shape."""
    return {e.hf: e.shape for e in _table(model_cfg)}


def _permute_heads(t: Tensor, groups: int, heads: int, to_per_head: bool) -> Tensor:
    """Reorder fused projection rows between ``[P_0; P_1; ...]`` (per projection, HF) and
    ``[p0_h; p1_h; ...]_h`` (per head, megatron); ``groups`` projections of ``heads`` heads."""
    rows, rest = t.shape[0], t.shape[1:]
    hd = rows // (groups * heads)
    if to_per_head:
        out = t.reshape(groups, heads, hd, *rest).transpose(0, 1)  # [H, G, hd, ...]
    else:
        out = t.reshape(heads, groups, hd, *rest).transpose(0, 1)  # [G, H, hd, ...]
    return out.reshape(rows, *rest).contiguous()  # [G*H*hd, ...]


# ---------------------------------------------------------------------------------------------
# streaming conversion
# ---------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"^(decoder\.layers|blocks)\.(\d+)\.")


class StateDictConverter:
    """Convert one tensor at a time from ``source`` ("mcore" or "hf") to the other layout.

    ``convert_key(name, tensor)`` returns the converted ``[(name, tensor)]`` (an empty list for
    megatron's tensor-free ``*._extra_state`` entries); ``finish()`` raises if a tensor the
    architecture needs never came. Plain copies are returned as the same tensor object (no
    copy); fused QKV / KV tensors are new tensors.
    """

    def __init__(self, model_cfg: ModelConfig, source: str) -> None:
        if source not in LAYOUTS:
            raise ValueError(f"source={source!r}: choose one of {', '.join(LAYOUTS)}")
        self.model_cfg = model_cfg
        self.source = source
        self.target = "hf" if source == "mcore" else "mcore"
        self._entries = {getattr(e, source): e for e in _table(model_cfg)}
        self._seen: set[str] = set()

    def convert_key(self, name: str, tensor: Any) -> list[tuple[str, Tensor]]:
        """Convert one tensor; raise ``ConversionError`` naming it if it does not belong."""
        if self.source == "mcore" and name.endswith("._extra_state"):
            return []  # TE / megatron module metadata, no weights
        entry = self._entries.get(name)
        if entry is None:
            raise ConversionError(f"{self.source} tensor {name!r}: {self._why_unknown(name)}")
        if name in self._seen:
            raise ConversionError(f"{self.source} tensor {name!r} was given twice")
        if not isinstance(tensor, Tensor):
            raise ConversionError(
                f"{self.source} tensor {name!r}: expected a torch.Tensor, got "
                f"{type(tensor).__name__}"
            )
        if tuple(tensor.shape) != entry.shape:
            raise ConversionError(
                f"{self.source} tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{entry.shape} for {self._arch()}"
            )
        self._seen.add(name)
        out = tensor
        if entry.fused:
            to_per_head = self.source == "hf"
            out = _permute_heads(tensor, entry.fused, self.model_cfg.num_heads_, to_per_head)
        return [(getattr(entry, self.target), out)]

    @property
    def missing(self) -> list[str]:
        """Source tensors the architecture needs that have not been converted yet."""
        return [n for n in self._entries if n not in self._seen]

    def finish(self) -> None:
        """Raise ``ConversionError`` listing the tensors that never came."""
        missing = self.missing
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ConversionError(
                f"{self.source} state dict lacks {len(missing)} tensor(s) of {self._arch()}: "
                f"{shown}"
            )

    def _arch(self) -> str:
        c = self.model_cfg
        return (
            f"a model with depth={c.depth_}, hidden_size={c.hidden_size_}, "
            f"num_heads={c.num_heads_}, patch_size={c.patch_size}, adaln_type={c.adaln_type!r}, "
            f"use_size_conditioning={c.use_size_conditioning}, variant={c.variant!r}"
        )

    def _why_unknown(self, name: str) -> str:
        m = _LAYER_RE.match(name)
        if m is not None and int(m.group(2)) >= self.model_cfg.depth_:
            return f"layer {m.group(2)} does not exist (depth={self.model_cfg.depth_})"
        other = "hf" if self.source == "mcore" else "mcore"
        if any(getattr(e, other) == name for e in self._entries.values()):
            return f"this is a {other} name; convert from source={other!r}"
        return f"not a tensor of {self._arch()}"


def _convert(sd: Mapping[str, Any], model_cfg: ModelConfig, source: str) -> dict[str, Tensor]:
    conv = StateDictConverter(model_cfg, source)
    out: dict[str, Tensor] = {}
    for name, tensor in sd.items():
        out.update(conv.convert_key(name, tensor))
    conv.finish()
    return out


def mcore_to_hf(sd: Mapping[str, Any], model_cfg: ModelConfig) -> dict[str, Tensor]:
    """Full megatron ``LumosDiT`` state dict -> ``LumosTransformer2DModel`` state dict."""
    return _convert(sd, model_cfg, "mcore")


def hf_to_mcore(sd: Mapping[str, Any], model_cfg: ModelConfig) -> dict[str, Tensor]:
    """``LumosTransformer2DModel`` state dict -> full megatron ``LumosDiT`` parameters."""
    return _convert(sd, model_cfg, "hf")


def check_state_dict(
    sd: Mapping[str, Any] | Iterable[tuple[str, Any]], model_cfg: ModelConfig, layout: str
) -> None:
    """Raise ``ConversionError`` unless ``sd`` holds exactly the tensors of ``layout``."""
    conv = StateDictConverter(model_cfg, layout)
    items = sd.items() if isinstance(sd, Mapping) else sd
    for name, tensor in items:
        conv.convert_key(name, tensor)
    conv.finish()


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
def hf_config_from_model_config(
    model_cfg: ModelConfig, *, cond_dropout_prob: float = 0.1
) -> dict[str, Any]:
    """``LumosTransformer2DModel`` kwargs for the architecture of ``model_cfg``.

    The megatron model keeps condition dropout in the training step (``diffusion.cond_dropout``),
    so the export's own training-time dropout is a separate argument.
    """
    c = model_cfg
    config = dict(
        sample_size=c.latent_size,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        learn_sigma=c.learn_sigma,
        hidden_size=c.hidden_size_,
        depth=c.depth_,
        num_heads=c.num_heads_,
        mlp_ratio=float(c.mlp_ratio),
        cond_channels=c.cond_channels,
        cond_tokens=c.cond_tokens,
        adaln_type=c.adaln_type,
        use_size_conditioning=c.use_size_conditioning,
        pos_base_size=None,  # the megatron model always uses latent_size // patch_size
        pos_interpolation_scale=float(c.pos_interpolation_scale),
        cond_dropout_prob=cond_dropout_prob,
        norm_eps=c.norm_eps,
    )
    # Options the released image models do not have: written only when set, so an export of
    # an I2I / T2I model keeps the config.json of the released class.
    extra = dict(
        camera_dim=c.camera_dim if c.variant == "nvs" else None,
        norm_type=c.norm,
        qk_norm=c.qk_norm,
        pos_embed_type=c.pos_embed,
        rope_theta=float(c.rope_theta),
        rope_ntk_factor=float(c.rope_ntk_factor),
        cross_attn_gate=c.cross_attn_gate,
    )
    defaults = hf_config_defaults(hf_class_name(c))
    config.update({k: v for k, v in extra.items() if k in defaults and v != defaults[k]})
    if c.is_video:
        config.update(
            num_frames=c.num_frames,
            video_attention=c.video_attention,
            first_frame_condition=c.first_frame_condition,
        )
    return config


HF_CLASS = "LumosTransformer2DModel"
HF_VIDEO_CLASS = "LumosTransformer3DModel"
HF_CLASSES = (HF_CLASS, HF_VIDEO_CLASS)
_VIDEO_FIELDS = ("num_frames", "video_attention", "first_frame_condition")


def hf_class_name(model_cfg: ModelConfig) -> str:
    """The diffusers class an export of ``model_cfg`` holds: 3-D for video, else 2-D."""
    return HF_VIDEO_CLASS if model_cfg.is_video else HF_CLASS


def hf_model_class(name: str = HF_CLASS) -> type:
    """The class named by a ``config.json``'s ``_class_name`` (one of ``HF_CLASSES``)."""
    from lumos_mcore.hf import LumosTransformer2DModel, LumosTransformer3DModel

    classes = {HF_CLASS: LumosTransformer2DModel, HF_VIDEO_CLASS: LumosTransformer3DModel}
    if name not in classes:
        raise ConversionError(f"model class {name!r}: expected one of {', '.join(HF_CLASSES)}")
    return classes[name]


def hf_class_of_config(cfg: Mapping[str, Any]) -> str:
    """Class of a config dict: its ``_class_name``, else 3-D when it has video fields."""
    name = cfg.get("_class_name")
    if name is not None:
        return name
    return HF_VIDEO_CLASS if any(k in cfg for k in _VIDEO_FIELDS) else HF_CLASS


def hf_config_defaults(class_name: str = HF_CLASS) -> dict[str, Any]:
    """Constructor defaults of an HF class (fill-ins for partial config dicts)."""
    sig = inspect.signature(hf_model_class(class_name).__init__)
    return {k: v.default for k, v in sig.parameters.items() if k != "self"}


T5_CHANNELS = 4096  # Flan-T5-XXL width: a T2I condition


def model_config_from_hf_config(cfg: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """``ModelConfig`` of the megatron model equivalent to a ``LumosTransformer2DModel`` config.

    ``cfg`` may be ``model.config`` or a ``config.json`` dict (``_``-prefixed metadata is
    ignored; missing fields take the class defaults). The backbone name is the registry entry
    with the same shape when there is one, else a same-patch entry with explicit
    ``depth``/``hidden_size``/``num_heads``. ``variant`` is ``i2v`` for the 3-D class, ``nvs``
    with a ``camera_dim``, else (no effect on the weights) ``t2i`` for T5-width conditions or
    size conditioning, else ``i2i``;
    ``overrides`` set any other ``ModelConfig`` field (``spec``, ``recompute``, ...).
    """
    class_name = hf_class_of_config(cfg)
    defaults = hf_config_defaults(class_name)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ConversionError(
            f"config fields {unknown} are not {class_name} arguments ({', '.join(defaults)})"
        )
    c = {**defaults, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    p, d, depth, heads = c["patch_size"], c["hidden_size"], c["depth"], c["num_heads"]
    in_ch, learn_sigma = c["in_channels"], bool(c["learn_sigma"])
    expected_out = 2 * in_ch if learn_sigma else in_ch
    if c["out_channels"] is not None and c["out_channels"] != expected_out:
        raise ConversionError(
            f"config.out_channels={c['out_channels']}: the megatron model predicts "
            f"{expected_out} channels for in_channels={in_ch}, learn_sigma={learn_sigma} "
            "(2*in with learned sigma, else in)"
        )
    if c["pos_base_size"] is not None and c["pos_base_size"] != c["sample_size"] // p:
        raise ConversionError(
            f"config.pos_base_size={c['pos_base_size']}: the megatron model stretches positions "
            f"to sample_size // patch_size = {c['sample_size'] // p}; set pos_base_size=None "
            "or sample_size to pos_base_size * patch_size"
        )
    same_patch = {n: s for n, s in MODEL_SIZES.items() if s.patch_size == p}
    if not same_patch:
        patches = sorted({s.patch_size for s in MODEL_SIZES.values()})
        raise ConversionError(
            f"config.patch_size={p}: the model registry has patch sizes {patches}"
        )
    exact = [
        n
        for n, s in same_patch.items()
        if (s.depth, s.hidden_size, s.num_heads) == (depth, d, heads)
        and s.mlp_ratio == c["mlp_ratio"]
    ]
    if exact:
        arch: dict[str, Any] = {"name": exact[0]}
    else:
        name = next((n for n in same_patch if n.startswith("Lumos-XL/")), next(iter(same_patch)))
        if MODEL_SIZES[name].mlp_ratio != c["mlp_ratio"]:
            raise ConversionError(
                f"config.mlp_ratio={c['mlp_ratio']}: the megatron model uses mlp_ratio "
                f"{MODEL_SIZES[name].mlp_ratio}"
            )
        arch = {"name": name, "depth": depth, "hidden_size": d, "num_heads": heads}
    variant_fields = {}
    if class_name == HF_VIDEO_CLASS:
        variant = "i2v"
        variant_fields = {k: c[k] for k in _VIDEO_FIELDS}
    elif c.get("camera_dim") is not None:
        variant = "nvs"
        variant_fields = {"camera_dim": c["camera_dim"]}
    elif c["cond_channels"] == T5_CHANNELS or c["use_size_conditioning"]:
        variant = "t2i"
    else:
        variant = "i2i"
    kwargs = dict(
        arch,
        variant=variant,
        in_channels=in_ch,
        latent_size=c["sample_size"],
        learn_sigma=learn_sigma,
        cond_channels=c["cond_channels"],
        cond_tokens=c["cond_tokens"],
        adaln_type=c["adaln_type"],
        use_size_conditioning=bool(c["use_size_conditioning"]),
        pos_interpolation_scale=float(c["pos_interpolation_scale"]),
        norm_eps=float(c["norm_eps"]),
        norm=c["norm_type"],
        qk_norm=bool(c["qk_norm"]),
        pos_embed=c["pos_embed_type"],
        rope_theta=float(c["rope_theta"]),
        rope_ntk_factor=float(c["rope_ntk_factor"]),
        cross_attn_gate=bool(c["cross_attn_gate"]),
        **variant_fields,
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)

"""Analytic FLOP count of a Lumos DiT train step (DESIGN.md §4).

Only matrix multiplies are counted (2 FLOPs per multiply-add); norms, activations, softmax and
the adaLN modulation are elementwise and left out, as in the usual MFU accounting (PaLM, Megatron).
Counts are *per sample* and use the sample's own token count ``L`` (for a packed sequence the
attention term is per sample, not per pack).

Forward FLOPs of one transformer block, hidden ``D``, MLP ratio ``r``, ``Lc`` condition tokens::

    self-attention projections  QKV + out       8·L·D²
    self-attention core         QKᵀ + AV        4·L²·D        (full 3-D / image attention)
    cross-attention             Q + out         4·L·D²
                                QKᵀ + AV        4·L·Lc·D
                                K/V of the cond 4·Lc·D²
                                (one token, as executed: K/V 4·D² + out of one row 2·D²)
    MLP                                         4·r·L·D²      (16·L·D² at r = 4)
    adaLN-Zero (per block)      Linear(D, 6D)   12·D²         (adaLN-single: once per model)

plus the embedders (patch conv ``2·L·C·p²·D``, timestep MLP, condition MLP, size and camera
embedders) and
the final layer ``2·L·D·p²·C_out``. A train step is forward + backward = 3 × forward
("model FLOPs", what MFU is computed from). Activation recompute re-runs forward work
("hardware FLOPs"): full recompute repeats the transformer blocks (4 × their forward), selective
recompute repeats the attention cores.

Video with ``attention="spatial_temporal"`` (``frames`` = T, ``L = T·S``): spatial attention per
frame ``4·L·S·D`` in place of ``4·L²·D``, plus a temporal self-attention per block over the T
frames at each position, ``8·L·D² + 4·L·T·D``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ATTENTION_MODES = ("full", "spatial_temporal")
RECOMPUTE_MODES = ("none", "selective", "full")

__all__ = [
    "ATTENTION_MODES",
    "DiTShape",
    "FlopCount",
    "RECOMPUTE_MODES",
    "count_flops",
    "count_model_flops",
    "pixart_shape",
    "recomputed_share",
]


@dataclass(frozen=True)
class DiTShape:
    """What the FLOP count needs to know about a Lumos / PixArt-style DiT."""

    depth: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8
    cond_tokens: int = 1
    cond_channels: int = 768
    adaln_type: str = "zero"  # "zero": per-block Linear(D, 6D); "single": one t_block per model
    use_size_conditioning: bool = False
    camera_dim: int = 0  # NVS: relative-camera MLP (camera_dim -> D -> D); 0 = none
    frequency_embedding_size: int = 256

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "cond_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTShape.{name}={getattr(self, name)}: must be >= 1")
        if self.adaln_type not in ("zero", "single"):
            raise ValueError(f"DiTShape.adaln_type={self.adaln_type!r}: choose zero or single")

    @classmethod
    def from_model_config(cls, cfg) -> DiTShape:
        """Shape of the model a ``ModelConfig`` describes (registry size + overrides)."""
        return cls(
            depth=cfg.depth_,
            hidden_size=cfg.hidden_size_,
            num_heads=cfg.num_heads_,
            mlp_ratio=cfg.mlp_ratio,
            patch_size=cfg.patch_size,
            in_channels=getattr(cfg, "model_in_channels", cfg.in_channels),
            out_channels=cfg.out_channels,
            cond_tokens=cfg.cond_tokens,
            cond_channels=cfg.cond_channels,
            adaln_type=cfg.adaln_type,
            use_size_conditioning=cfg.use_size_conditioning,
            camera_dim=cfg.camera_dim if getattr(cfg, "variant", "") == "nvs" else 0,
        )


def pixart_shape(shape: DiTShape) -> DiTShape:
    """The same dimensions as diffusers' ``PixArtTransformer2DModel`` builds them (adaLN-single)."""
    return DiTShape(**{**asdict(shape), "adaln_type": "single"})


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one sample by component, and the train-step totals derived from them."""

    tokens: int
    linear: float  # self-attention projections + MLP (+ temporal projections)
    self_attention: float  # attention cores over the image / video tokens
    cross_attention_proj: float  # Q / out projections + K/V of the condition
    cross_attention_core: float  # QKᵀ + AV against the condition tokens
    adaln_blocks: float  # per-block adaLN-Zero linears (0 for adaLN-single)
    adaln_shared: float  # the shared adaLN-single ``t_block`` (0 for adaLN-Zero)
    embed: float  # patch, timestep, size and condition embedders
    final: float  # output projection
    recompute: str = "none"
    # Share of the blocks full recompute re-runs: 1 for megatron's "uniform" method, k / (layers
    # per stage chunk) for "block" with recompute_num_layers=k (see recomputed_share).
    recompute_share: float = 1.0

    @property
    def cross_attention(self) -> float:
        return self.cross_attention_proj + self.cross_attention_core

    @property
    def adaln(self) -> float:
        return self.adaln_blocks + self.adaln_shared

    @property
    def blocks_forward(self) -> float:
        """Forward FLOPs inside the transformer blocks (what full recompute re-runs)."""
        return self.linear + self.self_attention + self.cross_attention + self.adaln_blocks

    @property
    def forward(self) -> float:
        """Forward FLOPs of one sample."""
        return self.blocks_forward + self.adaln_shared + self.embed + self.final

    @property
    def model_train(self) -> float:
        """Forward + backward of one sample (3 × forward): the basis of MFU."""
        return 3.0 * self.forward

    @property
    def hardware_train(self) -> float:
        """Train FLOPs actually executed, including recomputed forward work."""
        if self.recompute == "full":
            return self.model_train + self.recompute_share * self.blocks_forward
        if self.recompute == "selective":
            return self.model_train + self.self_attention + self.cross_attention_core
        return self.model_train

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain numbers for JSON reports."""
        return {
            "tokens": self.tokens,
            "linear": self.linear,
            "self_attention": self.self_attention,
            "cross_attention": self.cross_attention,
            "adaln": self.adaln,
            "embed": self.embed,
            "final": self.final,
            "forward": self.forward,
            "model_train": self.model_train,
            "hardware_train": self.hardware_train,
            "recompute": self.recompute,
        }


def count_flops(
    shape: DiTShape,
    tokens: int,
    *,
    frames: int = 1,
    attention: str = "full",
    recompute: str = "none",
    cond_tokens: int | None = None,
    single_token_cross: bool = False,
    recompute_share: float = 1.0,
) -> FlopCount:
    """FLOPs of one sample of ``tokens`` image/video tokens (all frames) through ``shape``.

    ``cond_tokens`` overrides ``shape.cond_tokens`` (e.g. the real length of a padded caption).
    ``single_token_cross``: count the cross-attention as our DiT runs it for one condition token
    (``models/dit/cross_attention.py``): K/V of the token and the out-projection of one row per
    sample, ``4·D² + 2·D²``, instead of ``4·L·D² + 4·L·D + 4·D²`` -- the work that is executed,
    so that MFU does not credit skipped work. ``recompute_share``: the blocks full recompute
    re-runs (:func:`recomputed_share`).
    """
    if not 0.0 <= recompute_share <= 1.0:
        raise ValueError(f"recompute_share={recompute_share}: must lie in [0, 1]")
    if tokens < 1:
        raise ValueError(f"tokens={tokens}: must be >= 1")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r}: choose one of {', '.join(ATTENTION_MODES)}")
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}: choose one of {', '.join(RECOMPUTE_MODES)}")
    if frames < 1 or tokens % frames:
        raise ValueError(f"frames={frames}: must be >= 1 and divide tokens={tokens}")
    d, n_layers = float(shape.hidden_size), shape.depth
    big_l = float(tokens)
    lc = float(cond_tokens if cond_tokens is not None else shape.cond_tokens)
    mlp = 4.0 * shape.mlp_ratio * big_l * d * d

    linear = 8.0 * big_l * d * d + mlp
    if attention == "full":
        core = 4.0 * big_l * big_l * d
    else:  # spatial attention inside each frame + temporal attention across frames
        per_frame = big_l / frames
        core = 4.0 * big_l * per_frame * d + 4.0 * big_l * frames * d
        linear += 8.0 * big_l * d * d
    cross_core = 4.0 * big_l * lc * d
    cross_proj = 4.0 * big_l * d * d + 4.0 * lc * d * d
    if single_token_cross and lc == 1:
        cross_core, cross_proj = 0.0, 4.0 * d * d + 2.0 * d * d
    adaln_block = 12.0 * d * d if shape.adaln_type == "zero" else 0.0

    f = float(shape.frequency_embedding_size)
    patch_in = shape.in_channels * shape.patch_size**2
    embed = 2.0 * big_l * patch_in * d  # patch conv
    embed += 2.0 * f * d + 2.0 * d * d  # timestep MLP
    embed += 2.0 * lc * shape.cond_channels * d + 2.0 * lc * d * d  # condition MLP
    if shape.use_size_conditioning:
        d3 = d / 3.0
        embed += 3.0 * (2.0 * f * d3 + 2.0 * d3 * d3)  # resolution (h, w) + aspect ratio
    if shape.camera_dim:
        embed += 2.0 * shape.camera_dim * d + 2.0 * d * d  # camera MLP
    adaln_shared = 12.0 * d * d if shape.adaln_type == "single" else 0.0
    final = 2.0 * big_l * d * shape.patch_size**2 * shape.out_channels

    return FlopCount(
        tokens=tokens,
        linear=n_layers * linear,
        self_attention=n_layers * core,
        cross_attention_proj=n_layers * cross_proj,
        cross_attention_core=n_layers * cross_core,
        adaln_blocks=n_layers * adaln_block,
        adaln_shared=adaln_shared,
        embed=embed,
        final=final,
        recompute=recompute,
        recompute_share=recompute_share,
    )


def recomputed_share(cfg, pp: int = 1, vpp: int | None = None) -> float:
    """Share of the blocks full recompute re-runs in backward: all of them with megatron's
    ``uniform`` method, the first ``recompute_num_layers`` of each pipeline (virtual) stage
    chunk with ``block``."""
    if getattr(cfg, "recompute", "none") != "full" or cfg.recompute_method != "block":
        return 1.0
    chunk = max(1, cfg.depth_ // (pp * (vpp or 1)))
    return min(cfg.recompute_num_layers, chunk) / chunk


def count_model_flops(
    cfg, *, recompute: str | None = None, recompute_share: float = 1.0
) -> FlopCount:
    """FLOPs of one training sample of the model a ``ModelConfig`` describes.

    The one place that maps a model config to :func:`count_flops` (token count, frames, video
    attention mode, recompute), shared by the trainer's MFU and the throughput benchmark.
    ``recompute`` defaults to ``cfg.recompute``. One condition token counts the executed
    single-token cross-attention (see :func:`count_flops`).
    """
    return count_flops(
        DiTShape.from_model_config(cfg),
        cfg.num_tokens,
        frames=getattr(cfg, "num_frames", 1),
        attention="spatial_temporal" if getattr(cfg, "temporal_attention", False) else "full",
        recompute=recompute if recompute is not None else cfg.recompute,
        single_token_cross=True,
        recompute_share=recompute_share,
    )

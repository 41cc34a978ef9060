"""Model section of a job config: which Lumos DiT, at which size, with which block style."""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("i2i", "t2i", "i2v", "nvs")
ADALN_TYPES = ("zero", "single")
SPECS = ("auto", "local", "te")
RECOMPUTE = ("none", "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
PRECISIONS = ("auto", "fp32", "bf16")
VIDEO_ATTENTION = ("spatial_temporal", "full_3d")
POS_EMBEDS = ("sincos", "rope")
NORMS = ("layernorm", "rmsnorm")
CP_LAYOUTS = ("auto", "contiguous", "zigzag")
# megatron's fp8_recipe names (TransformerEngine recipes) and fp8 formats; see ops/te_fp8.py
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_FORMATS = ("hybrid", "e4m3")


def fp8_row_multiple(recipe: str) -> int:
    """Rows an FP8 GEMM input must be a multiple of: 32 for MXFP8 (one scale per 32-element
    block), 16 for the other recipes (TE asserts otherwise; megatron's ``get_fp8_align_size``)."""
    return 32 if recipe == "mxfp8" else 16


@dataclass
class ModelConfig:
    """Architecture of one Lumos DiT.

    ``name`` picks a size from the registry (``Lumos-XL/2`` = 28 x 1152 x 16 heads, patch 2);
    ``depth``/``hidden_size``/``num_heads`` override it for experiments. ``variant`` fixes what the
    condition tokens are: ``i2i`` = DINO (CLS: 1 x 768, or patch tokens: 256 x 768), ``t2i`` =
    T5 (120 x 4096) with optional PixArt-alpha size/aspect conditioning, ``i2v`` = DINO feature
    of the first frame for ``num_frames`` latent frames, ``nvs`` = DINO feature of the input view
    plus the relative camera ``(R, T)``, with the input view's latent concatenated channel-wise.

    Video (``i2v``): ``video_attention`` is ``spatial_temporal`` (per-frame self-attention plus a
    zero-initialised temporal self-attention per block, the Lumos/SVD recipe that starts as the
    I2I model per frame) or ``full_3d`` (one self-attention over all frames' tokens).
    ``first_frame_condition`` keeps frame 0 clean at timestep 0 and out of the loss.

    Flag-DiT options (any variant): ``norm`` (``layernorm`` | ``rmsnorm``), ``qk_norm`` (per-head
    norm of queries and keys), ``pos_embed`` (``sincos`` tables | 3-D ``rope`` with
    ``rope_theta`` and NTK scaling ``rope_ntk_factor``), ``cross_attn_gate`` (zero-initialised
    tanh gate per head on the cross-attention).
    """

    name: str = "Lumos-Tiny/2"
    variant: str = "i2i"
    in_channels: int = 4
    latent_size: int = 32  # latent pixels (256 px image -> 32 with the SD-VAE)
    learn_sigma: bool = True
    cond_channels: int = 768
    cond_tokens: int = 1
    adaln_type: str = "zero"  # zero = Lumos per-block adaLN-Zero; single = PixArt adaLN-single
    use_size_conditioning: bool = False
    pos_interpolation_scale: float = 1.0
    norm_eps: float = 1e-6
    spec: str = "auto"  # auto = TransformerEngine when importable, else megatron local + SDPA
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    # FP8 GEMMs of the transformer layers (TransformerEngine spec, CUDA): a megatron fp8_recipe
    # name, or None = bf16. The adaLN, embedders and final layer always stay bf16.
    fp8: str | None = None
    fp8_format: str = "hybrid"  # hybrid = e4m3 forward, e5m2 gradients
    # layers at each end of the stack kept bf16; None = 1 (0 with delayed, which megatron
    # runs as one autocast region and so cannot exempt layers)
    fp8_bf16_layers: int | None = None
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    # Video (i2v).
    num_frames: int = 1  # latent frames per sample
    video_attention: str = "spatial_temporal"
    first_frame_condition: bool = True
    # Novel-view synthesis (nvs): flattened relative camera (R: 9, T: 3).
    camera_dim: int = 12
    # Flag-DiT options.
    norm: str = "layernorm"
    qk_norm: bool = False
    pos_embed: str = "sincos"
    rope_theta: float = 10000.0
    rope_ntk_factor: float = 1.0
    cross_attn_gate: bool = False
    # How a sequence is split over context-parallel ranks: contiguous equal chunks (local
    # spec) or two zig-zag chunks per sample (TransformerEngine's THD convention); auto picks.
    cp_layout: str = "auto"

    def __post_init__(self) -> None:
        from lumos_mcore.models.common.registry import get_model_size

        get_model_size(self.name)  # raises with the list of known names
        _choice("model.variant", self.variant, VARIANTS)
        _choice("model.adaln_type", self.adaln_type, ADALN_TYPES)
        _choice("model.spec", self.spec, SPECS)
        _choice("model.recompute", self.recompute, RECOMPUTE)
        _choice("model.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        _choice("model.precision", self.precision, PRECISIONS)
        _choice("model.video_attention", self.video_attention, VIDEO_ATTENTION)
        _choice("model.pos_embed", self.pos_embed, POS_EMBEDS)
        _choice("model.norm", self.norm, NORMS)
        _choice("model.cp_layout", self.cp_layout, CP_LAYOUTS)
        for flag in (
            "in_channels",
            "latent_size",
            "cond_channels",
            "cond_tokens",
            "num_frames",
            "camera_dim",
        ):
            if getattr(self, flag) <= 0:
                raise ValueError(f"model.{flag}={getattr(self, flag)}: must be positive")
        if self.variant != "i2v" and self.num_frames != 1:
            raise ValueError(
                f"model.num_frames={self.num_frames}: only variant 'i2v' has frames "
                f"(variant={self.variant!r}); set num_frames=1 or variant='i2v'"
            )
        if self.variant == "i2v" and self.first_frame_condition and self.num_frames < 2:
            raise ValueError(
                f"model.first_frame_condition=True: needs num_frames >= 2 (got "
                f"{self.num_frames}); the first frame is the condition, the rest are generated"
            )
        if self.rope_theta <= 0 or self.rope_ntk_factor < 1.0:
            raise ValueError(
                f"model.rope_theta={self.rope_theta} / model.rope_ntk_factor="
                f"{self.rope_ntk_factor}: theta must be positive and the NTK factor >= 1"
            )
        head_dim = self.hidden_size_ // max(self.num_heads_, 1)
        if self.pos_embed == "rope" and (head_dim % 2 or head_dim < 6):
            raise ValueError(
                f"model.pos_embed='rope': head dim {head_dim} must be even and >= 6 to split "
                "over the (t, h, w) axes"
            )
        if self.pos_embed == "sincos" and self.is_video and self.hidden_size_ % 16:
            raise ValueError(
                f"model.hidden_size={self.hidden_size_}: a 3-D sin-cos table needs a multiple "
                "of 16; choose another width or model.pos_embed='rope'"
            )
        if self.recompute_num_layers <= 0:
            raise ValueError(
                f"model.recompute_num_layers={self.recompute_num_layers}: must be positive"
            )
        if self.fp8 is not None:
            self._check_fp8()
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"model.latent_size={self.latent_size}: not divisible by the patch size "
                f"{self.patch_size} of {self.name}"
            )
        if self.hidden_size_ % self.num_heads_:
            raise ValueError(
                f"model.hidden_size={self.hidden_size_}: not divisible by "
                f"num_heads={self.num_heads_}"
            )
        if self.use_size_conditioning and self.hidden_size_ % 3:
            raise ValueError(
                f"model.use_size_conditioning: hidden_size={self.hidden_size_} must be divisible "
                "by 3 (size and aspect embeddings take a third of it each)"
            )

    # Resolved architecture (registry + overrides).

    def _check_fp8(self) -> None:
        _choice("model.fp8", self.fp8, FP8_RECIPES)
        _choice("model.fp8_format", self.fp8_format, FP8_FORMATS)
        if self.spec == "local":
            raise ValueError(
                f"model.fp8={self.fp8!r}: FP8 runs in TransformerEngine's linears; set "
                "model.spec=te (or auto) or drop model.fp8"
            )
        if self.precision == "fp32":
            raise ValueError(
                f"model.fp8={self.fp8!r}: FP8 training keeps bf16 weights and activations; set "
                "model.precision=bf16 (or auto on CUDA)"
            )
        bf16_layers = self.fp8_bf16_layers
        if bf16_layers is not None and bf16_layers < 0:
            raise ValueError(f"model.fp8_bf16_layers={bf16_layers}: must be >= 0")
        if self.fp8 == "delayed" and bf16_layers:
            raise ValueError(
                f"model.fp8_bf16_layers={bf16_layers}: the delayed recipe cannot keep layers in "
                "bf16 (megatron runs it as one autocast region); set 0 or fp8=tensorwise"
            )
        if bf16_layers is not None and 2 * bf16_layers >= self.depth_:
            raise ValueError(
                f"model.fp8_bf16_layers={bf16_layers}: with {self.depth_} layers none would "
                "run in FP8; lower it or drop model.fp8"
            )

    @property
    def fp8_bf16_layers_(self) -> int:
        """Layers at each end kept bf16 under FP8 (the default resolved)."""
        if self.fp8_bf16_layers is not None:
            return self.fp8_bf16_layers
        return 0 if self.fp8 == "delayed" or self.depth_ <= 2 else 1

    @property
    def patch_size(self) -> int:
        from lumos_mcore.models.common.registry import get_model_size

        return get_model_size(self.name).patch_size

    @property
    def depth_(self) -> int:
        from lumos_mcore.models.common.registry import get_model_size

        return self.depth or get_model_size(self.name).depth

    @property
    def hidden_size_(self) -> int:
        from lumos_mcore.models.common.registry import get_model_size

        return self.hidden_size or get_model_size(self.name).hidden_size

    @property
    def num_heads_(self) -> int:
        from lumos_mcore.models.common.registry import get_model_size

        return self.num_heads or get_model_size(self.name).num_heads

    @property
    def mlp_ratio(self) -> float:
        from lumos_mcore.models.common.registry import get_model_size

        return get_model_size(self.name).mlp_ratio

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def model_in_channels(self) -> int:
        """Channels the patch embedder sees (NVS concatenates the input view's latent)."""
        return self.in_channels * 2 if self.variant == "nvs" else self.in_channels

    @property
    def is_video(self) -> bool:
        return self.variant == "i2v"

    @property
    def temporal_attention(self) -> bool:
        """Blocks carry a separate temporal self-attention (spatial + temporal video mode)."""
        return self.is_video and self.video_attention == "spatial_temporal"

    @property
    def num_tokens(self) -> int:
        """Tokens per sample at the configured latent size (all frames for video)."""
        return self.num_frames * (self.latent_size // self.patch_size) ** 2


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{flag}={value!r}: choose one of {', '.join(allowed)}")

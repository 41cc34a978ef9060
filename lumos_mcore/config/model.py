"""Model section of a job config: which Lumos DiT, at which size, with which block style."""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("i2i", "t2i")
ADALN_TYPES = ("zero", "single")
SPECS = ("auto", "local", "te")
RECOMPUTE = ("none", "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class ModelConfig:
    """Architecture of one Lumos DiT.

    ``name`` picks a size from the registry (``Lumos-XL/2`` = 28 x 1152 x 16 heads, patch 2);
    ``depth``/``hidden_size``/``num_heads`` override it for experiments. ``variant`` fixes what the
    condition tokens are: ``i2i`` = DINO (CLS: 1 x 768, or patch tokens: 256 x 768), ``t2i`` =
    T5 (120 x 4096) with optional PixArt-alpha size/aspect conditioning.
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
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None

    def __post_init__(self) -> None:
        from lumos_mcore.models.common.registry import get_model_size

        get_model_size(self.name)  # raises with the list of known names
        _choice("model.variant", self.variant, VARIANTS)
        _choice("model.adaln_type", self.adaln_type, ADALN_TYPES)
        _choice("model.spec", self.spec, SPECS)
        _choice("model.recompute", self.recompute, RECOMPUTE)
        _choice("model.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        _choice("model.precision", self.precision, PRECISIONS)
        for flag in ("in_channels", "latent_size", "cond_channels", "cond_tokens"):
            if getattr(self, flag) <= 0:
                raise ValueError(f"model.{flag}={getattr(self, flag)}: must be positive")
        if self.recompute_num_layers <= 0:
            raise ValueError(
                f"model.recompute_num_layers={self.recompute_num_layers}: must be positive"
            )
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
    def num_tokens(self) -> int:
        """Tokens per sample at the configured latent size."""
        return (self.latent_size // self.patch_size) ** 2


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{flag}={value!r}: choose one of {', '.join(allowed)}")

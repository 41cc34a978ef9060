"""Size-named model registry (DiT style: ``Lumos-XL/2`` = XL backbone with patch size 2).

Configs select a backbone by name (``model.name``); everything else about the architecture
(conditioning, adaLN flavour, learned sigma) is set separately, so one name covers the I2I, T2I,
NVS and I2V members.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODEL_SIZES", "DiTSize", "get_model_size"]


@dataclass(frozen=True)
class DiTSize:
    """Backbone shape: transformer depth, width, attention heads, patch size and MLP ratio."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "patch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DiTSize.{name}={getattr(self, name)} must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTSize.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; choose a divisor"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTSize.mlp_ratio={self.mlp_ratio} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_BACKBONES: dict[str, tuple[int, int, int]] = {
    # name: (depth, hidden_size, num_heads) — DiT's S/B/L/XL table
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

MODEL_SIZES: dict[str, DiTSize] = {
    f"Lumos-{size}/{patch}": DiTSize(depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in _BACKBONES.items()
    for patch in (2, 4, 8)
}
# Tiny shapes for tests and CPU smoke runs.
MODEL_SIZES["Lumos-Tiny/2"] = DiTSize(4, 64, 4, 2)
MODEL_SIZES["Lumos-Micro/2"] = DiTSize(2, 32, 2, 2)


def get_model_size(name: str) -> DiTSize:
    """Look up a backbone by name, e.g. ``"Lumos-XL/2"``; unknown names raise ``ValueError``."""
    try:
        return MODEL_SIZES[name]
    except KeyError:
        choices = ", ".join(MODEL_SIZES)
        raise ValueError(f"model.name={name!r}: unknown size; choose one of {choices}") from None

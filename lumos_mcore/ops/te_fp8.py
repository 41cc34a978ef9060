"""FP8 training of the DiT on TransformerEngine: megatron settings and bf16 islands.

megatron-core runs the TE linears of each transformer layer under ``fp8_autocast`` when
``TransformerConfig.fp8`` is set; what stays in bf16 for a DiT:

- adaLN modulation, timestep / condition / patch embedders and the final layer are plain
  ``nn.Linear`` / ``nn.Conv2d`` modules, which TE's autocast never touches;
- the first and last transformer layers via megatron's ``first_last_layers_bf16`` (not with the
  ``delayed`` recipe, which megatron refuses: its amax reduction assumes one autocast region);
- GEMMs too small for FP8 tensor cores: FP8 needs ``rows % 16 == 0`` (``% 8`` forward only) and
  ``cols % 16 == 0``, and the cross-attention K/V projection of one DINO CLS token has
  ``rows = batch`` -- :func:`without_fp8` wraps such a TE module class so its forward runs in a
  nested ``fp8_autocast(enabled=False)`` (TE's own recommendation; the nested region does not
  trigger the amax reduction, which happens when the outermost region exits).

``mxfp8`` needs Blackwell (compute capability 10.x); ``tensorwise`` (current scaling) needs
TE >= 2.2; both are checked by megatron / TE when the model first runs.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["RECIPES", "fp8_config_overrides", "without_fp8"]

RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FORMATS = ("hybrid", "e4m3")


def fp8_config_overrides(
    recipe: str = "tensorwise",
    *,
    fp8_format: str = "hybrid",
    bf16_layers_at_ends: int = 1,
    amax_history_len: int = 1024,
) -> dict:
    """``TransformerConfig`` keyword arguments for FP8 training of a DiT.

    ``hybrid`` = e4m3 forward, e5m2 gradients. ``bf16_layers_at_ends`` layers at each end of the
    stack stay bf16 (ignored for ``delayed``, see module docs); the delayed recipe keeps an amax
    history of ``amax_history_len`` steps and scales by its maximum.
    """
    if recipe not in RECIPES:
        raise ValueError(f"fp8_recipe={recipe!r}: choose one of {', '.join(RECIPES)}")
    if fp8_format not in FORMATS:
        raise ValueError(f"fp8_format={fp8_format!r}: choose one of {', '.join(FORMATS)}")
    if bf16_layers_at_ends < 0:
        raise ValueError(f"bf16_layers_at_ends={bf16_layers_at_ends}: must be >= 0")
    if recipe == "mxfp8" and torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        if major < 10:
            raise ValueError(
                f"fp8_recipe='mxfp8': needs a Blackwell GPU (compute capability 10.x), this one "
                f"is {major}.x; use tensorwise or delayed"
            )
    kw: dict = {"fp8": fp8_format, "fp8_recipe": recipe}
    if recipe == "delayed":
        kw.update(fp8_amax_history_len=amax_history_len, fp8_amax_compute_algo="max")
    elif bf16_layers_at_ends:
        kw.update(
            first_last_layers_bf16=True,
            num_layers_at_start_in_bf16=bf16_layers_at_ends,
            num_layers_at_end_in_bf16=bf16_layers_at_ends,
        )
    return kw


def _fp8_disabled() -> contextlib.AbstractContextManager:
    import transformer_engine.pytorch as te

    if hasattr(te, "fp8_autocast"):
        return te.fp8_autocast(enabled=False)
    return te.autocast(enabled=False)  # TE releases that dropped the fp8_autocast name


def without_fp8(module_cls: type) -> type:
    """Subclass of a TE module class whose forward always runs in bf16 (no FP8 GEMM)."""

    class _WithoutFP8(module_cls):
        def forward(self, *args, **kwargs):
            with _fp8_disabled():
                return super().forward(*args, **kwargs)

    _WithoutFP8.__name__ = f"{module_cls.__name__}WithoutFP8"
    _WithoutFP8.__qualname__ = _WithoutFP8.__name__
    return _WithoutFP8

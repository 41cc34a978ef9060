"""FP8 training of the DiT on TransformerEngine: megatron settings and bf16 islands.

megatron-core runs the TE linears of each transformer layer under ``fp8_autocast`` when
``TransformerConfig.fp8`` is set; what stays in bf16 for a DiT:

- adaLN modulation, timestep / condition / patch embedders and the final layer are plain
  ``nn.Linear`` / ``nn.Conv2d`` modules, which TE's autocast never touches;
- the first and last transformer layers via megatron's ``first_last_layers_bf16`` (not with the
  ``delayed`` recipe, which megatron refuses: its amax reduction assumes one autocast region);
- GEMMs too small for FP8 tensor cores: FP8 needs ``rows % 16 == 0`` (``% 8`` forward only) and
  ``cols % 16 == 0`` (MXFP8: multiples of 32), and the cross-attention K/V projection of one DINO
  CLS token has ``rows = batch`` -- :func:`without_fp8` wraps such a TE module class so its
  forward runs in a nested ``autocast(enabled=False)`` (``fp8_autocast`` before TE deprecated
  that name; the nested region does not trigger the amax reduction, which happens when the
  outermost enabled region exits).

``mxfp8`` needs Blackwell datacenter GPUs (compute capability 10.x; TE refuses 12.x) and
``blockwise`` Hopper or newer with CUDA >= 12.9 (TE >= 2.3; older TE: Hopper only); both are
checked here when CUDA is present. ``tensorwise`` (current scaling) needs TE >= 2.2. megatron /
TE check all of them again when the model first runs.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["RECIPES", "fp8_config_overrides", "refresh_fp8_weight_cache", "without_fp8"]

RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FORMATS = ("hybrid", "e4m3")


def refresh_fp8_weight_cache(modules: list[torch.nn.Module]) -> None:
    """Make the next forward of these models re-cast their weights to FP8.

    megatron's TE linears pass ``is_first_microbatch`` to TE and clear it after each forward;
    TE then reuses the FP8 copies of the weights it cached on the first micro-batch. megatron's
    schedules set the flag again on each step's first micro-batch, but a forward outside them
    (the validation grid's sampler, EMA weights swapped in or out) would otherwise run on the
    FP8 weights of an earlier step. A no-op for models without FP8.
    """
    for module in modules:
        refresh = getattr(module, "set_is_first_microbatch", None)
        if refresh is not None:
            refresh()


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
    if recipe in ("mxfp8", "blockwise") and torch.cuda.is_available():
        ok, reason = _recipe_support(recipe)
        if not ok:
            raise ValueError(f"fp8_recipe={recipe!r}: {reason}; use tensorwise or delayed")
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


def _recipe_support(recipe: str) -> tuple[bool, str]:
    """Whether this GPU runs ``recipe`` ("mxfp8" | "blockwise"): TE's own check when TE imports,
    else the compute capability TE requires."""
    name = {"mxfp8": "is_mxfp8_available", "blockwise": "is_fp8_block_scaling_available"}[recipe]
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

        check = getattr(FP8GlobalStateManager, name, None)
    except Exception:  # TE missing or unusable here
        check = None
    if check is not None:
        ok, reason = check()
        return bool(ok), reason or "not supported on this GPU"
    major, minor = torch.cuda.get_device_capability()
    if recipe == "mxfp8":
        ok = 10 <= major < 12
        return ok, f"needs compute capability 10.x or 11.x (Blackwell), this GPU is {major}.{minor}"
    cuda = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    ok = major >= 9 and cuda >= (12, 9)
    return ok, f"needs compute capability >= 9.0 and CUDA >= 12.9, this is {major}.{minor}"


def _fp8_disabled() -> contextlib.AbstractContextManager:
    import transformer_engine.pytorch as te

    # Newer TE releases add ``autocast(enabled=..., recipe=...)`` and deprecate ``fp8_autocast``
    # (a DeprecationWarning on every call); older releases only have ``fp8_autocast``.
    if hasattr(te, "autocast"):
        return te.autocast(enabled=False)
    return te.fp8_autocast(enabled=False)


def without_fp8(module_cls: type) -> type:
    """Subclass of a TE module class whose forward always runs in bf16 (no FP8 GEMM)."""

    class _WithoutFP8(module_cls):
        def forward(self, *args, **kwargs):
            with _fp8_disabled():
                return super().forward(*args, **kwargs)

    _WithoutFP8.__name__ = f"{module_cls.__name__}WithoutFP8"
    _WithoutFP8.__qualname__ = _WithoutFP8.__name__
    return _WithoutFP8

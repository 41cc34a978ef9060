"""Fused ops and attention backends for the DiT block, chosen per machine.

``norm_modulate``, ``gated_residual`` and ``apply_rope3d`` run the Triton kernels of the
``lumos_kernels`` package (``kernels/``) on CUDA when triton imports and the kernel was measured faster
(see :mod:`lumos_mcore.ops.dispatch`), else their PyTorch references. ``attention`` /
``varlen_attention`` / ``FlashAttnCoreAttention`` run flash-attn where it is installed and
applies, SDPA otherwise (:mod:`lumos_mcore.ops.flash_attention`).
"""

from lumos_mcore.ops.dispatch import (
    MARGIN,
    OPS,
    KernelChoice,
    apply_rope3d,
    autoselect,
    gated_residual,
    kernel_choices,
    kernel_mode,
    norm_modulate,
    reset_kernel_choices,
)

__all__ = [
    "MARGIN",
    "OPS",
    "FlashAttnCoreAttention",
    "KernelChoice",
    "apply_rope3d",
    "attention",
    "autoselect",
    "flash_attn_backend",
    "gated_residual",
    "kernel_choices",
    "kernel_mode",
    "norm_modulate",
    "reset_kernel_choices",
    "varlen_attention",
]


def __getattr__(name: str):
    # The attention module imports megatron; keep `import lumos_mcore.ops` light for the kernels.
    if name in ("FlashAttnCoreAttention", "attention", "flash_attn_backend", "varlen_attention"):
        from lumos_mcore.ops import flash_attention

        return getattr(flash_attention, name)
    raise AttributeError(f"module 'lumos_mcore.ops' has no attribute {name!r}")

"""Triton kernels for the DiT block, each with its PyTorch reference (standalone package).

- :mod:`lumos_kernels.adaln` -- non-affine LayerNorm / RMSNorm + adaLN ``(1 + scale), shift``
- :mod:`lumos_kernels.residual` -- ``x + gate * (y + bias)``
- :mod:`lumos_kernels.rope3d` -- 3-D rotary embedding of frame-major video tokens

Every op exists three ways: ``*_reference`` (eager PyTorch, the math the model uses without
kernels), ``*_triton`` (forward and backward Triton kernels in a ``torch.autograd.Function``) and
the plain name, which picks Triton whenever it can run on the given tensors. Whether Triton is
*faster* is measured by ``lumos_mcore.ops``; this package never imports ``lumos_mcore``.
triton is imported lazily (first launch): when it is imported with ``TRITON_INTERPRET=1`` set,
the Triton path runs on CPU tensors in its interpreter (how the CPU test suite checks it).
"""

from lumos_kernels._triton import can_launch, has_triton, interpret_mode
from lumos_kernels.adaln import norm_modulate, norm_modulate_reference, norm_modulate_triton
from lumos_kernels.residual import gated_residual, gated_residual_reference, gated_residual_triton
from lumos_kernels.rope3d import (
    apply_rope3d,
    apply_rope3d_reference,
    apply_rope3d_triton,
    default_rope3d_split,
    freqs_from_megatron,
    megatron_rotary_pos_emb,
    rope3d_freqs,
    rope3d_positions,
)

__all__ = [
    "apply_rope3d",
    "apply_rope3d_reference",
    "apply_rope3d_triton",
    "can_launch",
    "default_rope3d_split",
    "freqs_from_megatron",
    "gated_residual",
    "gated_residual_reference",
    "gated_residual_triton",
    "has_triton",
    "interpret_mode",
    "megatron_rotary_pos_emb",
    "norm_modulate",
    "norm_modulate_reference",
    "norm_modulate_triton",
    "rope3d_freqs",
    "rope3d_positions",
]

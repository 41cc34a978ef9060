"""Shared helpers for the frozen encoders: device/dtype resolution and freezing."""

from __future__ import annotations

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> the current CUDA device when there is one, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("media.encoders.device='cuda' but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"media.encoders.dtype={dtype!r}: choose one of {tuple(_DTYPES)}")
    return _DTYPES[dtype]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout, fixed norms) and no gradients: an encoder is a fixed function."""
    module.eval()
    module.requires_grad_(False)
    return module

"""Lumos diffusion transformers on megatron-core.

``import lumos_mcore`` stays cheap: ``load_model`` (single-process loading of any checkpoint
format, :mod:`lumos_mcore.inference`) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lumos_mcore.inference import load_model

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from lumos_mcore.inference import load_model

        return load_model
    raise AttributeError(f"module 'lumos_mcore' has no attribute {name!r}")

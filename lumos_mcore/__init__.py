"""Lumos diffusion transformers on megatron-core.

``import lumos_mcore`` stays cheap: ``load_model`` (single-process loading of any checkpoint
format, :mod:`lumos_mcore.inference`) is imported on first use.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any


def _find_kernels_in_checkout() -> None:
    """Make ``lumos_kernels`` importable from a source checkout that was not ``pip install``-ed.

    The Triton kernels live in ``<repo>/kernels/lumos_kernels`` (an install maps them there).
    ``<repo>/kernels`` itself is not a package on purpose: a top-level ``kernels`` package would
    shadow PyPI's ``kernels`` that transformers imports. The folder is appended (never prepended),
    so an installed ``lumos_kernels`` always wins."""
    if importlib.util.find_spec("lumos_kernels") is not None:
        return
    folder = Path(__file__).resolve().parents[1] / "kernels"
    if (folder / "lumos_kernels" / "__init__.py").is_file():
        sys.path.append(str(folder))


_find_kernels_in_checkout()

if TYPE_CHECKING:
    from lumos_mcore.inference import load_model

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from lumos_mcore.inference import load_model

        return load_model
    raise AttributeError(f"module 'lumos_mcore' has no attribute {name!r}")

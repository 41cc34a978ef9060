"""Suite-wide set-up that must happen before any test module imports a library.

Triton fixes interpreter vs compiled mode when it is first imported, and torch / diffusers may
import it early (from any test folder). Without CUDA the kernel tests need the interpreter, so
``TRITON_INTERPRET=1`` is set here, at the root, before collection imports anything.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a checkout that was not pip-installed (the GPU proof machine) this makes ``lumos_kernels``
# importable from kernels/ before any test imports it; lumos_mcore imports nothing heavy.
import lumos_mcore  # noqa: E402, F401

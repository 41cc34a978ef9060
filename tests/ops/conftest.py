"""The ops tests run the Triton path in triton's CPU interpreter when there is no GPU; triton
fixes its mode when first imported, so the variable is set here, at collection."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

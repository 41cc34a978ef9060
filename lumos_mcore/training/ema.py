"""Exponential moving average of the model weights, sharded like the model.

Each rank keeps fp32 shadows of *its own* parameter shards (TP/PP slices; replicated over DP), so
EMA costs one fp32 copy of the local model and is saved/resharded by ``dist_checkpointing``
through the same sharded keys as the weights (under the ``ema.`` prefix).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from lumos_mcore.ops.te_fp8 import refresh_fp8_weight_cache
from lumos_mcore.training.setup import unwrap


class EMA:
    """``ema <- decay * ema + (1 - decay) * param`` after every optimizer step."""

    def __init__(self, model_chunks: list[nn.Module], decay: float) -> None:
        self.decay = decay
        self.shadow: list[dict[str, torch.Tensor]] = [
            {n: p.detach().float().clone() for n, p in unwrap(c).named_parameters()}
            for c in model_chunks
        ]

    @torch.no_grad()
    def reset(self, model_chunks: list[nn.Module]) -> None:
        """Restart the average from the current weights (e.g. after loading new weights)."""
        for shadow, chunk in zip(self.shadow, model_chunks):
            for name, param in unwrap(chunk).named_parameters():
                shadow[name].copy_(param.detach().float())

    @torch.no_grad()
    def update(self, model_chunks: list[nn.Module]) -> None:
        for shadow, chunk in zip(self.shadow, model_chunks):
            for name, param in unwrap(chunk).named_parameters():
                shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def sharded_state_dict(self, model_chunks: list[nn.Module]) -> dict:
        """The model's sharded state dict with the EMA tensors in place of the weights."""
        out = {}
        for i, (shadow, chunk) in enumerate(zip(self.shadow, model_chunks)):
            sharded = unwrap(chunk).sharded_state_dict(prefix="")
            chunk_sd = {}
            for name, sh in sharded.items():
                if name in shadow:  # weights only (no buffers / extra state)
                    chunk_sd[name] = dataclasses.replace(
                        sh, key=f"ema.{sh.key}", data=shadow[name], dtype=shadow[name].dtype
                    )
            out[f"chunk{i}"] = chunk_sd
        return out

    def load_state_dict(self, state: dict) -> None:
        for i, shadow in enumerate(self.shadow):
            for name, tensor in state[f"chunk{i}"].items():
                shadow[name].copy_(tensor)

    @contextlib.contextmanager
    def swapped_in(self, model_chunks: list[nn.Module]) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (evaluation, sampling, export)."""
        backup = [
            {n: p.detach().clone() for n, p in unwrap(c).named_parameters()} for c in model_chunks
        ]
        with torch.no_grad():
            for shadow, chunk in zip(self.shadow, model_chunks):
                for name, p in unwrap(chunk).named_parameters():
                    p.copy_(shadow[name])
        refresh_fp8_weight_cache([unwrap(c) for c in model_chunks])  # FP8: cast the EMA weights
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, chunk in zip(backup, model_chunks):
                    for name, p in unwrap(chunk).named_parameters():
                        p.copy_(saved[name])
            refresh_fp8_weight_cache([unwrap(c) for c in model_chunks])

"""flash-attn attention for the megatron "local" DiT spec (GPU without TransformerEngine).

Three entry points, all bidirectional and dropout-free (as the DiT is):

- :func:`attention` -- a drop-in for SDPA on SDPA's layout (``q [B', np, Lq, hn]``,
  ``k/v [B', ng, Lk, hn]``, boolean ``mask`` with True = attend). Runs flash-attn when the mask
  is absent or a key-padding mask ``[B'|1, 1, 1, Lk]`` (padded condition tokens: the valid keys
  are gathered into a varlen batch, no score matrix is masked), SDPA otherwise.
- :func:`varlen_attention` -- packed sequences in THD layout with ``cu_seqlens`` (several
  samples of different lengths in one sequence, no block-diagonal mask materialised).
- :class:`FlashAttnCoreAttention` -- a megatron core attention (``[sq, b, np, hn]`` in,
  ``[sq, b, np * hn]`` out) on these, for THD ``PackedSeqParams`` and unpacked batches, with
  all-gather context parallelism for self-attention like the SDPA core attention.

Grouped-query attention needs no K/V repetition. Backends: FlashAttention-3
(``flash_attn_3.flash_attn_interface`` or ``flash_attn_interface``) on Hopper when importable,
else FlashAttention-2 (``flash_attn``);
``LUMOS_FLASH_ATTN=fa2|fa3`` forces one. Head dim 72 (Lumos-XL) runs on both (FA2 and FA3 round
it up to their 96 kernels). Inputs a backend cannot take (float32, CPU) go through SDPA. The
backend is logged once.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "ENV",
    "FlashAttnCoreAttention",
    "FlashBackend",
    "attention",
    "flash_attn_backend",
    "varlen_attention",
]

ENV = "LUMOS_FLASH_ATTN"


@dataclass(frozen=True)
class FlashBackend:
    """A flash-attn implementation: dense ``func(q, k, v, softmax_scale=, causal=)`` on
    ``[b, s, h, d]`` and ``varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=, causal=)``
    on ``[total, h, d]``; either may return ``(out, lse, ...)`` (older FA3) or ``out``."""

    name: str
    func: Callable
    varlen: Callable
    device_type: str = "cuda"
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)

    def accepts(self, *tensors: Tensor) -> bool:
        """Whether these tensors can go to this backend (else SDPA is used)."""
        return all(t.device.type == self.device_type and t.dtype in self.dtypes for t in tensors)


def _import_fa3():
    # TransformerEngine imports FA3 as ``flash_attn_3.flash_attn_interface``; some installs carry
    # that and a separate top-level copy, and importing both registers FA3's torch custom ops
    # twice, which breaks the copy imported first. Prefer TE's path, fall back to the top level.
    try:
        return importlib.import_module("flash_attn_3.flash_attn_interface")
    except ImportError:
        return importlib.import_module("flash_attn_interface")


def _load(name: str) -> FlashBackend | None:
    try:
        if name == "fa3":
            mod = _import_fa3()
            return FlashBackend("flash-attn 3", mod.flash_attn_func, mod.flash_attn_varlen_func)
        mod = importlib.import_module("flash_attn")
        version = getattr(mod, "__version__", "2")
        return FlashBackend(
            f"flash-attn {version}", mod.flash_attn_func, mod.flash_attn_varlen_func
        )
    except Exception as exc:  # ImportError, or a build for another CUDA / torch
        log.debug("flash-attn backend %s unavailable: %s", name, exc)
        return None


@lru_cache(maxsize=1)
def flash_attn_backend() -> FlashBackend | None:
    """The flash-attn backend to use here (None when no package imports); logged once."""
    pref = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if pref not in ("auto", "fa2", "fa3"):
        raise ValueError(f"{ENV}={pref!r}: choose one of auto, fa2, fa3")
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    order = {"auto": ["fa3", "fa2"] if hopper else ["fa2"], "fa2": ["fa2"], "fa3": ["fa3"]}[pref]
    for name in order:
        backend = _load(name)
        if backend is not None:
            log.info("attention backend: %s", backend.name)
            return backend
    log.info("attention backend: SDPA (flash-attn not importable, %s=%s)", ENV, pref)
    return None


def _first(out: Tensor | tuple) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA with grouped-query K/V repeated: ``[B', np, Lq, hn]`` out."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B', np, Lk, hn]
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _key_padding(mask: Tensor, batch: int, lk: int) -> Tensor | None:
    """``[B', Lk]`` keep-mask when ``mask`` is a boolean key-padding mask, else None."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1):
        return None
    if mask.shape[-1] != lk or mask.shape[0] not in (1, batch):
        return None
    return mask.reshape(mask.shape[0], lk).expand(batch, lk)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    backend: FlashBackend | None = None,
) -> Tensor:
    """Bidirectional attention on SDPA's layout: ``q [B', np, Lq, hn]``, ``k/v [B', ng, Lk, hn]``,
    ``mask`` boolean (True = attend) -> ``[B', np, Lq, hn]``; flash-attn where it applies."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = backend if backend is not None else flash_attn_backend()
    bq, np_, lq, hn = q.shape
    keep = None if mask is None else _key_padding(mask, bq, k.shape[2])
    if backend is None or not backend.accepts(q, k, v) or (mask is not None and keep is None):
        return _sdpa(q, k, v, mask, scale)
    qf, kf, vf = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B', L, h, hn]
    if keep is None:
        out = _first(backend.func(qf, kf, vf, softmax_scale=scale, causal=False))
        return out.transpose(1, 2)  # [B', np, Lq, hn]
    lens = keep.sum(-1, dtype=torch.int32)  # [B'] valid keys per row
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # [B'+1]
    cu_q = torch.arange(0, (bq + 1) * lq, lq, dtype=torch.int32, device=q.device)  # [B'+1]
    out = _first(
        backend.varlen(
            qf.reshape(bq * lq, np_, hn),
            kf[keep],  # [total_k, ng, hn]
            vf[keep],
            cu_q,
            cu_k,
            lq,
            int(lens.max()),
            softmax_scale=scale,
            causal=False,
        )
    )  # [B'*Lq, np, hn]
    return out.view(bq, lq, np_, hn).transpose(1, 2)  # [B', np, Lq, hn]


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    scale: float | None = None,
    backend: FlashBackend | None = None,
) -> Tensor:
    """Packed attention in THD layout: ``q [tq, np, hn]``, ``k/v [tk, ng, hn]``; sample ``i``
    owns rows ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only within itself -> ``[tq, np, hn]``."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    backend = backend if backend is not None else flash_attn_backend()
    cu_q, cu_k = cu_seqlens_q.int(), cu_seqlens_k.int()
    if backend is not None and backend.accepts(q, k, v):
        max_q = max_seqlen_q or int((cu_q[1:] - cu_q[:-1]).max())
        max_k = max_seqlen_k or int((cu_k[1:] - cu_k[:-1]).max())
        out = backend.varlen(
            q, k, v, cu_q, cu_k, int(max_q), int(max_k), softmax_scale=scale, causal=False
        )
        return _first(out)  # [tq, np, hn]
    outs = []
    for i in range(cu_q.numel() - 1):  # SDPA per sample of the pack
        qs = q[int(cu_q[i]) : int(cu_q[i + 1])].transpose(0, 1)[None]  # [1, np, tq_i, hn]
        ks = k[int(cu_k[i]) : int(cu_k[i + 1])].transpose(0, 1)[None]
        vs = v[int(cu_k[i]) : int(cu_k[i + 1])].transpose(0, 1)[None]
        outs.append(_sdpa(qs, ks, vs, None, scale)[0].transpose(0, 1))  # [tq_i, np, hn]
    return torch.cat(outs, dim=0)  # [tq, np, hn]


class FlashAttnCoreAttention(MegatronModule):
    """megatron core attention on :func:`attention` / :func:`varlen_attention`.

    Takes megatron's THD ``PackedSeqParams`` (query ``[t, np, hn]`` with the batch dim already
    squeezed by megatron's ``Attention``), an *unpacked* ``SequenceLayout`` (full attention over
    the batch, what ``LumosDiT`` passes for image / video batches) or nothing. Packs and the
    spatial / temporal token patterns of a ``SequenceLayout`` belong to ``SDPACoreAttention``,
    whose SDPA calls :func:`attention` can replace.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **kwargs,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout={dropout}: the DiT attention is dropout-free; set it to 0"
            )
        if kwargs.get("pattern", "full") != "full" or kwargs.get("gated", False):
            raise ValueError(
                "FlashAttnCoreAttention: token patterns and gated heads are SDPACoreAttention "
                "features (route its SDPA through lumos_mcore.ops.flash_attention.attention)"
            )
        self.layer_number = layer_number
        self.attention_type = attention_type
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group
        self.cp_size = config.context_parallel_size
        self.backend = flash_attn_backend()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("FlashAttnCoreAttention: attention_bias is not supported")
        if getattr(packed_seq_params, "qkv_format", None) == "thd":
            return self._packed(query, key, value, packed_seq_params)
        if (
            packed_seq_params is not None
            and getattr(packed_seq_params, "packed", None) is not False
        ):
            raise NotImplementedError(
                "FlashAttnCoreAttention takes THD PackedSeqParams or an unpacked SequenceLayout; "
                "packs in the engine's SequenceLayout go to SDPACoreAttention"
            )
        if self.cp_size > 1 and self.attention_type == "self":
            # Equal contiguous sequence shards: gather K/V (backward reduce-scatters their grads).
            key = gather_from_sequence_parallel_region(key, True, group=self.cp_group)
            value = gather_from_sequence_parallel_region(value, True, group=self.cp_group)
        sq, b, np_, hn = query.shape
        mask = None if attention_mask is None else ~attention_mask.bool()  # True = attend
        out = attention(
            query.permute(1, 2, 0, 3),  # [b, np, sq, hn]
            key.permute(1, 2, 0, 3),  # [b, ng, sk, hn]
            value.permute(1, 2, 0, 3),
            mask,
            self.softmax_scale,
            self.backend,
        )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # [sq, b, np*hn]

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, psp) -> Tensor:
        if self.cp_size > 1:
            raise NotImplementedError("packed sequences under context parallelism need the TE spec")
        padded = getattr(psp, "cu_seqlens_q_padded", None)
        if padded is not None and not torch.equal(padded, psp.cu_seqlens_q):
            raise ValueError(
                "packed_seq_params.cu_seqlens_q_padded differs from cu_seqlens_q: flash-attn "
                "varlen needs unpadded packs (use the TE spec for padded THD)"
            )
        out = varlen_attention(
            query,
            key,
            value,
            psp.cu_seqlens_q,
            psp.cu_seqlens_kv,
            psp.max_seqlen_q,
            psp.max_seqlen_kv,
            self.softmax_scale,
            self.backend,
        )  # [t, np, hn]
        return out.reshape(out.shape[0], -1)  # [t, np*hn]

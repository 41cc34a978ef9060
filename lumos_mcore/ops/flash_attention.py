"""flash-attn attention for the megatron "local" DiT spec (GPU without TransformerEngine).

Three entry points, all bidirectional and dropout-free (as the DiT is):

- :func:`attention` -- a drop-in for SDPA on SDPA's layout (``q [B', np, Lq, hn]``,
  ``k/v [B', ng, Lk, hn]``, boolean ``mask`` with True = attend). Runs flash-attn when the mask
  is absent or a key-padding mask ``[B'|1, 1, 1, Lk]`` (padded condition tokens: the valid keys
  are gathered into a varlen batch, no score matrix is masked), SDPA otherwise. Batches above
  :data:`MAX_BATCH` (the temporal pattern's ``frames-groups * h * w * b``) run in chunks.
- :func:`varlen_attention` -- packed sequences in THD layout with ``cu_seqlens`` (several
  samples of different lengths in one sequence, no block-diagonal mask materialised).
- :class:`FlashAttnCoreAttention` -- a megatron core attention (``[sq, b, np, hn]`` in,
  ``[sq, b, np * hn]`` out) on these, for THD ``PackedSeqParams`` and unpacked batches, with
  all-gather context parallelism for self-attention like the SDPA core attention.

Grouped-query attention needs no K/V repetition. Backends, chosen per head dim by
:func:`flash_attn_backend`: FlashAttention-3 (``flash_attn_3.flash_attn_interface`` or
``flash_attn_interface``) on Hopper, else FlashAttention-2 (``flash_attn``), on GPUs of compute
capability >= 8.0. A candidate must import *and* run a tiny forward + backward at the model's
head dim: builds differ in the head dims they compiled (newer FA3 and FA2 round 72, Lumos-XL, up
to their 96 kernels; older FA3 builds only have 64 / 128 / 256), so a failing candidate is logged
and the next one tried (FA3 -> FA2 -> SDPA). ``LUMOS_FLASH_ATTN=fa2|fa3`` forces one (a forced
backend that cannot load or run raises), ``sdpa`` turns flash-attn off. Inputs a backend cannot
take (float32, CPU, head dims that are not a multiple of 8 up to 256) go through SDPA. The
choice is logged once per head dim.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from lumos_mcore.ops.tensor_memo import memo_on

log = logging.getLogger(__name__)

__all__ = [
    "CHOICES",
    "ENV",
    "HEAD_DIM_MAX",
    "MAX_BATCH",
    "FlashAttnCoreAttention",
    "FlashBackend",
    "attend_mask",
    "attention",
    "flash_attn_backend",
    "varlen_attention",
]

ENV = "LUMOS_FLASH_ATTN"
CHOICES = ("auto", "fa2", "fa3", "sdpa")

# flash-attn's kernels take head dims that are multiples of 8, up to 256.
HEAD_DIM_MAX = 256

# CUDA caps gridDim.y / gridDim.z at 65535, and FA2 / FA3 and PyTorch's memory-efficient and
# flash SDPA kernels put the batch on one of them: a larger batch fails with "invalid
# configuration argument". The largest power of two below the cap, so the usual power-of-two
# batches (h * w * b of the temporal pattern) split into equal chunks.
MAX_BATCH = 32768

_PACKAGES = {
    "fa2": "flash-attn 2 (pip package flash-attn, module flash_attn)",
    "fa3": (
        "flash-attn 3 (module flash_attn_3.flash_attn_interface or flash_attn_interface, "
        "built from flash-attention's hopper/)"
    ),
}
# The module whose absence means the package is not installed (any other import failure is a
# broken install: a build for another CUDA / torch, a missing extension).
_ROOT_MODULE = {"fa2": "flash_attn", "fa3": "flash_attn_interface"}


def _head_dim_ok(head_dim: int) -> bool:
    return head_dim % 8 == 0 and 0 < head_dim <= HEAD_DIM_MAX


@dataclass(frozen=True)
class FlashBackend:
    """A flash-attn implementation: dense ``func(q, k, v, softmax_scale=, causal=)`` on
    ``[b, s, h, d]`` and ``varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=, causal=)``
    on ``[total, h, d]``; either may return ``(out, lse, ...)`` (older FA3) or ``out``, and both
    take ``deterministic=True`` (passed only when asked for)."""

    name: str
    func: Callable
    varlen: Callable
    device_type: str = "cuda"
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)

    def accepts(self, *tensors: Tensor) -> bool:
        """Whether these tensors can go to this backend (else SDPA is used): its device and
        dtypes, and a head dim flash-attn has kernels for."""
        return all(
            t.device.type == self.device_type
            and t.dtype in self.dtypes
            and _head_dim_ok(t.shape[-1])
            for t in tensors
        )


def _import_fa3():
    # TransformerEngine imports FA3 as ``flash_attn_3.flash_attn_interface``; some installs carry
    # that and a separate top-level copy, and importing both registers FA3's torch custom ops
    # twice, which breaks the copy imported first. Prefer TE's path; fall back to the top level
    # only when TE's path is absent (not when it is present and fails).
    try:
        return importlib.import_module("flash_attn_3.flash_attn_interface")
    except ModuleNotFoundError as exc:
        if exc.name not in ("flash_attn_3", "flash_attn_3.flash_attn_interface"):
            raise
    return importlib.import_module("flash_attn_interface")


def _load(name: str) -> FlashBackend:
    """Import backend ``name`` (``fa2`` | ``fa3``); raises what the import raised."""
    if name == "fa3":
        mod = _import_fa3()
        return FlashBackend("flash-attn 3", mod.flash_attn_func, mod.flash_attn_varlen_func)
    mod = importlib.import_module("flash_attn")
    version = getattr(mod, "__version__", "2")
    return FlashBackend(f"flash-attn {version}", mod.flash_attn_func, mod.flash_attn_varlen_func)


def _absent(exc: Exception, name: str) -> bool:
    """Whether ``exc`` says package ``name`` is not installed (rather than broken)."""
    return isinstance(exc, ModuleNotFoundError) and exc.name == _ROOT_MODULE[name]


def _capability() -> tuple[int, int] | None:
    """The current GPU's compute capability, None without CUDA."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _probe(backend: FlashBackend, head_dim: int) -> None:
    """A tiny forward + backward, dense and varlen, at ``head_dim`` in bf16; raises when the
    build cannot run it (importing says nothing about the head dims a build compiled). Inputs
    come from a private generator: the run's random streams must not depend on when the probe
    ran."""
    dtype = torch.bfloat16 if torch.bfloat16 in backend.dtypes else backend.dtypes[0]
    dev = backend.device_type
    g = torch.Generator().manual_seed(0)
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(dev, enabled=False),
    ):
        q, k, v = (
            torch.randn(2, 16, heads, head_dim, generator=g).to(dev, dtype).requires_grad_()
            for heads in (2, 1, 1)
        )  # [b, s, np|ng, hn], grouped-query like the model's
        scale = head_dim**-0.5
        out = _first(backend.func(q, k, v, softmax_scale=scale, causal=False))  # [b, s, np, hn]
        cu = torch.tensor([0, 5, 16], dtype=torch.int32, device=dev)  # two samples of 5 and 11
        packed = _first(
            backend.varlen(q[0], k[0], v[0], cu, cu, 11, 11, softmax_scale=scale, causal=False)
        )  # [16, np, hn]
        if out.shape != q.shape or packed.shape != q[0].shape:
            raise RuntimeError(
                f"output shapes {tuple(out.shape)}, {tuple(packed.shape)} for inputs "
                f"{tuple(q.shape)}, {tuple(q[0].shape)}"
            )
        grads = torch.autograd.grad(out.float().sum() + packed.float().sum(), (q, k, v))
    if not all(bool(torch.isfinite(t).all()) for t in (out, packed, *grads)):
        raise RuntimeError("non-finite outputs or gradients")


@cache
def flash_attn_backend(head_dim: int | None = None) -> FlashBackend | None:
    """The flash-attn backend for attention at ``head_dim`` (None: SDPA); logged once per head
    dim.

    ``head_dim`` None picks the first candidate that imports (for reports); with a head dim each
    candidate must also pass :func:`_probe`, because a build may import and still lack kernels
    for that head dim. Candidates: FA3 then FA2 on Hopper, FA2 elsewhere, none below compute
    capability 8.0 or without CUDA. ``LUMOS_FLASH_ATTN=fa2|fa3`` makes that backend the only
    candidate and raises instead of falling back (a forced backend that silently became SDPA
    would mislead benchmarks); ``sdpa`` returns None.
    """
    pref = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if pref not in CHOICES:
        raise ValueError(f"{ENV}={pref!r}: choose one of {', '.join(CHOICES)}")
    where = "" if head_dim is None else f" for head dim {head_dim}"
    if pref == "sdpa":
        log.info("attention backend%s: SDPA (%s=sdpa)", where, ENV)
        return None
    forced = pref != "auto"

    def unusable(why: str) -> None:
        if forced:
            raise RuntimeError(f"{ENV}={pref}: {why}; unset {ENV} or set {ENV}=sdpa")
        log.info("attention backend%s: SDPA (%s)", where, why)

    cap = _capability()
    if cap is None:
        return unusable("no CUDA device")
    if cap < (8, 0):
        return unusable(
            f"flash-attn needs compute capability >= 8.0, this GPU has {cap[0]}.{cap[1]}"
        )
    if head_dim is not None and not _head_dim_ok(head_dim):
        return unusable(f"flash-attn takes head dims that are multiples of 8 up to {HEAD_DIM_MAX}")
    order = {"auto": ["fa3", "fa2"] if cap[0] == 9 else ["fa2"], "fa2": ["fa2"], "fa3": ["fa3"]}
    for name in order[pref]:
        try:
            backend = _load(name)
        except Exception as exc:  # not installed, or a build for another CUDA / torch
            if forced:
                raise RuntimeError(
                    f"{ENV}={pref}: {_PACKAGES[name]} does not import "
                    f"({type(exc).__name__}: {exc}); install it, or unset {ENV}"
                ) from exc
            level = logging.DEBUG if _absent(exc, name) else logging.WARNING
            log.log(level, "%s unusable: %s: %s", _PACKAGES[name], type(exc).__name__, exc)
            continue
        if head_dim is not None:
            try:
                _probe(backend, head_dim)
            except Exception as exc:
                if forced:
                    raise RuntimeError(
                        f"{ENV}={pref}: {backend.name} cannot run head dim {head_dim} "
                        f"({type(exc).__name__}: {exc}); unset {ENV} to fall back"
                    ) from exc
                log.warning(
                    "%s fails a forward + backward at head dim %d (%s: %s); trying the next "
                    "attention backend",
                    backend.name,
                    head_dim,
                    type(exc).__name__,
                    exc,
                )
                continue
        log.info("attention backend%s: %s", where, backend.name)
        return backend
    log.info("attention backend%s: SDPA (no flash-attn build imports and runs here)", where)
    return None


def _first(out: Tensor | tuple) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _flags(deterministic: bool) -> dict:
    # Only when asked for (here, or process-wide by torch.use_deterministic_algorithms): builds
    # without the keyword keep working.
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return {"deterministic": True}
    return {}


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA with grouped-query K/V repeated: ``[B', np, Lq, hn]`` out."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B', np, Lk, hn]
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _key_padding(mask: Tensor, batch: int, lk: int) -> tuple[Tensor, Tensor, int] | None:
    """Varlen form of a boolean key-padding mask ``[B'|1, 1, 1, Lk]`` (True = attend): the
    flat ``[B'*Lk]`` indices of the valid keys, ``cu_seqlens_k [B'+1]`` and the longest row;
    None for any other mask. Reads the mask back to the host (memoised by the caller)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1):
        return None
    if mask.shape[-1] != lk or mask.shape[0] not in (1, batch):
        return None
    keep = mask.reshape(mask.shape[0], lk).expand(batch, lk)  # [B', Lk]
    lens = keep.sum(-1, dtype=torch.int32)  # [B'] valid keys per row
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # [B'+1]
    index = keep.reshape(-1).nonzero().squeeze(1)  # [total_k]
    return index, cu_k, int(lens.max())


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    backend: FlashBackend | None = None,
    deterministic: bool = False,
) -> Tensor:
    """Bidirectional attention on SDPA's layout: ``q [B', np, Lq, hn]``, ``k/v [B', ng, Lk, hn]``,
    ``mask`` boolean (True = attend) -> ``[B', np, Lq, hn]``; flash-attn where it applies.

    ``backend`` None: :func:`flash_attn_backend` at this head dim for CUDA inputs. Batches above
    :data:`MAX_BATCH` run in chunks (CUDA's grid limit, see there), the mask chunked with them
    unless it broadcasts over the batch. ``deterministic`` (or
    ``torch.use_deterministic_algorithms(True)``) asks flash-attn for its deterministic backward.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend is None and q.is_cuda:
        backend = flash_attn_backend(q.shape[-1])
    batch = q.shape[0]
    if batch <= MAX_BATCH:
        return _attention(q, k, v, mask, 0, scale, backend, deterministic)
    outs = []
    for i in range(0, batch, MAX_BATCH):
        rows = slice(i, i + MAX_BATCH)
        outs.append(_attention(q[rows], k[rows], v[rows], mask, i, scale, backend, deterministic))
    return torch.cat(outs)  # [B', np, Lq, hn]


def attend_mask(attention_mask: Tensor) -> Tensor:
    """megatron's mask (True = masked out) as SDPA's (True = attend): one tensor per mask, so
    the varlen form :func:`attention` derives from it is built once for all layers."""
    return memo_on((attention_mask,), "attend", lambda: ~attention_mask.bool())


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    start: int,
    scale: float,
    backend: FlashBackend | None,
    deterministic: bool,
) -> Tensor:
    """:func:`attention` on the chunk of at most :data:`MAX_BATCH` rows from ``start``;
    ``mask`` is the caller's whole mask (its rows from ``start`` apply unless it broadcasts)."""
    bq, np_, lq, hn = q.shape
    if mask is not None and mask.dim() == q.dim() and mask.shape[0] != 1:
        chunk = mask[start : start + bq]  # the chunk's rows of a per-row mask
    else:
        chunk = mask
    if backend is None or not backend.accepts(q, k, v):
        return _sdpa(q, k, v, chunk, scale)
    flags = _flags(deterministic)
    qf, kf, vf = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B', L, h, hn]
    if mask is None:
        out = _first(backend.func(qf, kf, vf, softmax_scale=scale, causal=False, **flags))
        return out.transpose(1, 2)  # [B', np, Lq, hn]
    lk = k.shape[2]
    varlen = memo_on((mask,), ("key_padding", start, bq, lk), lambda: _key_padding(chunk, bq, lk))
    if varlen is None:  # not a key-padding mask
        return _sdpa(q, k, v, chunk, scale)
    index, cu_k, max_k = varlen
    cu_q = torch.arange(0, (bq + 1) * lq, lq, dtype=torch.int32, device=q.device)  # [B'+1]
    out = _first(
        backend.varlen(
            qf.reshape(bq * lq, np_, hn),
            kf.reshape(bq * lk, *kf.shape[2:]).index_select(0, index),  # [total_k, ng, hn]
            vf.reshape(bq * lk, *vf.shape[2:]).index_select(0, index),
            cu_q,
            cu_k,
            lq,
            max_k,
            softmax_scale=scale,
            causal=False,
            **flags,
        )
    )  # [B'*Lq, np, hn]
    return out.view(bq, lq, np_, hn).transpose(1, 2)  # [B', np, Lq, hn]


def _cu_seqlens(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, q: Tensor, k: Tensor
) -> tuple[Tensor, Tensor, list[int], list[int]]:
    """``cu_seqlens`` as flash-attn reads them (contiguous int32 on the inputs' device), checked
    against the token counts: flash-attn trusts them and reads past the tensors otherwise (e.g.
    an image pack's ``cu_seqlens`` given to cross-attention over condition tokens); also their
    boundaries as ints. The check reads the tensors back to the host, so it is memoised on
    them: every layer passes the same ones."""
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()  # [n+1]
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()  # [n+1]
    tq, tk = q.shape[0], k.shape[0]
    bq, bk = memo_on(
        (cu_seqlens_q, cu_seqlens_k),
        ("cu_seqlens", tq, tk),
        lambda: _checked_bounds(cu_q, cu_k, tq, tk),
    )
    return cu_q, cu_k, bq, bk


def _checked_bounds(cu_q: Tensor, cu_k: Tensor, tq: int, tk: int) -> tuple[list[int], list[int]]:
    if cu_q.dim() != 1 or cu_q.numel() < 2 or cu_q.shape != cu_k.shape:
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k {tuple(cu_k.shape)} must both "
            "be [samples + 1]"
        )
    bq, bk = torch.stack((cu_q, cu_k)).tolist()
    if bq[-1] != tq:
        raise ValueError(f"cu_seqlens_q ends at {bq[-1]} but the queries hold {tq} tokens")
    if bk[-1] != tk:
        raise ValueError(f"cu_seqlens_k ends at {bk[-1]} but the keys hold {tk} tokens")
    return bq, bk


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
    deterministic: bool = False,
) -> Tensor:
    """Packed attention in THD layout: ``q [tq, np, hn]``, ``k/v [tk, ng, hn]``; sample ``i``
    owns rows ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only within itself -> ``[tq, np, hn]``.

    ``cu_seqlens`` must end at ``tq`` / ``tk`` (checked). ``backend`` None:
    :func:`flash_attn_backend` at this head dim for CUDA inputs.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend is None and q.is_cuda:
        backend = flash_attn_backend(q.shape[-1])
    cu_q, cu_k, bq, bk = _cu_seqlens(cu_seqlens_q, cu_seqlens_k, q, k)  # [n+1] each, ints
    if backend is not None and backend.accepts(q, k, v):
        max_q = max_seqlen_q or max(b - a for a, b in zip(bq, bq[1:]))
        max_k = max_seqlen_k or max(b - a for a, b in zip(bk, bk[1:]))
        out = backend.varlen(
            q,
            k,
            v,
            cu_q,
            cu_k,
            int(max_q),
            int(max_k),
            softmax_scale=scale,
            causal=False,
            **_flags(deterministic),
        )
        return _first(out)  # [tq, np, hn]
    outs = []
    for i in range(len(bq) - 1):  # SDPA per sample of the pack
        qs = q[bq[i] : bq[i + 1]].transpose(0, 1)[None]  # [1, np, tq_i, hn]
        ks = k[bk[i] : bk[i + 1]].transpose(0, 1)[None]
        vs = v[bk[i] : bk[i + 1]].transpose(0, 1)[None]
        outs.append(_sdpa(qs, ks, vs, None, scale)[0].transpose(0, 1))  # [tq_i, np, hn]
    return torch.cat(outs, dim=0)  # [tq, np, hn]


class FlashAttnCoreAttention(MegatronModule):
    """megatron core attention on :func:`attention` / :func:`varlen_attention`.

    Takes megatron's THD ``PackedSeqParams`` (query ``[t, np, hn]`` with the batch dim already
    squeezed by megatron's ``Attention``), an *unpacked* ``SequenceLayout`` (full attention over
    the batch, what ``LumosDiT`` passes for image / video batches) or nothing. Packs and the
    spatial / temporal token patterns of a ``SequenceLayout`` belong to ``SDPACoreAttention``,
    whose SDPA calls :func:`attention` can replace. The backend is chosen for
    ``config.kv_channels``; ``config.deterministic_mode`` selects flash-attn's deterministic
    backward.
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
        self.deterministic = bool(getattr(config, "deterministic_mode", False))
        self.backend = flash_attn_backend(config.kv_channels)

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
        mask = None if attention_mask is None else attend_mask(attention_mask)  # True = attend
        out = attention(
            query.permute(1, 2, 0, 3),  # [b, np, sq, hn]
            key.permute(1, 2, 0, 3),  # [b, ng, sk, hn]
            value.permute(1, 2, 0, 3),
            mask,
            self.softmax_scale,
            self.backend,
            self.deterministic,
        )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # [sq, b, np*hn]

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, psp) -> Tensor:
        if self.cp_size > 1:
            raise NotImplementedError("packed sequences under context parallelism need the TE spec")
        if psp.cu_seqlens_q is None or psp.cu_seqlens_kv is None:
            raise ValueError("THD packed_seq_params need cu_seqlens_q and cu_seqlens_kv")
        for side in ("q", "kv"):
            cu = getattr(psp, f"cu_seqlens_{side}")
            padded = getattr(psp, f"cu_seqlens_{side}_padded", None)
            if padded is not None and not torch.equal(padded.to(cu.device, cu.dtype), cu):
                raise ValueError(
                    f"packed_seq_params.cu_seqlens_{side}_padded differs from cu_seqlens_{side}: "
                    "flash-attn varlen needs unpadded packs (use the TE spec for padded THD)"
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
            self.deterministic,
        )  # [t, np, hn]
        return out.reshape(out.shape[0], -1)  # [t, np*hn]

"""Token layout of one micro-batch: which samples make up the sequence, and this rank's shard.

Every Lumos DiT input — an image batch, a video batch, or a *pack* of samples of different
sizes — is one token sequence made of **segments**. A segment is one sample: ``frames x height
x width`` tokens in frame-major ``(t, h, w)`` order (``models.common.embeddings`` states the
order; images have one frame). Unpacked batches have one segment shared by the ``b`` samples of
the batch dimension; a pack has ``b = 1`` and several segments, each with its own timestep and its
own number of condition tokens.

**Context parallelism** splits the sequence into equal shares, one per CP rank:

* ``contiguous`` (local spec): rank ``r`` holds tokens ``[r S/cp, (r+1) S/cp)`` of the whole
  sequence (a share may span several segments of a pack);
* ``zigzag`` (TransformerEngine's THD convention): every segment is cut into ``2 cp`` chunks and
  rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r`` of each segment, so every rank sees every
  sample.

A rank's local tokens are the concatenation of its *chunks*; intersected with the segments they
give *pieces* (segment, global range, local offset), which is what attention iterates over.
Sequence parallelism then splits the CP-local tokens again over the TP ranks (megatron's scatter:
equal contiguous chunks), for everything outside attention.

The layout is passed to every layer through megatron's ``packed_seq_params`` argument (it
reaches the core attention on the plain and the recomputed paths alike); ``qkv_format`` is
``"sbhd"`` so megatron's ``Attention`` keeps the ``[s, b, h, d]`` shape and applies RoPE per
token. ``bind`` attaches the per-forward tensors the layers need (per-token adaLN row index,
temporal position embedding, packed condition padding mask).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from lumos_mcore.models.common.embeddings import token_coords

__all__ = ["CP_MODES", "Piece", "Segment", "SequenceLayout"]

CP_MODES = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Segment:
    """One sample of the sequence: ``frames x height x width`` tokens (token grid, not pixels).

    ``cond_len`` is the sample's number of condition tokens in a packed context (0 for unpacked
    batches, whose context is ``[Lc, b, D]``); ``pad`` marks filler tokens that only exist to
    make a pack divisible over the CP/SP ranks (they attend among themselves, see no condition
    and are left out of the loss).
    """

    frames: int
    height: int
    width: int
    cond_len: int = 0
    pad: bool = False

    def __post_init__(self) -> None:
        if min(self.frames, self.height, self.width) < 1 or self.cond_len < 0:
            raise ValueError(f"invalid segment {self}: sizes must be positive")

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.frames, self.height, self.width


@dataclass(frozen=True)
class Piece:
    """The part of one segment held locally: global tokens ``[start, end)`` at local ``local``."""

    segment: int
    start: int
    end: int
    local: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PieceGroup:
    """``count`` consecutive pieces that are whole, identically shaped segments (batched
    together in attention), or a single piece (``count == 1``)."""

    first: Piece
    count: int


class SequenceLayout:
    """Segments of a micro-batch sequence plus this rank's CP shard and SP slice."""

    qkv_format = "sbhd"  # megatron's Attention special-cases only "thd"

    def __init__(
        self,
        segments: list[Segment] | tuple[Segment, ...],
        *,
        packed: bool = False,
        cp_size: int = 1,
        cp_rank: int = 0,
        cp_mode: str = "contiguous",
        sp_size: int = 1,
        sp_rank: int = 0,
    ) -> None:
        segments = tuple(segments)
        if not segments:
            raise ValueError("a sequence layout needs at least one segment")
        if not packed and len(segments) != 1:
            raise ValueError("an unpacked batch has exactly one segment (shared by the batch)")
        if cp_mode not in CP_MODES:
            raise ValueError(f"model.cp_layout={cp_mode!r}: choose one of {', '.join(CP_MODES)}")
        self.segments = segments
        self.packed = packed
        self.cp_size, self.cp_rank, self.cp_mode = cp_size, cp_rank, cp_mode
        self.sp_size, self.sp_rank = sp_size, sp_rank
        self.offsets = _cumsum([s.num_tokens for s in segments])
        self.frame_offsets = _cumsum([s.frames for s in segments])
        self.cond_offsets = _cumsum([s.cond_len for s in segments])
        self.total = self.offsets[-1]
        self.num_frames = self.frame_offsets[-1]
        self.cond_total = self.cond_offsets[-1]
        if cp_mode == "contiguous" and self.total % cp_size:
            raise ValueError(
                f"parallel.cp={cp_size}: the sequence has {self.total} tokens, not divisible "
                "into equal context-parallel shares; pad the pack (SequenceLayout.for_pack)"
            )
        if cp_mode == "zigzag":
            bad = [s for s in segments if s.num_tokens % (2 * cp_size)]
            if bad:
                raise ValueError(
                    f"parallel.cp={cp_size} with model.cp_layout='zigzag': every sample needs a "
                    f"multiple of 2*cp={2 * cp_size} tokens; {bad[0]} has {bad[0].num_tokens}"
                )
        self.local_tokens = self.total // cp_size
        if self.local_tokens % sp_size:
            raise ValueError(
                f"parallel.sequence_parallel: {self.local_tokens} tokens per CP rank do not "
                f"split over tp={sp_size} ranks; pad the sequence"
            )
        self.chunks = self.chunks_of_rank(cp_rank)
        self.pieces = self._pieces(self.chunks)
        self.adaln_index: Tensor | None = None
        self.temporal_pos: Tensor | None = None
        self.context_valid: Tensor | None = None
        self._device = torch.device("cpu")

    @property
    def num_real_segments(self) -> int:
        """Segments that are samples (pad segments, if any, come last)."""
        return sum(not s.pad for s in self.segments)

    # -- construction helpers ----------------------------------------------------------------
    @classmethod
    def for_pack(
        cls,
        shapes: list[tuple[int, int, int]],
        cond_lens: list[int],
        *,
        cp_size: int = 1,
        cp_rank: int = 0,
        cp_mode: str = "contiguous",
        sp_size: int = 1,
        sp_rank: int = 0,
        pad_to: int | None = None,
    ) -> SequenceLayout:
        """A pack of samples ``(frames, h, w)``; a pad segment is appended when the total does
        not split evenly over ``cp * sp`` ranks (contiguous mode), or up to ``pad_to`` tokens
        (pipeline parallelism sends fixed-size activations, so every pack of a run must have
        the same padded length)."""
        segments = [Segment(*shape, cond_len=lc) for shape, lc in zip(shapes, cond_lens)]
        total = sum(s.num_tokens for s in segments)
        if pad_to is not None and pad_to < total:
            raise ValueError(f"pack of {total} tokens does not fit pad_to={pad_to}")
        pad = (pad_to - total) if pad_to is not None else 0
        if cp_mode == "contiguous":
            pad += -(total + pad) % (cp_size * sp_size)
        if pad:
            if cp_mode == "zigzag" and pad % (2 * cp_size):
                raise ValueError(
                    f"pad_to={pad_to}: the {pad} pad tokens must be a multiple of 2*cp in the "
                    "zig-zag layout"
                )
            segments.append(Segment(1, 1, pad, pad=True))
        return cls(
            segments,
            packed=True,
            cp_size=cp_size,
            cp_rank=cp_rank,
            cp_mode=cp_mode,
            sp_size=sp_size,
            sp_rank=sp_rank,
        )

    def chunks_of_rank(self, rank: int) -> list[tuple[int, int]]:
        """Global token ranges held by CP rank ``rank``, in local order."""
        if self.cp_size == 1:
            return [(0, self.total)]
        if self.cp_mode == "contiguous":
            n = self.local_tokens
            return [(rank * n, (rank + 1) * n)]
        chunks = []
        for seg, off in zip(self.segments, self.offsets):
            c = seg.num_tokens // (2 * self.cp_size)
            for k in (rank, 2 * self.cp_size - 1 - rank):
                chunks.append((off + k * c, off + (k + 1) * c))
        return chunks

    def _pieces(self, chunks: list[tuple[int, int]]) -> list[Piece]:
        pieces, local = [], 0
        for a, b in chunks:
            for i, off in enumerate(self.offsets[:-1]):
                lo, hi = max(a, off), min(b, self.offsets[i + 1])
                if lo < hi:
                    pieces.append(Piece(i, lo, hi, local + lo - a))
            local += b - a
        return pieces

    # -- per-token index tensors (CP-local unless stated) -------------------------------------
    def to(self, device: torch.device | str) -> SequenceLayout:
        """Copy whose index tensors live on ``device``."""
        out = copy.copy(self)
        for name in _CACHED_TENSORS:
            out.__dict__.pop(name, None)
        out._device = torch.device(device)
        out._memo = {}
        return out

    @property
    def device(self) -> torch.device:
        return self._device

    @cached_property
    def local_index(self) -> Tensor:
        """Global positions of the local tokens ``[S/cp]``."""
        parts = [torch.arange(a, b) for a, b in self.chunks]
        return torch.cat(parts).to(self._device)

    @cached_property
    def local_segment(self) -> Tensor:
        """Segment of each local token ``[S/cp]``."""
        seg = torch.empty(self.local_tokens, dtype=torch.long)
        for p in self.pieces:
            seg[p.local : p.local + p.size] = p.segment
        return seg.to(self._device)

    @cached_property
    def local_coords(self) -> Tensor:
        """``(frame, row, col)`` of each local token within its segment ``[S/cp, 3]``."""
        out = torch.empty(self.local_tokens, 3, dtype=torch.long)
        for p in self.pieces:
            seg, off = self.segments[p.segment], self.offsets[p.segment]
            rel = torch.arange(p.start - off, p.end - off)
            out[p.local : p.local + p.size] = token_coords(*seg.shape, index=rel)
        return out.to(self._device)

    def local_rows(self, segment: int) -> list[int]:
        """Local token indices of ``segment``, ascending (host ints: no GPU read-back)."""
        rows: list[int] = []
        for p in self.pieces:
            if p.segment == segment:
                rows.extend(range(p.local, p.local + p.size))
        return rows

    def local_first_frame_tokens(self, segment: int) -> int:
        """How many of ``segment``'s local tokens lie in its first frame (host arithmetic)."""
        seg, off = self.segments[segment], self.offsets[segment]
        n = 0
        for p in self.pieces:
            if p.segment == segment:
                n += max(0, min(p.end - off, seg.frame_tokens) - (p.start - off))
        return n

    @cached_property
    def local_frame(self) -> Tensor:
        """Global frame id (across the pack) of each local token ``[S/cp]``."""
        first = torch.tensor(self.frame_offsets[:-1], device=self._device)
        return first[self.local_segment] + self.local_coords[:, 0]

    @cached_property
    def kv_order(self) -> Tensor | None:
        """Rows of the rank-ordered all-gather of the local tokens, in global order (None when
        that order already is the global order, i.e. contiguous sharding)."""
        if self.cp_size == 1 or self.cp_mode == "contiguous":
            return None
        gathered = torch.cat(
            [torch.arange(a, b) for r in range(self.cp_size) for a, b in self.chunks_of_rank(r)]
        )
        return torch.argsort(gathered).to(self._device)

    @property
    def sp_range(self) -> tuple[int, int]:
        """Local tokens ``[a, b)`` held by this rank under sequence parallelism."""
        n = self.local_tokens // self.sp_size
        return self.sp_rank * n, (self.sp_rank + 1) * n

    def sp_slice(self, x: Tensor, dim: int = 0) -> Tensor:
        """This SP rank's part of a CP-local per-token tensor (megatron's SP scatter split)."""
        a, b = self.sp_range
        return x.narrow(dim, a, b - a)

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This CP rank's tokens of a full-sequence tensor (token axis ``dim``)."""
        if self.cp_size == 1:
            return x
        if self.cp_mode == "contiguous":
            a, b = self.chunks[0]
            return x.narrow(dim, a, b - a)
        return x.index_select(dim, self.local_index.to(x.device))

    def gather(self, x: Tensor, group, dim: int = 1) -> Tensor:
        """All CP ranks' local tokens -> the full sequence in global order (no autograd)."""
        if self.cp_size == 1:
            return x
        x = x.movedim(dim, 0).contiguous()
        out = x.new_empty((x.shape[0] * self.cp_size, *x.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, x, group=group)
        if self.kv_order is not None:
            out = out.index_select(0, self.kv_order.to(out.device))
        return out.movedim(0, dim)

    # -- structure queries ------------------------------------------------------------------
    def piece_is_whole(self, p: Piece) -> bool:
        return p.start == self.offsets[p.segment] and p.end == self.offsets[p.segment + 1]

    def piece_is_frame_aligned(self, p: Piece) -> bool:
        off, hw = self.offsets[p.segment], self.segments[p.segment].frame_tokens
        return (p.start - off) % hw == 0 and (p.end - off) % hw == 0

    def local_only(self, pattern: str) -> bool:
        """True when attention of ``pattern`` needs no key/value from other CP ranks."""
        if pattern == "spatial":
            return all(self.piece_is_frame_aligned(p) for p in self.pieces)
        return all(self.piece_is_whole(p) for p in self.pieces)

    @cached_property
    def groups(self) -> list[PieceGroup]:
        """Pieces in local order, consecutive whole segments of identical shape (and condition
        length) merged so attention runs them as one batch."""
        groups: list[PieceGroup] = []
        for p in self.pieces:
            if groups:
                g = groups[-1]
                last_seg = g.first.segment + g.count - 1
                seg, prev = self.segments[p.segment], self.segments[last_seg]
                if (
                    self.piece_is_whole(p)
                    and self.piece_is_whole(g.first)
                    and p.segment == last_seg + 1
                    and p.local == g.first.local + g.count * g.first.size
                    and seg == prev
                ):
                    groups[-1] = PieceGroup(g.first, g.count + 1)
                    continue
            groups.append(PieceGroup(p, 1))
        return groups

    # -- per-forward tensors ----------------------------------------------------------------
    def bind(
        self,
        *,
        adaln_index: Tensor | None = None,
        temporal_pos: Tensor | None = None,
        context_valid: Tensor | None = None,
    ) -> SequenceLayout:
        """Shallow copy carrying the per-forward tensors the layers read.

        ``adaln_index [S/cp/sp]``: row of the adaLN conditioning for each (SP-local) token;
        ``temporal_pos [S/cp/sp, 1, D]``: added to the temporal attention's input;
        ``context_valid [Lc_total]``: key padding of a packed context (True = real token).
        """
        out = copy.copy(self)
        out.adaln_index = adaln_index
        out.temporal_pos = temporal_pos
        out.context_valid = context_valid
        out._memo = {}  # per-forward values, built by the first layer that needs them
        return out

    def _memoised(self, key: str, build):
        # One build per forward, not per layer: building a cu_seqlens tensor copies it to the
        # GPU, and checking the context padding reads a GPU value back; both stall the host.
        memo = self.__dict__.setdefault("_memo", {})
        if key not in memo:
            memo[key] = build()
        return memo[key]

    def te_packed_seq_params(self):
        """megatron ``PackedSeqParams`` (THD, global cu_seqlens) for TransformerEngine attention
        over the samples of a pack; TE splits each sample over CP ranks in the zig-zag layout.

        The padded cu_seqlens are the same tensors (no padding between samples): TE's context
        parallelism requires them for THD, and takes ``padded is cu_seqlens`` as unpadded.
        """
        return self._memoised("te_self", self._build_te_self)

    def _build_te_self(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = torch.tensor(self.offsets, dtype=torch.int32, device=self._device)
        longest = max(s.num_tokens for s in self.segments)
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=cu,
            cu_seqlens_kv_padded=cu,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )

    def te_cross_packed_seq_params(self):
        """``(PackedSeqParams, rows)`` of a pack's cross-attention: this rank's queries grouped
        per sample (both CP layouts keep a sample's local tokens together) against each
        sample's own condition tokens, which must be unpadded.

        Samples without condition tokens (the pad segment) are left out: their queries would
        attend to an empty key sequence, whose result differs between attention kernels (the
        local spec gives them zeros, and so does the caller). ``rows`` is the number of local
        query rows kept when they are a prefix, else their indices (``[n]`` long).
        """
        return self._memoised("te_cross", self._build_te_cross)

    def _build_te_cross(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        if self.context_valid is not None and not bool(self.context_valid.all()):
            raise NotImplementedError(
                "packed cross-attention on TransformerEngine takes unpadded condition tokens"
            )
        counts = [0] * len(self.segments)
        kept: list[tuple[int, int]] = []  # local (start, end) of queries that attend
        for p in self.pieces:
            counts[p.segment] += p.size
            if self.segments[p.segment].cond_len > 0:
                kept.append((p.local, p.local + p.size))
        real = [i for i, seg in enumerate(self.segments) if seg.cond_len > 0]
        q_lens = [counts[i] for i in real]
        kv_lens = [self.segments[i].cond_len for i in real]
        n = sum(b - a for a, b in kept)
        if all(a == b0 for (a, _), b0 in zip(kept, [0] + [b for _, b in kept])):
            rows: int | Tensor = n  # a prefix (the pad segment comes last)
        else:
            rows = torch.cat([torch.arange(a, b) for a, b in kept]).to(self._device)
        if not real:
            return None, rows
        cu_q = torch.tensor(_cumsum(q_lens), dtype=torch.int32, device=self._device)
        cu_kv = torch.tensor(_cumsum(kv_lens), dtype=torch.int32, device=self._device)
        psp = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_q,
            cu_seqlens_kv=cu_kv,
            cu_seqlens_q_padded=cu_q,
            cu_seqlens_kv_padded=cu_kv,
            max_seqlen_q=max(q_lens),
            max_seqlen_kv=max(kv_lens),
        )
        return psp, rows

    def key(self) -> tuple:
        """Hashable identity (for caches of position tables)."""
        return (
            self.segments,
            self.cp_size,
            self.cp_rank,
            self.cp_mode,
            self.sp_size,
            self.sp_rank,
            str(self._device),
        )

    def __repr__(self) -> str:
        segs = ", ".join(f"{s.frames}x{s.height}x{s.width}" for s in self.segments)
        return (
            f"SequenceLayout([{segs}], packed={self.packed}, cp={self.cp_rank}/{self.cp_size} "
            f"{self.cp_mode}, sp={self.sp_rank}/{self.sp_size})"
        )


_CACHED_TENSORS = ("local_index", "local_segment", "local_coords", "local_frame", "kv_order")


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out

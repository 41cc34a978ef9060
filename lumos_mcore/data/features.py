"""Random-access reader of precomputed-feature shards (see ``lumos_mcore.data.shards``).

``FeatureDataset.get(i)`` seeks straight to sample ``i``'s members through ``index.json`` (one
``pread`` per sample), so any order of access costs the same and data-parallel ranks read only
their own samples. Damaged samples are detected at read time, counted per reason, and skipped;
``MicroBatchIterator`` (re-exported here) turns the dataset into a resumable DP-aware stream.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
from typing import Any

import numpy as np
import torch

from lumos_mcore.config.data import DataConfig
from lumos_mcore.data.sampler import GlobalOrder, MicroBatchIterator, rank_slice
from lumos_mcore.data.shard_files import ShardFiles
from lumos_mcore.data.shards import COND, COND_MASK, LATENT, MEMBER_COLUMN, META, DatasetIndex

__all__ = [
    "BAD_REASONS",
    "BadDataError",
    "BadSampleError",
    "FeatureDataset",
    "GlobalOrder",
    "MicroBatchIterator",
    "collate_features",
    "rank_slice",
]

logger = logging.getLogger(__name__)

# Why a sample can be unusable; the keys of FeatureDataset.bad_counts.
BAD_REASONS = ("missing_member", "truncated", "undecodable", "bad_shape", "non_finite")

# Read a sample's members with one pread when they lie this close together (they are adjacent in
# shards written by FeatureShardWriter; foreign tars may scatter them).
_SPAN_SLACK = 64 * 1024


class BadSampleError(Exception):
    """A sample that cannot be used; ``reason`` is one of ``BAD_REASONS``."""

    def __init__(self, reason: str, key: str, shard: str, detail: str) -> None:
        super().__init__(f"sample {key!r} in {shard}: {reason}: {detail}")
        self.reason, self.key, self.shard, self.detail = reason, key, shard, detail


class BadDataError(RuntimeError):
    """Too many bad samples in one shard (``data.max_bad_fraction`` exceeded)."""


_NPY_MAGIC = b"\x93NUMPY"
# Parsed .npy headers by their bytes: numpy parses each header with ast.literal_eval (~100 us),
# while the samples of a dataset share a handful of distinct headers.
_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
_HEADER_CACHE_MAX = 4096


def _parse_npy(raw: bytes | memoryview) -> np.ndarray:
    """Decode an ``.npy`` member (read-only view of ``raw``); raises ValueError if damaged."""
    if bytes(raw[:6]) != _NPY_MAGIC or len(raw) < 10:
        raise ValueError(f"not an .npy file (starts with {bytes(raw[:8])!r})")
    major = raw[6]
    if major == 1:
        start, hlen = 10, int.from_bytes(raw[8:10], "little")
    elif major == 2:
        start, hlen = 12, int.from_bytes(raw[8:12], "little")
    else:  # rare 3.0 (utf-8 field names): numpy's own reader
        return np.lib.format.read_array(io.BytesIO(bytes(raw)), allow_pickle=False)
    header = bytes(raw[start : start + hlen])
    parsed = _HEADER_CACHE.get(header)
    if parsed is None:
        f = io.BytesIO(bytes(raw[: start + hlen]))
        np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        parsed = (dtype, tuple(shape), fortran)
        if len(_HEADER_CACHE) < _HEADER_CACHE_MAX:
            _HEADER_CACHE[header] = parsed
    dtype, shape, fortran = parsed
    count = int(np.prod(shape, dtype=np.int64))
    data = memoryview(raw)[start + hlen :]
    if len(data) != count * dtype.itemsize:
        raise ValueError(
            f"data is {len(data)} bytes, header {dtype}{list(shape)} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count).reshape(
        shape, order="F" if fortran else "C"
    )


def _load_npy(raw: bytes, what: str, fail: Any) -> np.ndarray:
    try:
        return _parse_npy(raw)
    except Exception as e:  # any parse failure of a damaged member
        raise fail("undecodable", f"{what}: {type(e).__name__}: {e}") from None


def _shape_table(shapes: list[list[int] | None], min_width: int) -> np.ndarray:
    """Shapes as an int32 table [N, width], -1 padded; an all -1 row means unknown."""
    width = max([min_width] + [len(x) for x in shapes if x is not None])
    table = np.full((len(shapes), width), -1, dtype=np.int32)
    for i, x in enumerate(shapes):
        if x is not None:
            table[i, : len(x)] = x
    return table


def _recorded_shape(table: np.ndarray, index: int) -> tuple[int, ...] | None:
    shape = tuple(v for v in table[index].tolist() if v >= 0)
    return shape or None


class FeatureDataset(ShardFiles):
    """Precomputed latents + condition features, random access by global sample index.

    Global indices run shard-major in ``index.json`` order. ``bad_counts`` maps each reason in
    ``BAD_REASONS`` to the number of distinct bad samples found so far (each logged once per
    reason); a shard whose bad samples exceed ``cfg.max_bad_fraction`` of its size raises
    ``BadDataError`` naming it. Thread-safe: prefetch threads call ``get`` concurrently (shard
    files are cached per thread by ``ShardFiles``, shared with ``MediaDataset``; ``close`` closes
    them; the dataset pickles for worker processes without its open files).
    """

    def __init__(self, cfg: DataConfig) -> None:
        if cfg.kind != "features":
            raise ValueError(f"data.kind={cfg.kind!r}: FeatureDataset reads kind='features'")
        self.cfg = cfg
        self.root = os.path.abspath(cfg.path)
        index = DatasetIndex.load(self.root)
        shards = index.shards
        # Dataset-wide facts; the per-sample lists of the parsed index are not kept.
        self.latent_channels = index.latent_channels
        self.latent_rank = index.latent_rank
        self.cond_dim = index.cond_dim
        self.storage_dtype = index.storage_dtype
        self.extra = index.extra
        self.shard_paths = [os.path.join(self.root, s.name) for s in shards]
        self.shard_sizes = np.asarray([s.num_samples for s in shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)
        file_sizes = self._stat_shards(
            lambda path: FileNotFoundError(
                f"data.path={cfg.path}: shard {path} listed in index.json is missing"
            )
        )
        for s, path, size in zip(shards, self.shard_paths, file_sizes):
            if size > s.size_bytes:
                raise ValueError(
                    f"data.path={cfg.path}: shard {path} is {size} bytes but index.json records "
                    f"{s.size_bytes}; the shard was rewritten after indexing; re-run build_index"
                )
            if size < s.size_bytes:
                logger.warning(
                    "shard %s is %d bytes, index.json records %d: truncated; samples past the "
                    "end will be skipped as bad",
                    path,
                    size,
                    s.size_bytes,
                )
        self._shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), self.shard_sizes)
        self._offsets = np.concatenate([s.offsets for s in shards])  # [N, M]
        self._sizes = np.concatenate([s.sizes for s in shards])  # [N, M]
        # Compact per-sample tables (numpy, not Python objects): every DP rank holds the whole
        # index, so millions of samples must cost tens of bytes each.
        self._keys = np.asarray([k.encode() for s in shards for k in s.keys], dtype=np.bytes_)
        self._latent_shapes = _shape_table([x for s in shards for x in s.latent_shapes], 4)
        self._cond_shapes = _shape_table([x for s in shards for x in s.cond_shapes], 2)
        self.bad_counts: dict[str, int] = dict.fromkeys(BAD_REASONS, 0)
        self._bad: dict[int, str] = {}
        self._bad_per_shard: dict[int, collections.Counter] = collections.defaultdict(
            collections.Counter
        )
        self._logged: set[str] = set()
        self.required_latent_shape: tuple[int, ...] | None = None  # see require_latent_shape
        self._init_runtime()

    # ---- metadata ----
    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> str:
        return self._keys[index].decode()

    def shard_path(self, index: int) -> str:
        return self.shard_paths[int(self._shard_of[index])]

    def latent_shape(self, index: int) -> tuple[int, ...] | None:
        """Latent shape recorded in the index (no file access); None if unknown."""
        return _recorded_shape(self._latent_shapes, index)

    def token_counts(self, patch_size: int) -> np.ndarray:
        """Model tokens ``frames * (H/p) * (W/p)`` of every sample, from the index (no file
        access), so a packer can plan whole windows cheaply. ``[N]`` int64; ``-1`` where the
        index records no usable shape, ``-2`` where ``H`` or ``W`` is not a multiple of ``p``."""
        if patch_size < 1:
            raise ValueError(f"patch_size={patch_size}: must be >= 1")
        t = self._latent_shapes.astype(np.int64)  # [N, width], -1 padded
        ndim = (t >= 0).sum(1)  # [N]
        video = ndim == 4
        frames = np.where(video, t[:, 1], 1)
        h = np.where(video, t[:, 2], t[:, 1])
        w = np.where(video, t[:, 3], t[:, 2])
        out = frames * (h // patch_size) * (w // patch_size)
        out = np.where((h % patch_size) | (w % patch_size), -2, out)
        return np.where((ndim == 3) | video, out, -1)

    def reject(self, index: int, reason: str, detail: str) -> None:
        """Count sample ``index`` as bad for ``reason`` (one of ``BAD_REASONS``) without reading
        it, e.g. a latent the model cannot patchify; raises ``BadDataError`` past
        ``max_bad_fraction`` like a read failure."""
        if reason not in BAD_REASONS:
            raise ValueError(f"reason={reason!r}: choose one of {BAD_REASONS}")
        index = int(index)
        self._record_bad(
            index, BadSampleError(reason, self.key(index), self.shard_path(index), detail)
        )

    def require_latent_shape(self, shape: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
        """Unpacked micro-batches stack latents, so one shape must hold for the whole run: make
        every sample of another shape a counted ``bad_shape`` sample (the sampler replaces it)
        rather than a crash when its micro-batch is collated.

        ``shape`` None: the most common shape recorded in index.json. Samples recording another
        shape are rejected now (no read), unrecorded ones when read. Returns the shape (None
        when nothing is recorded and none was given). A dataset of several shapes in more than
        ``data.max_bad_fraction`` of its samples is refused: it needs ``data.pack=true``.
        """
        table = self._latent_shapes.astype(np.int64)  # [N, 4], -1 padded
        known = (table >= 0).any(1)  # [N]
        if shape is None:
            if not known.any():
                return None
            rows, counts = np.unique(table[known], axis=0, return_counts=True)
            shape = tuple(int(v) for v in rows[counts.argmax()] if v >= 0)
        shape = tuple(int(v) for v in shape)
        want = np.full(table.shape[1], -1, dtype=np.int64)
        want[: len(shape)] = shape
        other = np.flatnonzero(known & (table != want).any(1))  # [n_other]
        if len(other) > self.cfg.max_bad_fraction * len(self):
            found = collections.Counter(
                tuple(int(v) for v in table[i] if v >= 0) for i in np.flatnonzero(known)
            )
            raise ValueError(
                f"data.path={self.cfg.path}: latents of several shapes {dict(found.most_common(8))}; "
                f"unpacked micro-batches need one shape ({shape} here). Set data.pack=true "
                "(with data.pack_capacity) to train on mixed sizes, or write one dataset per size"
            )
        self.required_latent_shape = shape
        for i in other.tolist():
            self.reject(
                i, "bad_shape", f"latent shape {_recorded_shape(self._latent_shapes, i)}; the run "
                f"trains unpacked micro-batches of {shape}"
            )  # fmt: skip
        if len(other):
            logger.warning(
                "data.path=%s: %d samples of a latent shape other than %s skipped as bad_shape "
                "(unpacked micro-batches need one shape; data.pack=true trains mixed sizes)",
                self.cfg.path,
                len(other),
                shape,
            )
        return shape

    def is_known_bad(self, index: int) -> bool:
        return int(index) in self._bad

    @property
    def num_bad(self) -> int:
        return len(self._bad)

    # ---- reading ----
    def _read_members(self, index: int, fail: Any) -> dict[str, memoryview]:
        shard = int(self._shard_of[index])
        offs, sizes = self._offsets[index].tolist(), self._sizes[index].tolist()
        for name in (LATENT, COND):
            if offs[MEMBER_COLUMN[name]] < 0:
                raise fail("missing_member", f"no {name} in the shard")
        return self._pread_members(shard, offs, sizes, MEMBER_COLUMN, fail, _SPAN_SLACK)

    def _decode(self, index: int) -> dict[str, Any]:
        key = self.key(index)
        shard_path = self.shard_path(index)

        def fail(reason: str, detail: str) -> BadSampleError:
            return BadSampleError(reason, key, shard_path, detail)

        raw = self._read_members(index, fail)
        latent = _load_npy(raw[LATENT], LATENT, fail)
        cond = _load_npy(raw[COND], COND, fail)
        for name, arr in ((LATENT, latent), (COND, cond)):
            if arr.dtype.kind not in "fiu":
                raise fail("undecodable", f"{name}: non-numeric dtype {arr.dtype}")
        rank, channels, dim = self.latent_rank, self.latent_channels, self.cond_dim
        if latent.ndim not in (3, 4) or (rank and latent.ndim != rank):
            raise fail(
                "bad_shape", f"latent shape {latent.shape}; dataset latents have rank {rank}"
            )
        if channels and latent.shape[0] != channels:
            raise fail("bad_shape", f"latent shape {latent.shape}; dataset has {channels} channels")
        if cond.ndim != 2 or cond.shape[0] < 1 or (dim and cond.shape[1] != dim):
            raise fail("bad_shape", f"cond shape {cond.shape}; expected [Lc>=1, {dim}]")
        need = self.required_latent_shape
        if need is not None and latent.shape != need:
            raise fail("bad_shape", f"latent shape {latent.shape}; the run trains unpacked {need}")
        for name, arr, rec in (
            (LATENT, latent, _recorded_shape(self._latent_shapes, index)),
            (COND, cond, _recorded_shape(self._cond_shapes, index)),
        ):
            if rec is not None and arr.shape != rec:
                raise fail(
                    "bad_shape", f"{name} shape {arr.shape} but index.json records {tuple(rec)}"
                )
        if COND_MASK in raw:
            mask = _load_npy(raw[COND_MASK], COND_MASK, fail)
            if mask.shape != (cond.shape[0],):
                raise fail(
                    "bad_shape", f"cond_mask shape {mask.shape}; cond has {cond.shape[0]} tokens"
                )
            if mask.dtype != np.bool_:
                if mask.dtype.kind not in "iu" or not np.isin(mask, (0, 1)).all():
                    raise fail("undecodable", f"cond_mask dtype {mask.dtype} is not boolean")
                mask = mask.astype(np.bool_)
            if not mask.any():
                raise fail("bad_shape", "cond_mask marks no real token")
        else:
            mask = np.ones(cond.shape[0], dtype=np.bool_)
        latent32 = np.array(latent, dtype=np.float32)  # copy: the parsed view is read-only
        cond32 = np.array(cond, dtype=np.float32)
        if self.cfg.check_finite:
            for name, arr in ((LATENT, latent32), (COND, cond32)):
                # One reduction; a non-finite sum is confirmed element-wise (float32 overflow).
                if not np.isfinite(arr.sum()) and not np.isfinite(arr).all():
                    raise fail("non_finite", f"{name} contains NaN/inf")
        meta: dict[str, Any] = {}
        if META in raw:
            try:
                meta = json.loads(bytes(raw[META]))
            except Exception as e:
                raise fail("undecodable", f"{META}: {type(e).__name__}: {e}") from None
            if not isinstance(meta, dict):
                raise fail("undecodable", f"{META} is not a JSON object")
        return {
            "latent": torch.from_numpy(latent32),  # [C, (T,) H, W]
            "cond": torch.from_numpy(cond32),  # [Lc, Dc]
            "cond_mask": torch.from_numpy(np.array(mask, dtype=np.bool_)),  # [Lc]
            "index": index,
            "key": key,
            "meta": meta,
        }

    def _record_bad(self, index: int, err: BadSampleError) -> None:
        shard = int(self._shard_of[index])
        with self._lock:
            new = index not in self._bad
            if new:
                self._bad[index] = err.reason
                self.bad_counts[err.reason] += 1
                self._bad_per_shard[shard][err.reason] += 1
            first_of_reason = err.reason not in self._logged
            self._logged.add(err.reason)
            n_bad = sum(self._bad_per_shard[shard].values())
            reasons = dict(self._bad_per_shard[shard])
        if new and first_of_reason:
            logger.warning(
                "skipping bad sample (further '%s' samples are counted silently): %s",
                err.reason,
                err,
            )
        n = int(self.shard_sizes[shard])
        if n_bad > self.cfg.max_bad_fraction * n:
            raise BadDataError(
                f"data.max_bad_fraction={self.cfg.max_bad_fraction} exceeded in shard "
                f"{self.shard_paths[shard]}: {n_bad} of {n} samples bad {reasons}; latest: {err}. "
                "Re-create the shard or raise data.max_bad_fraction"
            )

    def get(self, index: int) -> dict[str, Any]:
        """Sample ``index``: ``latent`` [C, (T,) H, W] f32, ``cond`` [Lc, Dc] f32, ``cond_mask`` [Lc]
        bool, ``index`` int, ``key`` str, ``meta`` dict. Raises ``BadSampleError`` (after
        counting it) for a damaged sample, ``BadDataError`` past ``max_bad_fraction``."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        reason = self._bad.get(index)
        if reason is not None:
            raise BadSampleError(reason, self.key(index), self.shard_path(index), "known bad")
        try:
            return self._decode(index)
        except BadSampleError as err:
            self._record_bad(index, err)
            raise

    def get_or_none(self, index: int) -> dict[str, Any] | None:
        """Like ``get`` but returns None for a bad sample (still raises ``BadDataError``)."""
        try:
            return self.get(index)
        except BadSampleError:
            return None

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_features(samples, cond_pad_to=self.cfg.cond_pad_to)

    def iterator(self, **kwargs: Any) -> MicroBatchIterator:
        """``MicroBatchIterator(self, **kwargs)``."""
        return MicroBatchIterator(self, **kwargs)


def collate_features(
    samples: list[dict[str, Any]], *, cond_pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack samples; condition tokens are right-padded (mask False) to the longest or ``cond_pad_to``.

    Latent shapes must agree (no resolution bucketing yet): a mismatch raises naming the sample.
    """
    if not samples:
        raise ValueError("collate_features: empty micro-batch")
    ref = samples[0]
    for s in samples[1:]:
        if s["latent"].shape != ref["latent"].shape:
            raise ValueError(
                f"sample {s.get('key')!r} has latent shape {tuple(s['latent'].shape)} but sample "
                f"{ref.get('key')!r} in the same micro-batch has {tuple(ref['latent'].shape)}; all "
                "samples of a batch must share one latent shape (resolution bucketing is not enabled)"
            )
        if s["cond"].shape[1] != ref["cond"].shape[1]:
            raise ValueError(
                f"sample {s.get('key')!r} has cond dim {s['cond'].shape[1]} but sample "
                f"{ref.get('key')!r} has {ref['cond'].shape[1]}"
            )
    lengths = [s["cond"].shape[0] for s in samples]
    length = max(lengths) if cond_pad_to is None else cond_pad_to
    for s, n in zip(samples, lengths):
        if n > length:
            raise ValueError(
                f"sample {s.get('key')!r} has {n} condition tokens > data.cond_pad_to={cond_pad_to}"
            )
    b, dc = len(samples), ref["cond"].shape[1]
    cond = torch.zeros(b, length, dc, dtype=torch.float32)  # [b, Lc, Dc]
    mask = torch.zeros(b, length, dtype=torch.bool)  # [b, Lc]
    for i, (s, n) in enumerate(zip(samples, lengths)):
        cond[i, :n] = s["cond"]
        mask[i, :n] = s["cond_mask"]
    return {
        "latent": torch.stack([s["latent"] for s in samples]),  # [b, C, (T,) H, W]
        "cond": cond,
        "cond_mask": mask,
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),  # [b]
    }

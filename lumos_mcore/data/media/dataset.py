"""Raw-media ``SampleSource``: encoded images/videos in, bucketed pixel micro-batches out.

``MediaDataset`` plugs into ``MicroBatchIterator`` like ``FeatureDataset`` does, so distributed
reading (each DP rank takes its own slice of every global batch) and exact resume from
``consumed_samples`` at any DP size come with it. Reading is two-phase: ``get_or_none`` reads a
sample's bytes and metadata with one ``pread`` and plans its geometry (bucket, crop, frames);
``collate`` decodes the whole micro-batch at once (DALI runs batches), then stacks it.

Sample order with several buckets: the sampler's "shards" are same-bucket chunks of
``media.bucket_chunk`` samples (each bucket padded to a whole number of chunks by repeating its
first samples), shuffled one chunk at a time; every micro-batch then lies inside one chunk (the
micro-batch size divides the chunk), so it has one shape. With one bucket the chunks are the
physical shards and nothing is repeated.

Bad input: samples whose index facts already rule them out (no media member, zero-length,
member past the end of a truncated shard, unreadable when indexed, too small for the bucket,
too short for the clip) are dropped when the dataset opens; a sample that fails later (truncated
or corrupt stream, unreadable metadata, missing caption when captions are needed) is replaced by
the next good sample of its chunk, so replacements keep the micro-batch's shape and depend only
on the data. Every bad sample is counted once per reason in ``bad_counts`` and the first of each
reason is logged; a shard whose bad samples exceed ``media.max_bad_fraction`` raises
``BadDataError``.

Held-out tail (``validation.holdout=H``): the last ``H`` *usable* samples in index order (of
``media.modality``, not ruled out by the index facts) are taken out before the virtual layout is
built, so no chunk, bucket padding or bad-sample replacement of training can reach them,
whatever bucket they fall in. ``holdout_view()`` gives them to the validator
(:class:`MediaHoldout`).

Packing (``media.pack``): every sample's model token count follows from its bucket alone
(:class:`MediaSizes`), so ``PackedMicroBatchIterator`` plans whole windows before anything is
decoded; ``collate_pack`` decodes a pack whose samples have several buckets, each sample at its
own bucket. A bad sample is replaced inside its chunk, i.e. by a sample of the same bucket, so the
plan's token counts stay true.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any

import numpy as np
import torch

from lumos_mcore.config.media import MediaDataConfig
from lumos_mcore.data.features import BadDataError, BadSampleError
from lumos_mcore.data.media.buckets import Bucket, BucketSpec, clip_span, clip_start, crop_roi
from lumos_mcore.data.media.decode import DecodeError, DecodeRequest, MediaDecoder
from lumos_mcore.data.media.shards import CAPTION, MEDIA, MEMBER_COLUMN, META, MediaIndex
from lumos_mcore.data.sampler import MicroBatchIterator
from lumos_mcore.data.shard_files import ShardFiles

logger = logging.getLogger(__name__)

__all__ = [
    "MEDIA_BAD_REASONS",
    "BadDataError",
    "BadSampleError",
    "MediaDataset",
    "MediaHoldout",
    "MediaSizes",
]

# Why a media sample can be unusable; the keys of MediaDataset.bad_counts.
MEDIA_BAD_REASONS = (
    "missing_member",
    "empty",
    "truncated",
    "undecodable",
    "too_short",
    "too_small",
    "bad_meta",
)
_FACT_REASONS = {1: "too_small", 2: "too_short", 3: "undecodable"}


class MediaDataset(ShardFiles):
    """Random access to planned samples by (virtual) index; ``collate`` decodes micro-batches.

    Attributes the trainer uses: ``shard_sizes`` (the sampler's units), ``bad_counts`` /
    ``num_bad`` (per rank, for logging), ``decoder.routes`` (samples per kind/codec/decoder).
    Shard files are cached per thread by ``ShardFiles`` (shared with ``FeatureDataset``).

    ``holdout`` (``validation.holdout``): leave the last ``holdout`` usable samples (index order)
    out of the virtual layout; ``len`` and ``shard_sizes`` then cover the training samples only
    (one bucket: the epoch is exactly ``holdout`` shorter; several: each bucket's last chunk is
    padded from its own training samples) and ``holdout_view()`` reads the held-out ones.
    Raises ``ValueError`` naming the flag when nothing would be left to train on.
    """

    def __init__(
        self, cfg: MediaDataConfig, *, decoder: MediaDecoder | None = None, holdout: int = 0
    ) -> None:
        self.cfg = cfg
        self.holdout = int(holdout)
        self.root = os.path.abspath(cfg.path)
        index = MediaIndex.load(self.root)
        shards = index.shards
        self.extra = index.extra
        self.shard_paths = [os.path.join(self.root, s.name) for s in shards]
        phys_sizes = np.asarray([s.num_samples for s in shards], dtype=np.int64)
        self._phys_shard = np.repeat(np.arange(len(shards), dtype=np.int32), phys_sizes)
        self._phys_shard_sizes = phys_sizes
        self._keys = np.asarray([k.encode() for s in shards for k in s.keys], dtype=np.bytes_)
        self._offsets = np.concatenate([s.offsets for s in shards])  # [P, M]
        self._sizes = np.concatenate([s.sizes for s in shards])  # [P, M]
        kinds = np.asarray([k for s in shards for k in s.kinds])
        self._width = np.concatenate([s.widths for s in shards])
        self._height = np.concatenate([s.heights for s in shards])
        self._frames = np.concatenate([s.num_frames for s in shards])
        self._codec = [c for s in shards for c in s.codecs]
        video = cfg.modality == "video"
        self.spec = BucketSpec(
            cfg.buckets,
            frames=list(cfg.num_frames) if video else None,
            stride=cfg.frame_stride,
            max_upscale=cfg.max_upscale,
        )
        self.buckets: list[Bucket] = self.spec.buckets
        self.need_caption = cfg.encoders.cond == "t5"
        self.decoder = decoder or MediaDecoder(
            backend=cfg.decoder,
            dali_device=cfg.dali_device,
            dali_threads=cfg.dali_threads,
            color_matrix=cfg.color_matrix,
        )

        self.bad_counts: dict[str, int] = dict.fromkeys(MEDIA_BAD_REASONS, 0)
        self._bad: dict[int, str] = {}
        self._bad_per_shard: dict[int, collections.Counter] = collections.defaultdict(
            collections.Counter
        )
        self._logged: set[str] = set()
        self._init_runtime()

        # ---- facts -> bucket or reason, decided once for the whole index ----
        other = (kinds != cfg.modality) & (kinds != "")
        self.num_other_modality = int(other.sum())
        self._bucket, fact_reason = self.spec.assign(self._width, self._height, self._frames)
        media_col = MEMBER_COLUMN[MEDIA]
        file_sizes = np.asarray(
            self._stat_shards(
                lambda path: FileNotFoundError(
                    f"media shard {path} listed in index.json is missing"
                )
            ),
            dtype=np.int64,
        )
        ends = self._offsets + np.maximum(self._sizes, 0)  # [P, M]
        past_end = ((self._offsets >= 0) & (ends > file_sizes[self._phys_shard][:, None])).any(1)
        early: list[tuple[np.ndarray, str]] = [
            (self._offsets[:, media_col] < 0, "missing_member"),
            (self._sizes[:, media_col] == 0, "empty"),
            (past_end, "truncated"),
        ]
        # Facts unknown: the reason probing failed when the index was built, else undecodable.
        errors = np.asarray([e for s in shards for e in s.errors])
        unknown = fact_reason == 3
        for reason in ("truncated", "empty"):
            early.append((unknown & (errors == reason), reason))
        early += [(fact_reason == code, reason) for code, reason in _FACT_REASONS.items()]
        decided = other.copy()
        for mask, reason in early:
            for p in np.flatnonzero(mask & ~decided):
                self._mark_bad(int(p), reason, "from the index facts", check=False)
            decided |= mask
        usable = ~decided
        if self.num_other_modality:
            logger.info(
                "media dataset %s: %d samples are not %ss (media.modality) and are not used",
                self.root,
                self.num_other_modality,
                cfg.modality,
            )
        if self.num_bad:
            logger.warning(
                "media dataset %s: %d of %d samples unusable %s",
                self.root,
                self.num_bad,
                len(self._keys),
                {k: v for k, v in self.bad_counts.items() if v},
            )
        for shard in sorted(self._bad_per_shard):
            self._check_shard(shard, None)
        if not usable.any():
            raise BadDataError(
                f"media.path={cfg.path}: no usable {cfg.modality} samples "
                f"({self.num_other_modality} of another modality; bad: "
                f"{ {k: v for k, v in self.bad_counts.items() if v} })"
            )

        # ---- held-out tail: out of the layout before any chunk or padding is built ----
        if self.holdout < 0:
            raise ValueError(f"validation.holdout={self.holdout}: must be >= 0 (0 = none)")
        usable_ids = np.flatnonzero(usable)
        if self.holdout >= len(usable_ids):
            raise ValueError(
                f"validation.holdout={self.holdout}: media.path={cfg.path} has only "
                f"{len(usable_ids)} usable {cfg.modality} samples; the holdout must leave at "
                "least one for training (lower validation.holdout or give a separate "
                "validation.path)"
            )
        self._held_out = usable_ids[len(usable_ids) - self.holdout :].astype(np.int64)
        usable = usable.copy()
        usable[self._held_out] = False

        # ---- virtual layout: the sampler's units ----
        if len(self.buckets) == 1:
            ids = np.flatnonzero(usable)
            unit_sizes = np.bincount(self._phys_shard[ids], minlength=len(shards))
            unit_sizes = unit_sizes[unit_sizes > 0]
        else:
            parts, unit_list = [], []
            chunk = cfg.bucket_chunk
            for b in range(len(self.buckets)):
                members = np.flatnonzero(usable & (self._bucket == b))
                if len(members) == 0:
                    continue
                n = -(-len(members) // chunk) * chunk
                parts.append(np.resize(members, n))  # repeats the bucket's first samples
                unit_list += [chunk] * (n // chunk)
            ids = np.concatenate(parts)
            unit_sizes = np.asarray(unit_list)
            self.num_repeated = int(len(ids) - usable.sum())
            if self.num_repeated:
                logger.info(
                    "media dataset: %d buckets in chunks of %d; %d samples repeated to fill "
                    "the last chunk of each bucket",
                    len(self.buckets),
                    chunk,
                    self.num_repeated,
                )
        self._virt = ids.astype(np.int64)  # virtual index -> physical sample
        self.shard_sizes = unit_sizes.astype(np.int64)
        self._unit_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])

    # ---- bookkeeping ----
    def __len__(self) -> int:
        return len(self._virt)

    @property
    def num_bad(self) -> int:
        return len(self._bad)

    @property
    def num_physical(self) -> int:
        """Samples in the index (all modalities, good and bad)."""
        return len(self._keys)

    def units(self) -> list[tuple[int, int]]:
        """``[start, end)`` index ranges of the sampler's units (one bucket each)."""
        starts = self._unit_starts.tolist()
        return list(zip(starts[:-1], starts[1:]))

    def key(self, index: int) -> str:
        return self._keys[self._virt[index]].decode()

    def physical_index(self, index: int) -> int:
        """Position in ``media.path``'s index of (virtual) sample ``index``."""
        return int(self._virt[index])

    def holdout_view(self) -> MediaHoldout:
        """The held-out samples (``holdout`` > 0), read through this dataset's decoder and bad
        bookkeeping."""
        if not self.holdout:
            raise ValueError("holdout_view: the dataset was opened without a holdout")
        return MediaHoldout(self, self._held_out)

    def bucket_of(self, index: int) -> Bucket:
        return self.buckets[int(self._bucket[self._virt[index]])]

    def _mark_bad(self, phys: int, reason: str, detail: str, *, check: bool = True) -> None:
        shard = int(self._phys_shard[phys])
        with self._lock:
            new = phys not in self._bad
            if new:
                self._bad[phys] = reason
                self.bad_counts[reason] += 1
                self._bad_per_shard[shard][reason] += 1
            first = reason not in self._logged
            self._logged.add(reason)
        if new and first:
            logger.warning(
                "skipping bad sample (further '%s' samples are counted silently): sample %r in "
                "%s: %s: %s",
                reason,
                self._keys[phys].decode(),
                self.shard_paths[shard],
                reason,
                detail,
            )
        if check:
            self._check_shard(shard, f"{reason}: {detail}")

    def _check_shard(self, shard: int, latest: str | None) -> None:
        with self._lock:
            reasons = dict(self._bad_per_shard[shard])
        n_bad, n = sum(reasons.values()), int(self._phys_shard_sizes[shard])
        if n_bad > self.cfg.max_bad_fraction * n:
            tail = f"; latest: {latest}" if latest else ""
            raise BadDataError(
                f"media.max_bad_fraction={self.cfg.max_bad_fraction} exceeded in shard "
                f"{self.shard_paths[shard]}: {n_bad} of {n} samples bad {reasons}{tail}. "
                "Re-create the shard or raise media.max_bad_fraction"
            )

    # ---- planning (cheap: one pread, no decoding) ----
    def _read(self, phys: int) -> dict[str, memoryview]:
        shard = int(self._phys_shard[phys])

        def fail(reason: str, detail: str) -> BadSampleError:
            return BadSampleError(
                reason, self._keys[phys].decode(), self.shard_paths[shard], detail
            )

        offs, sizes = self._offsets[phys].tolist(), self._sizes[phys].tolist()
        return self._pread_members(shard, offs, sizes, MEMBER_COLUMN, fail)  # always one pread

    def plan(self, index: int, bucket: Bucket | None = None) -> dict[str, Any]:
        """Read sample ``index`` and fix its geometry; raises ``BadSampleError`` (not counted)."""
        return self._plan_physical(int(self._virt[index]), index, bucket)

    def _plan_physical(self, phys: int, index: int, bucket: Bucket | None) -> dict[str, Any]:
        """Plan of physical sample ``phys``; ``index`` is what the batch reports (and seeds
        the clip start)."""
        key = self._keys[phys].decode()
        shard_path = self.shard_paths[int(self._phys_shard[phys])]
        known = self._bad.get(phys)
        if known is not None:
            raise BadSampleError(known, key, shard_path, "known bad")
        raw = self._read(phys)
        meta: dict[str, Any] = {}
        if META in raw:
            try:
                meta = json.loads(bytes(raw[META]))
            except Exception as e:
                raise BadSampleError(
                    "bad_meta", key, shard_path, f"json: {type(e).__name__}: {e}"
                ) from None
            if not isinstance(meta, dict):
                raise BadSampleError("bad_meta", key, shard_path, "json is not an object")
        caption = meta.get("caption")
        if CAPTION in raw:
            caption = bytes(raw[CAPTION]).decode("utf-8", errors="replace").strip()
        if self.need_caption and not caption:
            raise BadSampleError(
                "missing_member", key, shard_path, "no caption (txt member or json 'caption')"
            )
        camera = meta.get("camera")
        if camera is not None:
            try:
                camera = np.asarray(camera, dtype=np.float32).reshape(-1)
            except (TypeError, ValueError):
                raise BadSampleError("bad_meta", key, shard_path, "camera is not numeric") from None
        if bucket is None:
            bucket = self.buckets[int(self._bucket[phys])]
        h, w = int(self._height[phys]), int(self._width[phys])
        start, span = 0, 1
        if self.cfg.modality == "video":
            span = clip_span(bucket.frames, self.cfg.frame_stride)
            if span > int(self._frames[phys]):
                raise BadSampleError(
                    "too_short", key, shard_path, f"{self._frames[phys]} frames < {span}"
                )
            start = clip_start(int(self._frames[phys]), span, seed=self.cfg.seed, index=index)
        request = DecodeRequest(
            data=raw[MEDIA],
            kind=self.cfg.modality,
            codec=self._codec[phys],
            source_hw=(h, w),
            roi=crop_roi(h, w, bucket),
            size=(bucket.height, bucket.width),
            start=start,
            count=bucket.frames if self.cfg.modality == "video" else 1,
            stride=self.cfg.frame_stride,
        )
        return {
            "index": index,
            "key": key,
            "request": request,
            "bucket": bucket,
            "caption": caption or "",
            "camera": camera,
            "resolution": (h, w),
            "meta": meta,
        }

    def _candidates(self, index: int):
        """``index``, then the other samples of its chunk in a fixed order (wrapping)."""
        unit = int(np.searchsorted(self._unit_starts, index, side="right")) - 1
        lo, hi = int(self._unit_starts[unit]), int(self._unit_starts[unit + 1])
        yield index
        yield from range(index + 1, hi)
        yield from range(lo, index)

    def _plan_first_good(
        self, index: int, *, skip_first: bool = False, bucket: Bucket | None = None
    ):
        for i, cand in enumerate(self._candidates(index)):
            if skip_first and i == 0:
                continue
            try:
                return self.plan(cand, bucket)
            except BadSampleError as err:
                self._mark_bad(int(self._virt[cand]), err.reason, err.detail)
        return None

    def get_or_none(self, index: int) -> dict[str, Any] | None:
        """Plan of sample ``index`` or, if it is bad, of the next good sample of its chunk; None
        only when the whole chunk is bad. Raises ``BadDataError`` past the threshold."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range [0, {len(self)})")
        return self._plan_first_good(index)

    # ---- decoding ----
    def _decode_one(self, plan: dict[str, Any]) -> torch.Tensor | DecodeError:
        return self.decoder.decode([plan["request"]])[0]

    def collate(self, plans: list[dict[str, Any]]) -> dict[str, Any]:
        """Decode a micro-batch of plans: ``pixels`` [B, 3, (T,) H, W] in [-1, 1], ``caption``
        list[str], ``camera_pose`` [B, K] (when every sample has one), ``resolution`` [B, 2] (source
        H, W), ``aspect_ratio`` [B, 1] (bucket H / W), ``index`` [B], ``key`` list[str]."""
        if not plans:
            raise ValueError("MediaDataset.collate: empty micro-batch")
        # One chunk -> one bucket; a micro-batch the sampler had to extend past a wholly bad
        # chunk is brought to its most common bucket (ties: the earliest sample's).
        counts = collections.Counter(p["bucket"] for p in plans)
        first = {}
        for i, p in enumerate(plans):
            first.setdefault(p["bucket"], i)
        target = max(counts, key=lambda b: (counts[b], -first[b]))
        plans = [p if p["bucket"] == target else self._refit(p, target) for p in plans]
        pixels, final = self._decode_replacing(plans, target)
        return _stack(final, pixels, target)

    def _decode_replacing(
        self, plans: list[dict[str, Any]], bucket: Bucket
    ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """Decode same-bucket ``plans`` in one decoder call; a sample that fails is counted and
        replaced by the next good sample of its chunk in ``bucket`` (the shape stays), so the
        result has one ``[3, (T,) H, W]`` tensor and its final plan per input plan."""
        outs = self.decoder.decode([p["request"] for p in plans])
        pixels: list[torch.Tensor] = []
        final: list[dict[str, Any]] = []
        for plan, out in zip(plans, outs):
            while isinstance(out, DecodeError):
                self._mark_bad(int(self._virt[plan["index"]]), out.reason, out.detail)
                nxt = self._plan_first_good(plan["index"], skip_first=True, bucket=bucket)
                if nxt is None:
                    raise BadDataError(
                        f"every sample of the chunk holding sample {plan['key']!r} is bad; "
                        f"bad so far: { {k: v for k, v in self.bad_counts.items() if v} }"
                    )
                plan, out = nxt, self._decode_one(nxt)
            pixels.append(out)
            final.append(plan)
        return pixels, final

    def _refit(self, plan: dict[str, Any], bucket: Bucket) -> dict[str, Any]:
        """Re-plan a sample for another bucket (only when a micro-batch had to leave its chunk)."""
        try:
            return self.plan(plan["index"], bucket)
        except BadSampleError as err:
            raise BadDataError(
                f"sample {plan['key']!r} cannot fill bucket {bucket} of its micro-batch ({err}); "
                "this happens only when a whole chunk of media.bucket_chunk samples is bad"
            ) from None

    def collate_pack(self, plans: list[dict[str, Any]], positions: list[int]) -> dict[str, Any]:
        """Decode one pack of plans of possibly different buckets (``media.pack``).

        Returns ``pixels`` (list of ``[3, (T,) H, W]`` in [-1, 1], each at its own bucket),
        ``caption``, ``key`` (lists), ``resolution`` ``[n, 2]``, ``aspect_ratio`` ``[n, 1]``
        (each sample's bucket H / W), ``index`` and ``position`` ``[n]``, ``camera_pose``
        ``[n, K]`` when every sample has one; ``FrozenEncoders.encode_pack`` turns it into
        ``prepare_packed``'s format. A sample that fails to decode is replaced by the next
        good sample of its chunk *for its own bucket*, so the pack's token count is the
        planned one.
        """
        if not plans or len(plans) != len(positions):
            raise ValueError(f"collate_pack: {len(plans)} samples for {len(positions)} positions")
        final: list[dict[str, Any]] = list(plans)
        pixels: list[torch.Tensor | None] = [None] * len(plans)
        groups: dict[Bucket, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(plans):
            groups[p["bucket"]].append(i)
        for bucket, members in groups.items():  # one decoder call per bucket
            outs, kept = self._decode_replacing([plans[i] for i in members], bucket)
            for i, out, plan in zip(members, outs, kept):
                pixels[i], final[i] = out, plan
        batch: dict[str, Any] = {
            "pixels": pixels,  # n x [3, (T,) H, W]
            "caption": [p["caption"] for p in final],
            "key": [p["key"] for p in final],
            "resolution": torch.tensor([p["resolution"] for p in final], dtype=torch.float32),
            "aspect_ratio": torch.tensor(  # [n, 1]
                [[p["bucket"].height / p["bucket"].width] for p in final], dtype=torch.float32
            ),
            "index": torch.tensor([p["index"] for p in final], dtype=torch.long),  # [n]
            "position": torch.tensor(positions, dtype=torch.long),  # [n]
        }
        cams = [p["camera"] for p in final]
        if all(c is not None for c in cams) and len({c.shape for c in cams}) == 1:
            batch["camera_pose"] = torch.from_numpy(np.stack(cams))  # [n, K]
        return batch

    def pack_sizes(self, *, downsample: int, patch_size: int) -> MediaSizes:
        """Token counts of the training samples from their buckets (``media.pack``)."""
        return MediaSizes(self, downsample=downsample, patch_size=patch_size)

    def iterator(self, *, micro_batch_size: int, **kwargs: Any) -> MicroBatchIterator:
        """``MicroBatchIterator(self, ...)`` after checking the micro-batch fits the chunks."""
        self.check_micro_batch_size(micro_batch_size)
        return MicroBatchIterator(self, micro_batch_size=micro_batch_size, **kwargs)

    def check_micro_batch_size(self, micro_batch_size: int) -> None:
        """With several buckets a micro-batch must not straddle two chunks."""
        if len(self.buckets) > 1 and self.cfg.bucket_chunk % micro_batch_size:
            raise ValueError(
                f"media.bucket_chunk={self.cfg.bucket_chunk}: must be a multiple of "
                f"train.micro_batch_size={micro_batch_size} with {len(self.buckets)} buckets "
                "(each micro-batch must come from one same-bucket chunk)"
            )


def _stack(
    final: list[dict[str, Any]], pixels: list[torch.Tensor], target: Bucket
) -> dict[str, Any]:
    """Decoded samples of one bucket -> a micro-batch (keys: see ``MediaDataset.collate``)."""
    batch: dict[str, Any] = {
        "pixels": torch.stack(pixels),  # [B, 3, (T,) H, W]
        "caption": [p["caption"] for p in final],
        "resolution": torch.tensor([p["resolution"] for p in final], dtype=torch.float32),
        "aspect_ratio": torch.full(
            (len(final), 1), target.height / target.width, dtype=torch.float32
        ),
        "index": torch.tensor([p["index"] for p in final], dtype=torch.long),  # [B]
        "key": [p["key"] for p in final],
    }
    cams = [p["camera"] for p in final]
    if all(c is not None for c in cams) and len({c.shape for c in cams}) == 1:
        # The stored (absolute) pose; NVS pairs views and derives the relative camera.
        batch["camera_pose"] = torch.from_numpy(np.stack(cams))  # [B, K]
    return batch


class MediaSizes:
    """Model tokens of every training sample of a :class:`MediaDataset`, from its bucket.

    A bucket ``H x W`` (``T`` frames; images 1) gives latents ``[C, (T,) H/d, W/d]`` (``d``: the
    VAE's downsampling factor, frames encoded one by one) and ``T * (H/d/p) * (W/d/p)`` model
    tokens at patch size ``p``. All of it is known from the index facts, before any decoding,
    so the packer plans whole windows for free. A bucket that does not split into whole
    patches is a config error (``media.buckets``), raised here.
    """

    section = "media"

    def __init__(self, dataset: MediaDataset, *, downsample: int, patch_size: int) -> None:
        if downsample < 1 or patch_size < 1:
            raise ValueError(f"downsample={downsample}, patch_size={patch_size}: must be >= 1")
        self.dataset = dataset
        self.downsample = downsample
        self.patch_size = patch_size
        unit = downsample * patch_size
        per_bucket = []
        for b in dataset.buckets:
            if b.height % unit or b.width % unit:
                raise ValueError(
                    f"media.buckets: bucket {b.height}x{b.width} does not split into whole "
                    f"patches (VAE downsample {downsample} x model.patch_size {patch_size} = "
                    f"{unit} pixels); use multiples of {unit}"
                )
            per_bucket.append(b.frames * (b.height // unit) * (b.width // unit))
        self._per_bucket = np.asarray(per_bucket, dtype=np.int64)  # [num buckets]
        self._bucket_of = dataset._bucket[dataset._virt].astype(np.int64)  # [N]

    def token_counts(self) -> np.ndarray:
        return self._per_bucket[self._bucket_of]  # [N]

    def resolve(self, index: int) -> int:
        return int(self._per_bucket[self._bucket_of[int(index)]])  # always known

    def is_known_bad(self, index: int) -> bool:
        return int(self.dataset._virt[int(index)]) in self.dataset._bad

    def reject(self, index: int) -> None:  # never called: every bucket's count is usable
        raise AssertionError(f"media sample {index}: token counts are never unusable")

    def shape(self, index: int) -> tuple[int, ...]:
        """``((T,) H/d, W/d)`` of the sample's latent (channels left out: same for all)."""
        b = self.dataset.bucket_of(int(index))
        d = self.downsample
        hw = (b.height // d, b.width // d)
        return (b.frames, *hw) if b.frames > 1 else hw

    def frames(self, index: int) -> int:
        return int(self.dataset.bucket_of(int(index)).frames)

    def describe(self, index: int) -> str:
        b = self.dataset.bucket_of(int(index))
        frames = f" x {b.frames} frames" if b.frames > 1 else ""
        return (
            f"bucket {b.height}x{b.width}{frames} (sample {self.dataset.key(int(index))!r}; VAE "
            f"downsample {self.downsample}, patch {self.patch_size})"
        )


class MediaHoldout:
    """The held-out tail of a :class:`MediaDataset` (``validation.holdout``), for the validator.

    Sample ``j`` is the ``j``-th of the last ``H`` usable samples of ``media.path`` in index order,
    planned for its *own* bucket (held-out samples of different buckets have different shapes).
    ``get_or_none`` reads and decodes one sample at once, so a bad one (unreadable metadata,
    truncated or corrupt stream) shows up there: it is counted in the base dataset's
    ``bad_counts`` (the trainer's ``data/bad/*``, bounded by ``media.max_bad_fraction`` like
    training) and ``None`` is returned, so the caller can skip to the next held-out sample. The
    reported ``index`` is the sample's position in ``media.path``'s index.
    """

    def __init__(self, base: MediaDataset, physical: np.ndarray) -> None:
        self.base = base
        self._phys = np.asarray(physical, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._phys)

    @property
    def cfg(self) -> MediaDataConfig:
        return self.base.cfg

    @property
    def num_bad(self) -> int:
        """Held-out samples known to be bad so far."""
        bad = self.base._bad
        return sum(int(p) in bad for p in self._phys)

    def _physical(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"held-out sample {index} out of range [0, {len(self)})")
        return int(self._phys[index])

    def physical_index(self, index: int) -> int:
        """Position in ``media.path``'s index of held-out sample ``index``."""
        return self._physical(index)

    def key(self, index: int) -> str:
        return self.base._keys[self._physical(index)].decode()

    def bucket_of(self, index: int) -> Bucket:
        return self.base.buckets[int(self.base._bucket[self._physical(index)])]

    def get_or_none(self, index: int) -> dict[str, Any] | None:
        """Plan of held-out sample ``index`` with its decoded ``pixels`` [3, (T,) H, W], or
        ``None`` when it is bad (counted; raises ``BadDataError`` past the threshold)."""
        phys = self._physical(index)
        base = self.base
        try:
            plan = base._plan_physical(phys, phys, None)
        except BadSampleError as err:
            base._mark_bad(phys, err.reason, err.detail)
            return None
        out = base._decode_one(plan)
        if isinstance(out, DecodeError):
            base._mark_bad(phys, out.reason, out.detail)
            return None
        return {**plan, "pixels": out}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Decoded held-out samples of one bucket -> a batch with ``MediaDataset.collate``'s
        keys (the validator batches one sample at a time, see ``Validator``)."""
        if not samples:
            raise ValueError("MediaHoldout.collate: empty micro-batch")
        buckets = {s["bucket"] for s in samples}
        if len(buckets) > 1:
            raise ValueError(
                f"MediaHoldout.collate: held-out samples of buckets {sorted(map(str, buckets))} "
                "cannot share a batch (one bucket per batch)"
            )
        return _stack(samples, [s["pixels"] for s in samples], samples[0]["bucket"])

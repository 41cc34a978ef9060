"""Packed micro-batches: each step's samples bucketed by token count into packs, balanced over DP.

Semantics (docs/video.md, *Packing*):

* **The global batch counts samples.** Step ``k`` trains on the ``global_batch_size`` positions
  ``[k GB, (k+1) GB)`` of the deterministic sample order (:class:`~.sampler.GlobalOrder`, the same
  order the unpacked :class:`~.sampler.MicroBatchIterator` reads), whatever the DP size.
* **Packs are formed inside that window**, from the samples' model token counts
  (``frames * H/p * W/p``, no file access; see ``SampleSizes`` below): the number of packs is what
  first-fit decreasing needs at ``capacity`` tokens per pack
  (:func:`~lumos_mcore.models.dit.packing.pack_by_tokens`), rounded up to a multiple of the DP
  size; the samples are spread longest-first over that many packs onto the least-loaded one with
  room, so packs have nearly equal cost (FFD's own packs, full ones and a remainder, would leave
  one rank idle when each rank runs only a pack or two; if the spreading fails to fit, FFD's
  packs are used, the fullest split until the count divides). The packs are then assigned with
  equal counts per rank and balanced loads
  (:func:`~lumos_mcore.models.dit.packing.balance_packs`). One pack is one micro-batch, so the
  number of micro-batches per step varies between steps but is the same on every DP rank.
  Context-parallel ranks share a pack evenly (the layout pads it to a multiple of CP x SP).
* **State is ``consumed_samples`` only**: a step's packs are a pure function of its window, the
  DP size and the data, so a resume at the same DP size replays identical packs. At another DP
  size the step trains on exactly the same samples with the same per-sample noise and timesteps
  (those follow the sample's *position*, not its pack); only their grouping into packs differs.
* **Bad samples**: a sample whose shape is unusable (unknown in the index and unreadable, or not
  a multiple of the patch size) is left out of the plan; a sample that fails to read is dropped
  from its pack. Both are counted by the dataset (``bad_counts``, ``data.max_bad_fraction``). A
  pack left empty, or a missing pack needed to keep the per-rank counts equal, is filled with the
  next good sample after the window that fits (given the position of a dropped sample, so the
  positions of a step stay unique) — like ``MicroBatchIterator``'s replacement rule, it depends
  only on the data.
* **Where token counts come from** is the only source-specific part: a :class:`SampleSizes`
  provider — :class:`FeatureSizes` (latent shapes in ``index.json``) or, for raw media
  (``media.pack``), ``MediaSizes`` (each sample's aspect-ratio / duration bucket, known before
  decoding). Raw packs are collated by ``MediaDataset.collate_pack`` and encoded by
  ``OnlineEncodingIterator`` into this module's pack format.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from lumos_mcore.data.sampler import MicroBatchIterator
from lumos_mcore.models.dit.packing import balance_packs, pack_by_tokens, sample_cost

__all__ = [
    "FeatureSizes",
    "PackedMicroBatchIterator",
    "SampleSizes",
    "StepPlan",
    "collate_pack",
]

_PLAN_CACHE = 4  # step plans kept (the current step plus the prefetched ones)
# Global batches after a step's window searched for a stand-in of a sample that failed to read.
_REPLACEMENT_SPAN = 16


@dataclass(frozen=True)
class StepPlan:
    """Packs of one global batch: ``packs[r][m]`` is DP rank ``r``'s micro-batch ``m``, a list of
    ``(position, sample index)``; ``spare`` are positions of samples left out of the plan."""

    start: int
    packs: list[list[list[tuple[int, int]]]]
    spare: list[int]

    @property
    def micro_batches(self) -> int:
        return len(self.packs[0])


class SampleSizes(Protocol):
    """What the planner needs to know about the samples, without loading them.

    The planner is the same for every data source; only where a sample's model token count
    comes from differs: feature shards record latent shapes in ``index.json``
    (:class:`FeatureSizes`), raw media know each sample's aspect-ratio / duration bucket before
    decoding (:class:`~lumos_mcore.data.media.dataset.MediaSizes`). ``section`` names the config
    section of the packing flags (``data`` or ``media``) for error messages.
    """

    section: str

    def token_counts(self) -> np.ndarray:
        """``[N]`` int64 model tokens per sample; ``-1`` unknown (see ``resolve``), ``-2``
        unusable (see ``reject``)."""
        ...

    def resolve(self, index: int) -> int:
        """Tokens of a sample ``token_counts`` did not know (may read it); ``-2`` unusable."""
        ...

    def is_known_bad(self, index: int) -> bool: ...

    def reject(self, index: int) -> None:
        """Count an unusable sample as bad (the dataset's ``bad_counts``)."""
        ...

    def shape(self, index: int) -> tuple[int, ...]:
        """Latent shape ``(C, (T,) H, W)`` (``()`` if unknown): same-shape samples of a pack
        sit together so attention batches them."""
        ...

    def frames(self, index: int) -> int: ...

    def describe(self, index: int) -> str:
        """Where a sample's token count comes from, for the capacity error message."""
        ...


class FeatureSizes:
    """Token counts of feature shards (``FeatureDataset``): ``frames * H/p * W/p`` of the latent
    shapes recorded in ``index.json``; a sample whose shape is not recorded is read once."""

    section = "data"

    def __init__(self, dataset: Any, patch_size: int) -> None:
        self.dataset = dataset
        self.patch_size = patch_size

    def token_counts(self) -> np.ndarray:
        return np.asarray(self.dataset.token_counts(self.patch_size), dtype=np.int64)  # [N]

    def resolve(self, index: int) -> int:
        sample = self.dataset.get_or_none(index)  # counted bad by the dataset if it fails
        if sample is None:
            return -1
        shape = tuple(sample["latent"].shape)
        f, h, w = (1, *shape[1:]) if len(shape) == 3 else shape[1:]
        p = self.patch_size
        return f * (h // p) * (w // p) if h % p == 0 and w % p == 0 else -2

    def is_known_bad(self, index: int) -> bool:
        return bool(self.dataset.is_known_bad(index))

    def reject(self, index: int) -> None:
        self.dataset.reject(
            index,
            "bad_shape",
            f"latent {self.dataset.latent_shape(index)} is not a multiple of the patch "
            f"size {self.patch_size}",
        )

    def shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.dataset.latent_shape(index) or ())

    def frames(self, index: int) -> int:
        shape = self.shape(index)
        return int(shape[1]) if len(shape) == 4 else 1  # [C, T, H, W] | [C, H, W]

    def describe(self, index: int) -> str:
        shape = self.dataset.latent_shape(index)
        where = f"latent {shape}" if shape is not None else "shape not in index.json; found on read"
        return f"sample {self.dataset.key(index)!r} ({where}, patch {self.patch_size})"


def collate_pack(
    samples: list[dict[str, Any]],
    positions: list[int],
    *,
    pack_length: int | None = None,
    loss_scale: float | None = None,
) -> dict[str, Any]:
    """One pack in the format of ``DiffusionForwardStep.prepare_packed``.

    ``latent``: list of ``[C, (T,) H, W]``; ``cond``: list of ``[Lc_i, Cc]`` with trailing padding
    (``cond_mask`` False) cut off, so each sample attends to its own tokens only; ``cond_mask``
    (list of ``[Lc_i]``) only when some sample still has an inner padded token; ``position`` and
    ``index`` ``[n]`` long; ``pack_length`` when every pack must have one length (PP);
    ``loss_scale`` = DP size x packs per rank / samples in the step: the step then sums the
    pack's per-sample losses times this factor, so that megatron's mean over micro-batches and
    DDP's mean over DP ranks give the mean over the *samples* of the step (packs hold different
    numbers of samples; a mean per pack would weigh a sample in a small pack more).
    """
    if not samples or len(samples) != len(positions):
        raise ValueError(f"collate_pack: {len(samples)} samples for {len(positions)} positions")
    conds, masks = [], []
    for s in samples:
        mask = s["cond_mask"]  # [Lc] bool
        real = int(torch.nonzero(mask).max()) + 1 if bool(mask.any()) else 1
        conds.append(s["cond"][:real])  # [Lc_i, Cc]
        masks.append(mask[:real])  # [Lc_i]
    out: dict[str, Any] = {
        "latent": [s["latent"] for s in samples],
        "cond": conds,
        "position": torch.tensor(positions, dtype=torch.long),  # [n]
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),  # [n]
    }
    if not all(bool(m.all()) for m in masks):
        out["cond_mask"] = masks
    if pack_length is not None:
        out["pack_length"] = int(pack_length)
    if loss_scale is not None:
        out["loss_scale"] = float(loss_scale)
    return out


class PackedMicroBatchIterator(MicroBatchIterator):
    """Endless iterator over this DP rank's packs (module docstring), resumable from
    ``consumed_samples``; prefetch threads, ``state_dict`` and ``close`` as in the base class.

    ``sizes`` gives the planner each sample's token count (:class:`SampleSizes`); by default
    :class:`FeatureSizes` of ``dataset`` (a ``FeatureDataset``: ``token_counts(patch_size)``,
    ``reject``). ``collate(samples, positions)`` turns the samples ``dataset.get_or_none``
    returned for one pack into a batch (default :func:`collate_pack`); the iterator then adds
    ``loss_scale`` and ``pack_length``. Raw media pass ``MediaSizes`` and
    ``MediaDataset.collate_pack`` (decoded pixels, encoded later by ``OnlineEncodingIterator``).
    ``on_global_batch(n)``, if set, is called after the last pack of a step with the number of
    packs of the next step (the trainer passes it to megatron's schedule as ``num_microbatches``).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        capacity: int,
        patch_size: int,
        cost: str = "tokens",
        pack_length: int | None = None,
        token_multiple: int = 1,
        micro_batch_multiple: int = 1,
        consumed_samples: int = 0,
        sizes: SampleSizes | None = None,
        collate: Callable[[list[Any], list[int]], dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dataset,
            global_batch_size=global_batch_size,
            micro_batch_size=1,
            dp_rank=dp_rank,
            dp_size=dp_size,
            consumed_samples=consumed_samples,
            **kwargs,
        )
        sample_cost(1, cost)  # validates the name
        self.sizes: SampleSizes = sizes if sizes is not None else FeatureSizes(dataset, patch_size)
        flag = f"{self.sizes.section}.pack_capacity"
        if capacity < 1:
            raise ValueError(f"{flag}={capacity}: must be >= 1")
        if pack_length is not None and pack_length < capacity:
            raise ValueError(
                f"{flag}={capacity}: larger than the fixed pack length {pack_length} "
                "(pipeline parallelism pads every pack to model.num_tokens)"
            )
        if micro_batch_multiple < 1 or global_batch_size % (dp_size * micro_batch_multiple):
            raise ValueError(
                f"train.global_batch_size={global_batch_size}: with packing under the "
                f"interleaved pipeline it must be a multiple of dp x pp = "
                f"{dp_size} x {micro_batch_multiple}"
            )
        self.capacity = capacity
        # Packs per rank a multiple of this (megatron's interleaved schedule wants a multiple
        # of the pipeline size); counts above the minimum just spread samples thinner.
        self.micro_batch_multiple = micro_batch_multiple
        self.patch_size = patch_size
        self.cost = cost
        self.pack_length = pack_length
        self._collate = collate
        self.on_global_batch: Callable[[int], None] | None = None
        # Samples that failed to read (this rank): replaced by a no larger one from the slot's
        # column of later positions (``_replacement``), or, when none is found, left out (the
        # step's loss then weighs kept / planned: the scale is fixed when the step is planned).
        self.replaced_in_packs = 0
        self.dropped_in_packs = 0
        tokens = np.asarray(self.sizes.token_counts(), dtype=np.int64)  # [N]
        if tokens.max(initial=0) > capacity:
            i = int(tokens.argmax())
            raise ValueError(
                f"{flag}={capacity}: {self.sizes.describe(i)} has {int(tokens[i])} tokens; "
                f"raise {flag} to at least {int(tokens.max())}"
            )
        if token_multiple > 1:
            odd = np.flatnonzero((tokens > 0) & (tokens % token_multiple != 0))
            if len(odd):
                i = int(odd[0])
                raise ValueError(
                    f"parallel.cp with model.cp_layout='zigzag' needs every sample's tokens to be "
                    f"a multiple of {token_multiple}; {len(odd)} samples are not, e.g. "
                    f"{self.sizes.describe(i)} with {int(tokens[i])} tokens; use the contiguous "
                    "layout"
                )
        self._tokens = tokens
        self._plans: OrderedDict[int, StepPlan] = OrderedDict()
        self._plan_lock = threading.RLock()
        self._stats_lock = threading.Lock()

    # ---- token counts ----
    def _tokens_of(self, index: int) -> int:
        """Tokens of one sample; resolves an unrecorded shape by reading it once. <= 0: unusable."""
        n = int(self._tokens[index])
        if n == -1 and not self.sizes.is_known_bad(index):
            n = self.sizes.resolve(index)
            if n > self.capacity:
                flag = f"{self.sizes.section}.pack_capacity"
                raise ValueError(
                    f"{flag}={self.capacity}: {self.sizes.describe(index)} has {n} tokens "
                    f"(found on read); raise {flag} to at least {n}"
                )
            self._tokens[index] = n
        if n == -2 and not self.sizes.is_known_bad(index):
            self.sizes.reject(index)
        return n

    def _filler(self, position: int, exclude: set[int]) -> tuple[int, int]:
        """First position >= ``position`` whose sample is usable and not in ``exclude``."""
        for p in range(position, position + self.order.num_samples):
            index = int(self.order.indices(p, 1)[0])
            if index not in exclude and self._tokens_of(index) > 0:
                return p, index
        raise RuntimeError(f"no usable sample within one epoch after position {position}")

    # ---- planning ----
    def plan(self, batch_start: int) -> StepPlan:
        """The packs of the global batch at ``batch_start`` for every DP rank (cached)."""
        with self._plan_lock:
            plan = self._plans.get(batch_start)
            if plan is None:
                plan = self._make_plan(batch_start)
                self._plans[batch_start] = plan
                while len(self._plans) > _PLAN_CACHE:
                    self._plans.popitem(last=False)
            return plan

    def _make_plan(self, start: int) -> StepPlan:
        gb, unit = self.global_batch_size, self.dp_size * self.micro_batch_multiple
        idx = self.order.indices(start, gb).tolist()
        tok = [self._tokens_of(i) for i in idx]
        spare = [start + j for j in range(gb) if tok[j] <= 0]
        # Members are (position, index, tokens).
        members = [(start + j, idx[j], tok[j]) for j in range(gb) if tok[j] > 0]
        # As few packs as first-fit decreasing needs, rounded up to a multiple of the DP size;
        # the samples are then spread over that many packs with balanced loads.
        needed = len(pack_by_tokens([m[2] for m in members], self.capacity)) if members else 0
        count = max(unit, -(-needed // unit) * unit)
        packs = self._spread(members, count) or self._split(members, unit)
        free = list(spare)
        used = set(idx)
        for pack in packs:
            if not pack:  # fewer usable samples than packs: fillers from after the window
                if not free:
                    raise RuntimeError(f"cannot make {len(packs)} packs from window {start}")
                _, index = self._filler(start + gb, used)
                used.add(index)
                pack.append((free.pop(0), index, self._tokens_of(index)))
        costs = [sum(sample_cost(m[2], self.cost) for m in p) for p in packs]
        per_rank = []
        for assigned in balance_packs(costs, self.dp_size):
            rank_packs = []
            for k in assigned:
                # Same-shape samples next to each other: attention batches them in one call.
                ordered = sorted(
                    packs[k],
                    key=lambda m: (-m[2], self.sizes.shape(m[1]), m[0]),
                )
                rank_packs.append([(m[0], m[1]) for m in ordered])
            per_rank.append(rank_packs)
        return StepPlan(start, per_rank, spare)

    def _spread(
        self, members: list[tuple[int, int, int]], count: int
    ) -> list[list[tuple[int, int, int]]] | None:
        """Longest-first onto the least-loaded of ``count`` packs with room (None if a sample
        fits nowhere): packs of nearly equal cost, so DP ranks are balanced within about one
        sample even when each rank runs only one or two packs."""
        packs: list[list[tuple[int, int, int]]] = [[] for _ in range(count)]
        load = np.zeros(count)  # [count]
        room = np.full(count, self.capacity, dtype=np.int64)  # [count]
        for m in sorted(members, key=lambda m: (-m[2], m[0])):
            k = int(np.argmin(np.where(room >= m[2], load, np.inf)))
            if room[k] < m[2]:
                return None
            packs[k].append(m)
            load[k] += sample_cost(m[2], self.cost)
            room[k] -= m[2]
        return packs

    def _split(
        self, members: list[tuple[int, int, int]], dp: int
    ) -> list[list[tuple[int, int, int]]]:
        """Fallback: first-fit-decreasing packs, the fullest (by samples) split in two until the
        count is a multiple of ``dp`` (DP size x ``micro_batch_multiple``; empty packs are
        filled by the caller)."""
        lengths = [m[2] for m in members]
        packs = [[members[k] for k in p] for p in pack_by_tokens(lengths, self.capacity)]
        while len(packs) % dp or not packs:
            splittable = [k for k, p in enumerate(packs) if len(p) > 1]
            if not splittable:
                packs.append([])
                continue
            k = max(splittable, key=lambda k: (len(packs[k]), sum(m[2] for m in packs[k]), -k))
            ordered = sorted(packs[k], key=lambda m: (-m[2], m[0]))
            packs[k] = ordered[0::2]
            packs.append(ordered[1::2])
        return packs

    def micro_batches_at(self, batch_start: int) -> int:
        """Packs of each DP rank in the global batch at ``batch_start``."""
        return self.plan(batch_start).micro_batches

    @property
    def num_micro_batches_now(self) -> int:
        """Packs of each DP rank in the step being (or about to be) consumed."""
        return self.micro_batches_at(self._consumed)

    def step_sample_sizes(self, batch_start: int) -> list[tuple[int, int]]:
        """``(tokens, frames)`` of every planned sample of the global batch at ``batch_start``
        (all DP ranks): the trainer's tokens/s and FLOP count of a packed step."""
        sizes = []
        for rank in self.plan(batch_start).packs:
            for pack in rank:
                for _, index in pack:
                    sizes.append((int(self._tokens[index]), self.sizes.frames(index)))
        return sizes

    def rank_tokens(self, batch_start: int) -> list[int]:
        """Planned tokens per DP rank in the global batch at ``batch_start`` (for balance checks)."""
        plan = self.plan(batch_start)
        return [sum(int(self._tokens[i]) for pk in r for _, i in pk) for r in plan.packs]

    # ---- loading ----
    def _load(self, batch_start: int, micro_batch: int) -> dict[str, Any]:
        plan = self.plan(batch_start)
        pack = plan.packs[self.dp_rank][micro_batch]
        exclude = {i for r in plan.packs for pk in r for _, i in pk}
        loaded: list[tuple[int, int, Any]] = []  # (position, index, sample)
        for pos, index in pack:
            sample = self.dataset.get_or_none(index)  # a failure is counted by the dataset
            if sample is None:
                found = self._replacement(batch_start, pos, int(self._tokens[index]), exclude)
                with self._stats_lock:
                    if found is None:
                        self.dropped_in_packs += 1
                    else:
                        self.replaced_in_packs += 1
                if found is None:
                    continue
                index, sample = found
            loaded.append((pos, index, sample))
        # the planned order (same-shape samples adjacent) also with a smaller replacement
        loaded.sort(key=lambda m: (-int(self._tokens[m[1]]), self.sizes.shape(m[1]), m[0]))
        samples, positions = [m[2] for m in loaded], [m[0] for m in loaded]
        if not samples:  # every sample failed: any size that reads takes the first slot
            pos = pack[0][0]
            spans = -(-self.order.num_samples // self.global_batch_size)
            found = self._replacement(batch_start, pos, self.capacity, exclude, spans)
            if found is None:  # a short epoch has few columns: any later position will do
                found = self._any_readable(pos, exclude)
            if found is None:
                raise RuntimeError(
                    f"no readable sample within one epoch to fill the pack at position {pos}"
                )
            with self._stats_lock:  # the first slot, counted as dropped above, is filled
                self.dropped_in_packs -= 1
                self.replaced_in_packs += 1
            samples, positions = [found[1]], [pos]
        planned = sum(len(pk) for r in plan.packs for pk in r)  # samples of the step
        scale = self.dp_size * plan.micro_batches / planned
        if self._collate is None:
            return collate_pack(samples, positions, pack_length=self.pack_length, loss_scale=scale)
        out = self._collate(samples, positions)
        out["loss_scale"] = float(scale)
        if self.pack_length is not None:
            out["pack_length"] = int(self.pack_length)
        return out

    def _replacement(
        self,
        batch_start: int,
        position: int,
        max_tokens: int,
        exclude: set[int],
        spans: int = _REPLACEMENT_SPAN,
    ) -> tuple[int, Any] | None:
        """``(index, sample)`` to stand in for the sample at ``position`` that failed to read:
        the first one that reads, is no larger (the pack keeps its capacity and fixed length)
        and is not in ``exclude`` (updated), among positions ``position + k * global_batch``,
        ``k = 1..spans``. Each slot of the window searches its own column of later positions,
        so no two ranks or micro-batches of a step pick the same stand-in, without talking to
        each other, and the choice does not depend on the DP size. Keeps the step's sample
        count, which the loss scale assumes; ``None`` drops the slot."""
        gb = self.global_batch_size
        spans = min(spans, max(1, self.order.num_samples // gb))
        for k in range(1, spans + 1):
            index = int(self.order.indices(position + k * gb, 1)[0])
            if index not in exclude and 0 < self._tokens_of(index) <= max_tokens:
                found = self._read_stand_in(index, exclude)
                if found is not None:
                    return found
        return None

    def _read_stand_in(self, index: int, exclude: set[int]) -> tuple[int, Any] | None:
        """``(index, sample)`` when the candidate reads; it joins ``exclude`` either way."""
        exclude.add(index)
        sample = self.dataset.get_or_none(index)
        return None if sample is None else (index, sample)

    def _any_readable(self, position: int, exclude: set[int]) -> tuple[int, Any] | None:
        """``(index, sample)`` of the first sample after ``position`` (one epoch round) that
        reads and is not in ``exclude`` (updated). The last resort for a pack whose samples all
        failed when its column holds no stand-in: with fewer than two global batches of data a
        column has a single position. Deterministic, so a resume picks the same sample; two
        emptied packs of one step may share it, which beats stopping the run."""
        for p in range(position + 1, position + self.order.num_samples):
            index = int(self.order.indices(p, 1)[0])
            if index not in exclude and self._tokens_of(index) > 0:
                found = self._read_stand_in(index, exclude)
                if found is not None:
                    return found
        return None

    def __next__(self) -> dict[str, Any]:
        batch = super().__next__()
        if self._next_mb == 0 and self.on_global_batch is not None:
            self.on_global_batch(self.num_micro_batches_now)
        return batch

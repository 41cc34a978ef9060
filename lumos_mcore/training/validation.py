"""Periodic validation inside the training loop: held-out loss and a sample grid.

**Held-out loss** runs megatron's ``get_forward_backward_func()`` with ``forward_only=True`` on
``validation.num_samples`` held-out samples, split over the data-parallel ranks like a training
batch, so it works at every TP / PP / CP / DP layout through the same schedule. Every held-out
sample ``i`` gets its noise, timestep (and no condition dropout) from generators seeded by
``(validation.seed, i)`` (:mod:`lumos_mcore.training.step`), so the number is comparable across
steps, runs, resumes and DP sizes. The loss is averaged over DP x CP like the training loss and
logged as ``val/loss``; with EMA weights also ``val/loss_ema`` (EMA swapped in: one more
forward pass over the few held-out batches).

**Sample grid** (``val/samples``): ``validation.grid_samples`` samples from fixed noise
(``lumos_mcore.sample.generate``, the project's samplers, CFG), conditioned on the first
held-out samples' conditions, with the EMA weights when present. Decoded through the frozen VAE
when the job encodes raw media, else shown as latent channels; videos as one frame strip per
sample. Sampling calls the whole model per denoising step, which every rank of a TP / CP group
does together; with pipeline parallelism the stages would need their own p2p schedule per call,
so PP > 1 logs a one-time warning and skips the grid (the held-out loss still runs).

**Held-out set**: ``validation.path``; or, with ``validation.holdout=H``, the last ``H``
samples of ``data.path`` (:func:`holdout_split`: the trainer iterates only the first ``N - H``,
the validator reads the tail); else the first training samples (not held out, one warning).

**Raw media** (``media.path``): ``validation.path`` (feature shards) as above, or
``validation.holdout=H``: the last ``H`` usable media samples in index order, taken out of the
media layout before bucketing (:class:`~lumos_mcore.data.media.dataset.MediaHoldout`). They are
decoded by the job's media pipeline and encoded by the trainer's own ``FrozenEncoders`` (one rank
per model replica encodes and broadcasts, as in training), one sample per micro-batch (see
:class:`Validator`). Without either, raw-media validation is refused when the job is loaded.

Training is not disturbed: the global / megatron RNG states are saved and restored around
validation, and the held-out set is read outside the training data stream.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor, nn

from lumos_mcore.config.data import DataConfig
from lumos_mcore.config.job import JobConfig
from lumos_mcore.config.parallel import interleaved_fits
from lumos_mcore.data.features import FeatureDataset
from lumos_mcore.data.sampler import SampleRange, split_tail
from lumos_mcore.diffusion.objective import build_objective
from lumos_mcore.ops.te_fp8 import refresh_fp8_weight_cache
from lumos_mcore.training.ema import EMA
from lumos_mcore.training.setup import unwrap
from lumos_mcore.training.step import DiffusionForwardStep

if TYPE_CHECKING:
    from lumos_mcore.data.media.dataset import MediaHoldout

log = logging.getLogger("lumos_mcore.train")

__all__ = ["Validator", "holdout_size", "holdout_split", "latent_panels", "tile_rows"]


def holdout_size(job: JobConfig) -> int:
    """Samples ``validation.holdout`` takes out of the training data (0 with a
    ``validation.path``). A raw-media job opens its ``MediaDataset`` with it."""
    v = job.validation
    return v.holdout if v.path is None else 0


def holdout_split(dataset: Any, job: JobConfig) -> tuple[Any, SampleRange | MediaHoldout | None]:
    """``(training samples, held-out samples)`` of the training ``dataset``.

    With ``validation.holdout=H > 0`` and no ``validation.path``: for ``data.path`` the first
    ``N - H`` samples and the last ``H`` (:class:`~lumos_mcore.data.sampler.SampleRange` views);
    for ``media.path`` the dataset itself (opened with ``holdout=H``: the tail must leave the
    media layout before its buckets are chunked and padded, which a view after the fact cannot
    undo) and its :class:`~lumos_mcore.data.media.dataset.MediaHoldout`. Otherwise
    ``(dataset, None)``. Raises, naming the flags, when ``H >= N``.
    """
    v = job.validation
    if not holdout_size(job):
        return dataset, None
    if job.media is not None:
        opened = getattr(dataset, "holdout", None)
        if opened != v.holdout:
            raise ValueError(
                f"validation.holdout={v.holdout}: the media dataset of media.path="
                f"{job.media.path} was opened with holdout={opened}; open it as "
                f"MediaDataset(job.media, holdout={v.holdout})"
            )
        return dataset, dataset.holdout_view()
    n = len(dataset)
    if v.holdout >= n:
        raise ValueError(
            f"validation.holdout={v.holdout}: data.path={job.data.path} has only {n} samples; "
            "the holdout must leave at least one for training (lower validation.holdout or "
            "give a separate validation.path)"
        )
    return split_tail(dataset, v.holdout)


class _RNGGuard:
    """Save and restore every RNG the training step could touch (validation must not shift
    the training stream)."""

    def __enter__(self) -> _RNGGuard:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        self.tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        tensor_parallel.get_cuda_rng_tracker().set_states(self.tracker)


class Validator:
    """Held-out loss and sample grid of one training run (see the module docstring).

    ``train_dataset``: the whole ``data.path`` dataset (not the training view of
    :func:`holdout_split`), or the job's ``MediaDataset``; with ``validation.holdout`` the
    validator reads its tail. ``encoders`` / ``encode_group``: the trainer's ``FrozenEncoders``
    and the ranks of one model replica (raw-media holdout: the held-out pixels go through them);
    ``encoders`` is None on the replica's receiving ranks, ``encoder_device`` is where the
    broadcast encodings land there.

    Raw-media holdout validates **one sample per micro-batch**. The held-out samples keep the
    buckets (aspect ratio / duration) they fall in, so their shapes differ, and a micro-batch
    must be one shape. Grouping them per bucket would need padding (samples counted twice) or
    short remainders (megatron's schedule runs one micro-batch size; unequal micro-batches would
    weight the per-micro-batch mean unevenly), and a bad sample could only be replaced from its
    own bucket. With micro-batches of one every held-out sample weighs the same, appears once, in
    index order, any bad one is replaced by the next good held-out sample, and ``val/loss`` is
    the exact per-sample mean; the cost is a few more forward calls on a small set.
    ``validation.num_samples`` then needs to be a multiple of the data-parallel size only.
    """

    def __init__(
        self,
        job: JobConfig,
        *,
        dp_rank: int,
        dp_size: int,
        pp_size: int,
        is_last_stage: bool,
        train_dataset: Any,
        device: torch.device,
        vae: Any = None,
        encoders: Any = None,
        encode_group: Any = None,
        encoder_device: torch.device | None = None,
    ) -> None:
        v = job.validation
        self.job, self.cfg = job, v
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pp_size, self.is_last_stage = pp_size, is_last_stage
        self.device = device
        if vae is None and encoders is not None:
            vae = encoders.vae
        self.vae = vae  # FrozenVAE of a raw-media job (decodes the grid), else None
        self.encoders, self.encode_group = encoders, encode_group
        self.encoder_device = encoder_device
        self._encoded: dict[int, dict[str, Any]] = {}  # raw-media holdout: index -> batch of 1
        # Raw-media holdout: held-out pixels, encoded here (validation.path holds features).
        self.raw_media = job.media is not None and holdout_size(job) > 0
        if self.raw_media and encoders is None and encode_group is None:
            raise ValueError(
                f"validation.holdout={v.holdout}: raw-media validation encodes the held-out "
                "samples with the job's frozen encoders; pass Validator(encoders=...) (or, on a "
                "rank that receives them, encode_group=...)"
            )
        if v.path is not None:
            pad = job.data.cond_pad_to if job.data is not None else None
            self.dataset = FeatureDataset(
                DataConfig(path=v.path, num_workers=0, shuffle=False, cond_pad_to=pad)
            )
            self.held_out = True
        elif v.holdout:
            _, self.dataset = holdout_split(train_dataset, job)
            self.held_out = True
        else:
            self.dataset = train_dataset
            self.held_out = False
            if dist.get_rank() == 0:
                log.warning(
                    "validation.path is not set: val/loss is measured on the first %d samples "
                    "of data.path, which training also sees (not held out); set "
                    "validation.holdout=N to reserve the last N samples for validation",
                    v.num_samples,
                )
        mbs = 1 if self.raw_media else job.train.micro_batch_size
        self.micro_batch_size = mbs
        if v.num_samples % (mbs * dp_size):
            raise ValueError(
                f"validation.num_samples={v.num_samples}: must be a multiple of the "
                f"data-parallel size {dp_size} (raw-media holdout: one sample per micro-batch)"
                if self.raw_media
                else f"validation.num_samples={v.num_samples}: must be a multiple of "
                f"train.micro_batch_size x data-parallel size = {mbs} x {dp_size}"
            )
        need = max(v.num_samples, v.grid_samples)
        if len(self.dataset) < need:
            raise ValueError(
                f"validation.num_samples={v.num_samples} / grid_samples={v.grid_samples}: the "
                f"validation set has only {len(self.dataset)} samples"
            )
        self.num_microbatches = v.num_samples // (mbs * dp_size)
        if not interleaved_fits(self.num_microbatches, pp_size, job.parallel.vpp):
            # refused here rather than at the first validation, hours into the run
            raise ValueError(
                f"validation.num_samples={v.num_samples}: {self.num_microbatches} micro-batch(es)"
                f" of {mbs} per data-parallel rank ({dp_size}); the interleaved pipeline "
                f"(parallel.vpp={job.parallel.vpp}) needs a multiple of parallel.pp={pp_size}: use "
                f"a multiple of {mbs * dp_size * pp_size}"
            )
        self.forward_step = DiffusionForwardStep(
            build_objective(job.diffusion), seed=v.seed, cond_dropout=0.0, device=device
        )
        self._warned_grid = False

    # -- held-out data ---------------------------------------------------------------------
    def _sample(self, index: int) -> dict[str, Any]:
        """Held-out sample ``index``; a bad one is replaced by the next good one (stable)."""
        for k in range(len(self.dataset)):
            s = self.dataset.get_or_none((index + k) % len(self.dataset))
            if s is not None:
                return s
        raise RuntimeError(
            f"validation: none of the {len(self.dataset)} samples of the validation set is "
            "readable (see the data/bad/* counts)"
        )

    def _encode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A decoded raw-media batch -> model inputs, exactly as the training stream does it
        (the replica's first rank encodes and broadcasts)."""
        from lumos_mcore.encoders.frozen import OnlineEncodingIterator

        it = OnlineEncodingIterator(
            iter([raw]), self.encoders, group=self.encode_group, device=self.encoder_device
        )
        return next(it)

    def _held_out_batch(self, index: int) -> dict[str, Any]:
        """Raw-media held-out sample ``index`` (a bad one replaced), encoded, as a batch of one
        on the CPU (``key`` kept). Decoded and encoded once per run: the encoders are frozen and
        the samples fixed, so every validation would compute the same tensors again."""
        hit = self._encoded.get(index)
        if hit is None:
            raw = self.dataset.collate([self._sample(index)])
            enc = self._encode(raw)
            hit = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in enc.items()}
            hit["key"] = raw["key"]
            self._encoded[index] = hit
        return dict(hit)  # a fresh dict: the caller adds "position"

    def _batch(self, idx: list[int]) -> dict[str, Any]:
        """Held-out samples ``idx`` as one batch (feature samples, or encoded raw media)."""
        if self.raw_media:
            return _join([self._held_out_batch(i) for i in idx])
        return self.dataset.collate([self._sample(i) for i in idx])

    def micro_batches(self) -> list[dict[str, Any]]:
        """This DP rank's held-out micro-batches; ``position`` = held-out sample index."""
        mbs = self.micro_batch_size
        start = self.dp_rank * self.num_microbatches * mbs
        out = []
        for m in range(self.num_microbatches):
            idx = list(range(start + m * mbs, start + (m + 1) * mbs))
            batch = self._batch(idx)
            batch["position"] = torch.tensor(idx, dtype=torch.long)  # [mbs]
            out.append(batch)
        return out

    # -- held-out loss ---------------------------------------------------------------------
    @torch.no_grad()
    def loss(self, chunks: list[nn.Module], batches: list[dict[str, Any]] | None = None) -> float:
        """Mean held-out loss over all DP ranks (NaN on non-last pipeline stages);
        ``batches``: this rank's :meth:`micro_batches`, read here when not given."""
        if batches is None:
            batches = self.micro_batches()
        it = iter(batches)
        data: Any = it if len(chunks) == 1 else list(itertools.tee(it, len(chunks)))
        losses = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=data,
            model=chunks,
            num_microbatches=self.num_microbatches,
            seq_length=self.job.model.num_tokens,
            micro_batch_size=self.micro_batch_size,
            forward_only=True,
        )
        if not self.is_last_stage:
            return float("nan")
        value = torch.stack([x["loss"] for x in losses]).mean().to(self.device)
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(value, group=group)
        return float(value) / dist.get_world_size(group)

    # -- the whole validation --------------------------------------------------------------
    def run(
        self, step: int, chunks: list[nn.Module], ema: EMA | None
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """``({"val/loss": ..., ["val/loss_ema": ...]}, grid image [H, W, 3] uint8 or None)``;
        the grid only on the rank that logs (DP 0, TP 0, CP 0, last stage)."""
        use_ema = ema is not None and self.cfg.ema
        was_training = [c.training for c in chunks]
        for c in chunks:
            c.eval()
        try:
            with _RNGGuard():
                batches = self.micro_batches()  # read (and encode) once for both losses
                out = {"val/loss": self.loss(chunks, batches)}
                if use_ema:
                    with ema.swapped_in(chunks):
                        out["val/loss_ema"] = self.loss(chunks, batches)
                grid = None
                if self.cfg.grid_samples:
                    if use_ema:
                        with ema.swapped_in(chunks):
                            grid = self.grid(step, chunks)
                    else:
                        grid = self.grid(step, chunks)
        finally:
            for c, mode in zip(chunks, was_training):
                c.train(mode)
        return out, grid

    # -- sample grid -----------------------------------------------------------------------
    def grid(self, step: int, chunks: list[nn.Module]) -> np.ndarray | None:
        """Sample the grid on the ranks of DP replica 0 (every TP / CP rank takes part)."""
        if self.pp_size > 1 or len(chunks) > 1:
            if not self._warned_grid and dist.get_rank() == 0:
                log.warning(
                    "validation.grid_samples=%d: in-loop sampling needs the whole model on each "
                    "rank group (parallel.pp=1); with pp=%d only val/loss is logged; sample a "
                    "checkpoint with python -m lumos_mcore.sample",
                    self.cfg.grid_samples,
                    self.pp_size,
                )
            self._warned_grid = True
            return None
        if self.dp_rank != 0:
            return None
        from lumos_mcore.sample import Conditions, describe_model, generate

        core = unwrap(chunks[0])
        info = describe_model(core)
        first = list(range(self.cfg.grid_samples))
        if self.raw_media:  # encoded one by one (buckets differ); the conditions joined
            batch = _join([self._held_out_batch(i) for i in first])
            labels = [str(k) for k in batch["key"]]
        else:
            samples = [self._sample(i) for i in first]
            batch = self.dataset.collate(samples)
            labels = [str(s.get("key", i)) for i, s in enumerate(samples)]
        conds = Conditions(
            cond=batch["cond"].float(),  # [N, Lc, Cc]
            mask=batch.get("cond_mask"),  # [N, Lc]
            labels=labels,
        )
        if info.variant == "i2v":
            if "latent" not in batch:  # raw-media holdout: clips of different buckets
                if not self._warned_grid:
                    log.warning(
                        "validation.grid_samples=%d: the first held-out clips fall in different "
                        "buckets, so their first frames cannot condition one grid batch; only "
                        "val/loss is logged (lower validation.grid_samples)",
                        self.cfg.grid_samples,
                    )
                self._warned_grid = True
                return None
            latent = batch["latent"].float()  # [N, C, T, H, W]
            conds.input_latent = latent[:, :, 0]  # [N, C, H, W]: the first frame
        elif info.variant == "nvs":
            conds.input_latent = batch["input_latent"].float()
            conds.camera = batch["camera"].float()

        refresh_fp8_weight_cache([core])  # FP8: sample with this step's weights

        def call(x: Tensor, t: Tensor, cond: Tensor, mask: Tensor | None, **extras) -> Tensor:
            return core(latents=x, timesteps=t, cond=cond, cond_mask=mask, **extras).float()

        lat = self.job.model.latent_size
        parts = generate(
            call,
            info,
            conds,
            self.job.diffusion,
            sampler=self.cfg.grid_sampler,
            steps=self.cfg.grid_steps,
            cfg_scale=self.cfg.grid_cfg_scale,
            num_samples=1,
            seed=self.cfg.seed,
            batch_size=self.cfg.grid_samples,
            latent_size=lat,
            device=self.device,
            progress=False,
        )
        if not (self.is_last_stage and parallel_state.get_tensor_model_parallel_rank() == 0):
            return None
        if parallel_state.get_context_parallel_rank() != 0:
            return None
        latents = torch.cat([parts[k] for k in sorted(parts)])  # [N, C, (T,) H, W]
        rows = [self._panels(x) for x in latents]
        image = tile_rows(rows)
        out_dir = Path(self.job.train.output_dir) / "val_samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(image).save(out_dir / f"step_{step:07d}.png")
        return image

    def _panels(self, latent: Tensor) -> list[np.ndarray]:
        """One sample as a row of ``[h, w, 3]`` uint8 panels: decoded frames, or latents."""
        if self.vae is None:
            return latent_panels(latent)
        frames = latent[None] if latent.ndim == 3 else latent.transpose(0, 1)  # [T, C, h, w]
        vae = self.vae
        z = frames.to(vae.device, vae.dtype) / vae.scaling_factor + vae.shift_factor
        with torch.no_grad():
            pixels = vae.vae.decode(z).sample.float().cpu()  # [T, 3, H, W] in [-1, 1]
        px = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return list(px.permute(0, 2, 3, 1).numpy())


def _join(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate encoded batches along the batch axis; a tensor whose per-sample shape
    differs between them (latents of different buckets) is left out, lists are chained."""
    out: dict[str, Any] = {}
    for k, first in batches[0].items():
        vals = [b[k] for b in batches]
        if isinstance(first, Tensor):
            if len({tuple(v.shape[1:]) for v in vals}) == 1:
                out[k] = torch.cat(vals)  # [N, ...]
        elif isinstance(first, list):
            out[k] = [x for v in vals for x in v]
    return out


def latent_panels(latent: Tensor) -> list[np.ndarray]:
    """Latent ``[C, H, W]`` -> one grey panel per channel; video ``[C, T, H, W]`` -> one panel
    per frame (its first three channels as RGB). Min-max scaled per sample."""
    x = latent.float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)
    x = (x * 255).round().to(torch.uint8)
    if x.ndim == 3:  # [C, H, W]
        return [c[..., None].expand(-1, -1, 3).numpy() for c in x]
    rgb = x[:3]  # [<=3, T, H, W]
    if rgb.shape[0] < 3:
        rgb = torch.cat([rgb, rgb[-1:].expand(3 - rgb.shape[0], *rgb.shape[1:])])
    return list(rgb.permute(1, 2, 3, 0).numpy())  # T x [H, W, 3]


def tile_rows(rows: list[list[np.ndarray]], pad: int = 2, scale: int | None = None) -> np.ndarray:
    """Rows of equal-size ``[h, w, 3]`` uint8 panels -> one ``[H, W, 3]`` image (white gaps).

    Small panels (latents) are enlarged by nearest-neighbour ``scale`` (default: to >= 64 px).
    """
    h, w = rows[0][0].shape[:2]
    scale = scale or max(1, 64 // max(h, w))
    h, w = h * scale, w * scale
    cols = max(len(r) for r in rows)
    image = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            big = panel.repeat(scale, 0).repeat(scale, 1)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            image[y : y + h, x : x + w] = big
    return image

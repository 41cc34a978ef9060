"""The training loop: megatron schedules + DDP + (distributed) optimizer + EMA + checkpoints."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from lumos_mcore.config.job import JobConfig
from lumos_mcore.config.loader import config_to_dict, save_config
from lumos_mcore.data.features import FeatureDataset
from lumos_mcore.data.media.stall import StallTimer
from lumos_mcore.data.sampler import MicroBatchIterator
from lumos_mcore.diffusion.objective import build_objective
from lumos_mcore.durable import atomic_write_text
from lumos_mcore.ops import kernel_choices
from lumos_mcore.parallel.state import init_distributed, initialize_parallel
from lumos_mcore.perf.flops import DiTShape, count_flops, count_model_flops, recomputed_share
from lumos_mcore.perf.hardware import rank_peak
from lumos_mcore.perf.memory import MemoryEstimate, estimate_job_memory
from lumos_mcore.training.checkpoint import Checkpointer, WeightsReport
from lumos_mcore.training.ema import EMA
from lumos_mcore.training.metrics import MetricsWriter, peak_memory_gib
from lumos_mcore.training.nonfinite import NonFiniteError, NonFiniteGuard, find_nonfinite
from lumos_mcore.training.profiling import StepProfiler, phase
from lumos_mcore.training.setup import (
    build_model,
    build_optimizer,
    select_kernels,
    use_bf16,
)
from lumos_mcore.training.step import DiffusionForwardStep, with_positions
from lumos_mcore.training.validation import Validator, holdout_size, holdout_split

log = logging.getLogger("lumos_mcore.train")


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports back."""

    final_step: int
    losses: list[float] = field(default_factory=list)  # logging rank only
    checkpoint: str | None = None


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM pre-emption), or ``train.max_minutes`` running out, ask for a
    checkpoint and a clean exit."""

    def __init__(self, max_minutes: float | None = None, start: float | None = None) -> None:
        self.requested = False
        self.start = time.monotonic() if start is None else start
        self.max_minutes = max_minutes
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread (embedded use)
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def out_of_time(self, step_seconds: float) -> bool:
        """Another step as long as the last one would end past ``train.max_minutes``."""
        if self.max_minutes is None:
            return False
        return time.monotonic() - self.start + step_seconds > self.max_minutes * 60

    def agreed(self, step_seconds: float = 0.0) -> bool:
        """True on every rank if any rank was signalled or is out of time (one tiny
        all-reduce; the ranks' clocks differ a little, the first to run out decides)."""
        local = self.requested or self.out_of_time(step_seconds)
        flag = torch.tensor([1.0 if local else 0.0], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of all ranks (one tiny all-reduce): the logging rank is the last
    pipeline stage, but the first stage holds the most in-flight activations, and the peak the
    job must fit is the largest rank's -- the one ``memory/estimate_gib`` predicts."""
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _replica_group(dp_rank: int):
    """Process group of the ranks that read the same samples (TP x PP x CP of one replica)."""
    ranks_dp = [None] * dist.get_world_size()
    dist.all_gather_object(ranks_dp, dp_rank)
    mine = None
    for value in sorted(set(ranks_dp)):  # every rank creates every group, in the same order
        group = dist.new_group([r for r, d in enumerate(ranks_dp) if d == value])
        if value == dp_rank:
            mine = group
    return mine


def _check_encoders_fit_model(encoders, job: JobConfig) -> None:
    m = job.model
    for what, got, flag, want in (
        ("latent channels", encoders.latent_channels, "model.in_channels", m.in_channels),
        ("condition width", encoders.cond_dim, "model.cond_channels", m.cond_channels),
        ("condition tokens", encoders.cond_tokens, "model.cond_tokens", m.cond_tokens),
    ):
        if got != want:
            raise ValueError(
                f"{flag}={want}: the frozen encoders give {what} {got}; set {flag}={got}"
            )


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )


class Trainer:
    """Owns one training run; ``run()`` trains to ``train.steps`` (resuming if possible)."""

    def __init__(self, job: JobConfig) -> None:
        started = time.monotonic()  # train.max_minutes counts set-up (build, resume, data) too
        self.job = job
        init_distributed()
        m = job.model
        self.info = initialize_parallel(
            job.parallel,
            num_attention_heads=m.num_heads_,
            num_layers=m.depth_,
            seed=job.train.seed,
            seq_len=m.num_tokens,
        )
        source = job.data if job.data is not None else job.media
        self.num_microbatches = job.train.num_microbatches(  # packs: set by the packer
            self.info.dp_size,
            pp=job.parallel.pp,
            vpp=None if source.pack else job.parallel.vpp,
        )
        self.chunks, self.tconfig = build_model(m, job.parallel, seed=job.train.seed)
        select_kernels(m, job.parallel, job.train.micro_batch_size)  # CUDA: Triton or torch
        self.optimizer, self.scheduler = build_optimizer(
            self.chunks,
            job.optim,
            bf16=use_bf16(m),
            use_distributed_optimizer=job.parallel.use_distributed_optimizer,
            total_steps=job.train.steps,
        )
        self.ema = EMA(self.chunks, job.train.ema_decay) if job.train.ema_decay > 0 else None
        self.checkpointer = Checkpointer(
            job.checkpoint_dir,
            job.checkpoint.keep_last,
            async_save=job.checkpoint.async_save,
            keep_every=job.checkpoint.keep_every,
        )
        self.step = 0
        # Data position of step 0: step k reads positions ``first_sample + k * GB``. Nonzero
        # after a resume at another global batch size (the checkpoint's consumed_samples wins).
        self.first_sample = 0
        self.init_report: WeightsReport | None = None  # set by a checkpoint.init_from load
        self.nonfinite = NonFiniteGuard(job.train.nonfinite_skips)
        self._newest: tuple[int, str] | None = None  # (step, folder) written or resumed from
        self._last_saved: str | None = None  # the one this process wrote last
        self._resume()
        self.data = self._build_data()
        self.forward_step = DiffusionForwardStep(
            build_objective(job.diffusion),
            seed=job.train.seed,
            cond_dropout=job.diffusion.cond_dropout,
            device=_device(),
        )
        self.is_logging_rank = (
            self.info.is_last_stage
            and self.info.tp_rank == 0
            and self.info.dp_rank == 0
            and self.info.cp_rank == 0
        )
        out = Path(job.train.output_dir)
        self.metrics_path = out / "metrics.jsonl"
        self.metrics = MetricsWriter(
            out / "tensorboard", self.is_logging_rank and job.train.tensorboard, self.step
        )
        if self.is_logging_rank and self.step > 0:
            self._drop_metrics_after(self.step)
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(job, out / "config.yaml")
        self.stop = _StopFlag(job.train.max_minutes, start=started)
        self.profiler = StepProfiler(job.profile, dist.get_rank(), dist.get_world_size(), out)
        self.validator = self._build_validator()
        self._init_throughput()
        self.memory_estimate = self._estimate_memory()

    # -- validation and throughput ---------------------------------------------------------
    def _build_validator(self) -> Validator | None:
        if not self.job.validation.interval:
            return None
        # Raw-media jobs: the training stream's encoders (loaded once) decode the grid and, with
        # validation.holdout, encode the held-out samples over the same replica group.
        return Validator(
            self.job,
            dp_rank=self.info.dp_rank,
            dp_size=self.info.dp_size,
            pp_size=self.info.pp_size,
            is_last_stage=self.info.is_last_stage,
            train_dataset=self.dataset,
            device=_device(),
            encoders=self.encoders,
            encode_group=self.encode_group,
            encoder_device=_device(),
        )

    def _estimate_memory(self) -> MemoryEstimate:
        """The per-rank memory the config implies (perf/memory.py), logged once next to what
        the device has; ``memory/estimate_gib`` then sits beside the measured peak."""
        job = self.job
        choice = kernel_choices().get("norm_modulate")  # set by select_kernels on CUDA
        kernels = choice.backend if choice is not None else "torch"
        source = job.data if job.data is not None else job.media  # data.pack or media.pack
        pack = source.pack_capacity if source.pack else None
        if pack is not None and self.info.pp_size > 1:
            pack = job.model.num_tokens  # PP pads every pack to model.num_tokens
        est = estimate_job_memory(
            job.model,
            job.parallel,
            job.train,
            self.info.world_size,
            pack_capacity=pack,
            bf16=use_bf16(job.model),
            kernels=kernels,
            media=job.media,
        )
        if dist.get_rank() != 0:  # the first pipeline stage holds the most
            return est
        log.info("memory estimate per rank: %s", est.summary())
        if torch.cuda.is_available():
            capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            if not est.fits(capacity):
                hint = (
                    "media.encoders.vae_batch (frames per VAE call) or media.encoders.dtype=bf16"
                    if est.encode_working > est.activations + est.working
                    else "model.recompute=full, parallel.cp / parallel.tp with "
                    "parallel.sequence_parallel=true"
                )
                log.warning(
                    "the estimate (%.1f GiB per rank) exceeds 90%% of this GPU's %.1f GiB; "
                    "consider %s, parallel.use_distributed_optimizer=true or a smaller "
                    "train.micro_batch_size (python tools/plan_memory.py compares)",
                    est.total / 2**30,
                    capacity / 2**30,
                    hint,
                )
        return est

    def _init_throughput(self) -> None:
        """FLOPs of a step (analytic, perf/flops.py) and the per-rank peak for MFU.

        Model FLOPs (3 x forward) give ``throughput/tflops_per_s`` and MFU; executed FLOPs
        (recompute adds forward work: 4 x for full recompute) give HFU. The peak is measured
        once, on the logging rank only (CPU: a matmul probe; CUDA: the spec sheet).
        """
        job = self.job
        p = job.parallel
        self.recompute_share = recomputed_share(job.model, p.pp, p.vpp)
        flops = count_model_flops(job.model, recompute_share=self.recompute_share)
        self.tokens_per_step = job.train.global_batch_size * job.model.num_tokens
        self.model_flop_per_step = flops.model_train * job.train.global_batch_size
        self.hardware_flop_per_step = flops.hardware_train * job.train.global_batch_size
        self._flops_by_size: dict[tuple[int, int], object] = {}
        self.peak = None
        if self.is_logging_rank:
            self.peak = rank_peak(
                hidden_size=job.model.hidden_size_,
                rows=job.train.micro_batch_size * job.model.num_tokens,
                mlp_ratio=job.model.mlp_ratio,
                given_tflops=job.train.peak_tflops,
                dtype="fp8" if job.model.fp8 else "bf16",  # FP8 GEMMs: against the FP8 peak
            )
            log.info(
                "MFU denominator: %.4g TFLOP/s per rank (%s), %d ranks; %.4g model TFLOP/step",
                self.peak.tflops,
                self.peak.source,
                self.info.world_size,
                self.model_flop_per_step / 1e12,
            )

    def step_work(self, step: int) -> tuple[float, float, float]:
        """Tokens, model FLOPs and executed FLOPs of the global batch of ``step`` (0-based).

        Dense batches: ``global_batch_size`` samples of ``model.num_tokens``. Packed batches:
        the planned samples' own sizes (attention FLOPs are per sample, not per pack).
        """
        if self._packed is None:
            return self.tokens_per_step, self.model_flop_per_step, self.hardware_flop_per_step
        tokens = model = hardware = 0.0
        for size in self._packed.step_sample_sizes(self.consumed_samples_at(step)):
            f = self._flops_by_size.get(size)
            if f is None:
                m = self.job.model
                f = self._flops_by_size[size] = count_flops(
                    DiTShape.from_model_config(m),
                    size[0],
                    frames=size[1] if m.temporal_attention else 1,
                    attention="spatial_temporal" if m.temporal_attention else "full",
                    recompute=m.recompute,
                    single_token_cross=False,  # packs run the full cross-attention
                    recompute_share=self.recompute_share,
                )
            tokens += size[0]
            model += f.model_train
            hardware += f.hardware_train
        return tokens, model, hardware

    def throughput(self, seconds: float, step: int | None = None) -> dict[str, float]:
        """Tokens/s, achieved TFLOP/s (all ranks together), per rank, MFU and HFU of the step
        that took ``seconds`` (``step``: its 0-based index, for packed batches)."""
        world = self.info.world_size
        tokens, model_flop, hardware_flop = (
            self.step_work(step)
            if step is not None
            else (self.tokens_per_step, self.model_flop_per_step, self.hardware_flop_per_step)
        )
        achieved = model_flop / seconds / 1e12
        out = {
            "throughput/tokens_per_s": tokens / seconds,
            "throughput/tflops_per_s": achieved,
            "throughput/tflops_per_s_per_rank": achieved / world,
        }
        if self.peak is not None:
            total_peak = self.peak.tflops * world
            out["throughput/peak_tflops_per_rank"] = self.peak.tflops
            out["throughput/mfu"] = achieved / total_peak
            out["throughput/hfu"] = hardware_flop / seconds / 1e12 / total_peak
        return out

    def validate(self) -> dict[str, float]:
        """Held-out loss (and EMA loss) now; the sample grid goes to TensorBoard."""
        values, grid = self.validator.run(self.step, self.chunks, self.ema)
        if self.is_logging_rank:
            if grid is not None:
                self.metrics.image("val/samples", self.step, grid)
            self.metrics.validation(self.step, values)
        return values

    # -- data --------------------------------------------------------------------------------
    def _build_data(self):
        """Resumable DP-sliced micro-batches; raw media pass through the frozen encoders."""
        job = self.job
        self._packed = None  # the packed iterator, for the step's tokens and FLOPs
        self.encoders = self.encode_group = None  # raw media: FrozenEncoders, replica group
        self.shard_vae = None  # media.encoders.shard_vae: this rank's FrozenVAE
        if job.media is not None:
            from lumos_mcore.data.media.dataset import MediaDataset
            from lumos_mcore.encoders.frozen import EncoderFacts, FrozenEncoders

            # validation.holdout leaves the media layout before bucketing (MediaDataset).
            self.dataset = MediaDataset(job.media, holdout=holdout_size(job))
            self.dataset.check_micro_batch_size(job.train.micro_batch_size)
            self.encoder_facts = EncoderFacts.read(job.media.encoders)
            _check_encoders_fit_model(self.encoder_facts, job)
            # One rank of each model replica encodes (a batch or a pack) and broadcasts; only it
            # loads the encoders. Global rank 0 is always one, so the grid's VAE decode has them.
            self.encode_group = _replica_group(self.info.dp_rank)
            if dist.get_rank() == dist.get_process_group_ranks(self.encode_group)[0]:
                self.encoders = FrozenEncoders(job.media.encoders, seed=job.train.seed)
            # media.encoders.shard_vae: every rank of the replica encodes a share of the frames.
            if job.media.encoders.shard_vae:
                self.shard_vae = (
                    self.encoders.vae
                    if self.encoders is not None
                    else FrozenEncoders.build_vae(job.media.encoders)
                )
            replica = dist.get_world_size(self.encode_group)
            log.info(
                "online encoding: %s",
                f"VAE frames split over the {replica} ranks of each replica (shard_vae), the "
                "condition encoder on its first rank"
                if self.shard_vae is not None and replica > 1
                else f"the first of the {replica} rank(s) of each replica encodes and broadcasts",
            )
        else:
            self.dataset = FeatureDataset(job.data)
            if not job.data.pack:  # stacked micro-batches: one latent shape for the run
                self._check_latent_shape(self.dataset.require_latent_shape())
        # validation.holdout: training never sees the held-out tail (the validator reads it).
        train_set, _ = holdout_split(self.dataset, job)
        source = job.data if job.data is not None else job.media
        if source.pack:
            data = self._packed_iterator(train_set, source)
        else:
            data = MicroBatchIterator(
                train_set,
                global_batch_size=job.train.global_batch_size,
                micro_batch_size=job.train.micro_batch_size,
                dp_rank=self.info.dp_rank,
                dp_size=self.info.dp_size,
                consumed_samples=self.consumed_samples_at(self.step),
            )
        if job.media is not None:
            from lumos_mcore.encoders.frozen import OnlineEncodingIterator

            data = OnlineEncodingIterator(
                data,
                self.encoders,
                group=self.encode_group,
                device=_device(),
                vae=self.shard_vae,
                seed=job.train.seed,
            )
        return StallTimer(data)

    def _pack_counts(self) -> dict[str, float]:
        """Unreadable samples of packed runs (this rank): replaced by a no larger one, or left
        out when none was near (that step's loss then weighs fewer samples)."""
        packed = self._packed
        if packed is None:
            return {}
        return {
            "data/pack_replaced": float(packed.replaced_in_packs),
            "data/pack_dropped": float(packed.dropped_in_packs),
        }

    def _check_latent_shape(self, shape: tuple[int, ...] | None) -> None:
        """The unpacked latents must be the size the config describes: the model takes its
        token count from the batch, while tokens/s, MFU and the memory estimate count
        ``model.num_tokens``, so a mismatch would train fine and report numbers several times
        off."""
        m = self.job.model
        if shape is None:
            return
        want = (m.latent_size, m.latent_size)
        frames = shape[1] if len(shape) == 4 else 1
        if tuple(shape[-2:]) != want or frames != m.num_frames:
            got = f"{frames} x " * (len(shape) == 4) + f"{shape[-2]} x {shape[-1]}"
            raise ValueError(
                f"data.path={self.job.data.path}: latents are {got} but model.latent_size="
                f"{m.latent_size}, model.num_frames={m.num_frames} describe "
                f"{m.num_frames} x {m.latent_size} x {m.latent_size}; set model.latent_size="
                f"{shape[-1]}" + (f" model.num_frames={frames}" if frames != m.num_frames else "")
                + " (non-square latents need data.pack=true)"
            )  # fmt: skip

    def _packed_iterator(self, train_set, source):
        """``data.pack`` / ``media.pack``: one pack per micro-batch, planned from each sample's
        size (feature shards: its stored shape; raw media: its bucket, before decoding). The
        pack count varies per step (same on every DP rank), so the iterator updates
        ``num_microbatches`` for the next step as each step ends."""
        from lumos_mcore.data.packing import PackedMicroBatchIterator
        from lumos_mcore.training.setup import unwrap

        job = self.job
        core = unwrap(self.chunks[0])
        cp = self.info.cp_size
        zigzag = cp > 1 and getattr(core, "cp_mode", "contiguous") == "zigzag"
        media = {}
        if job.media is not None:
            sizes = train_set.pack_sizes(
                downsample=self.encoder_facts.downsample, patch_size=job.model.patch_size
            )
            media = {"sizes": sizes, "collate": train_set.collate_pack}
        packed = PackedMicroBatchIterator(
            train_set,
            global_batch_size=job.train.global_batch_size,
            dp_rank=self.info.dp_rank,
            dp_size=self.info.dp_size,
            capacity=source.pack_capacity,
            patch_size=job.model.patch_size,
            cost=source.pack_cost,
            # PP sends fixed-size activations of seq_length = model.num_tokens tokens.
            pack_length=job.model.num_tokens if self.info.pp_size > 1 else None,
            token_multiple=2 * cp if zigzag else 1,
            # megatron's interleaved schedule runs a multiple of pp micro-batches.
            micro_batch_multiple=self.info.pp_size if self.info.vpp_size else 1,
            consumed_samples=self.consumed_samples_at(self.step),
            **media,
        )
        self._packed = packed
        self.num_microbatches = packed.num_micro_batches_now
        packed.on_global_batch = lambda n: setattr(self, "num_microbatches", n)
        return packed

    # -- checkpoints -----------------------------------------------------------------------
    def _resume(self) -> None:
        job = self.job
        self.checkpointer.remove_partial()
        path = self.checkpointer.latest() if job.checkpoint.resume else None
        if path is None and job.checkpoint.load:
            path = Path(job.checkpoint.load)
        if path is None and job.checkpoint.init_from:
            # A new stage from a previous stage's weights: fresh optimizer, schedule, step 0.
            try:
                _, self.init_report = self.checkpointer.load_weights(
                    job.checkpoint.init_from,
                    self.chunks,
                    self.optimizer,
                    self.ema,
                    strict=job.checkpoint.init_strict,
                    from_ema=job.checkpoint.init_from_ema,
                )
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"checkpoint.init_from={job.checkpoint.init_from}: {err}") from err
            if dist.get_rank() == 0:
                log.info(
                    "initialised from %s (weights only, %s): %s",
                    self.init_report.source,
                    "EMA weights" if job.checkpoint.init_from_ema else "training weights",
                    self.init_report.describe(),
                )
                if not self.init_report.ok:
                    log.warning("checkpoint.init_from: %s", self.init_report.describe())
            return
        if path is None:
            return
        state = self.checkpointer.load(path, self.chunks, self.optimizer, self.scheduler, self.ema)
        self.step = int(state["step"])
        self._newest = (self.step, str(path))
        self.nonfinite.total = int(state.get("nonfinite_skipped", 0))
        gbs = job.train.global_batch_size
        consumed = int(state.get("consumed_samples", self.step * gbs))
        self.first_sample = consumed - self.step * gbs
        if dist.get_rank() == 0:
            log.info("resumed from %s at step %d (%d samples consumed)", path, self.step, consumed)

    def consumed_samples_at(self, step: int) -> int:
        """Data position where ``step`` (0-based) starts: a resume continues with the samples
        the run would have read next even when ``train.global_batch_size`` changed."""
        return self.first_sample + step * self.job.train.global_batch_size

    def save(self) -> str:
        state = {
            "step": self.step,
            "consumed_samples": self.consumed_samples_at(self.step),
            "nonfinite_skipped": self.nonfinite.total,
            "model_config": config_to_dict(self.job.model),
            "job": config_to_dict(self.job),
        }
        path = self.checkpointer.save(
            self.step, self.chunks, self.optimizer, self.scheduler, self.ema, state
        )
        self._last_saved = str(path)
        self._newest = (self.step, self._last_saved)
        if dist.get_rank() == 0:
            how = "writing in the background:" if self.checkpointer.save_in_flight else "saved"
            log.info("%s checkpoint %s", how, path)
        return str(path)

    def _save_last_good(self) -> str:
        """The run stops on a non-finite step, which applied nothing: every rank saves the
        state it holds (the last good step) unless a checkpoint of that step exists, and waits
        for the write. Returns the sentence the error ends with."""
        if self.step == 0:
            return "No checkpoint was written: the first step of the run failed."
        if self._newest is None or self._newest[0] != self.step:
            self.save()
        self.checkpointer.finalize(blocking=True)
        return f"The last good state (step {self.step}) is in {self._newest[1]}."

    # -- one step --------------------------------------------------------------------------
    def _iterators(self):
        it = with_positions(
            self.data,
            start_step=self.step,
            first_sample=self.first_sample,
            num_microbatches=self.num_microbatches,
            global_batch_size=self.job.train.global_batch_size,
            dp_rank=self.info.dp_rank,
            dp_size=self.info.dp_size,
        )
        if len(self.chunks) == 1 or self._prefetch_steps:
            return it
        return list(itertools.tee(it, len(self.chunks)))  # every virtual stage sees each batch

    @property
    def _prefetch_steps(self) -> bool:
        """Raw media under pipeline parallelism: read each step's micro-batches before the
        schedule runs. Encoding broadcasts over the replica, which spans the stages, while
        megatron's 1F1B schedule has a later stage wait in ``recv_forward`` before it asks for
        its batch: the first stage would wait in the broadcast for a rank that waits for its
        activations. Reading the step up front puts every replica collective before the
        schedule's p2p traffic; the cost is holding one step's latents (not pixels)."""
        return self.encode_group is not None and self.info.pp_size > 1

    def _step_data(self, batches, num_microbatches: int):
        """The schedule's ``data_iterator`` for one step (see :attr:`_prefetch_steps`)."""
        if not self._prefetch_steps:
            return batches
        step = [next(batches) for _ in range(num_microbatches)]
        if len(self.chunks) == 1:
            return iter(step)
        return [iter(step) for _ in self.chunks]  # every virtual stage sees each batch

    def train_step(self, batches) -> dict[str, float]:
        """Forward/backward over the micro-batches, optimizer step, schedule, EMA."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        # Packs: reading a step's last pack already sets num_microbatches for the next step.
        num_microbatches = self.num_microbatches
        with phase("forward_backward"):
            losses = get_forward_backward_func()(
                forward_step_func=self.forward_step,
                data_iterator=self._step_data(batches, num_microbatches),
                model=self.chunks,
                num_microbatches=num_microbatches,
                seq_length=self.job.model.num_tokens,
                micro_batch_size=self.job.train.micro_batch_size,
                forward_only=False,
            )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        value = None  # this rank's step loss (last pipeline stage only)
        if self.info.is_last_stage:
            value = torch.stack([x["loss"] for x in losses]).mean().to(_device())
        with phase("nonfinite_check"):
            report = find_nonfinite(self.chunks, value, _device())
        if self.nonfinite.skip(self.step + 1, report):  # raises NonFiniteError to stop
            ok, grad_norm = False, None
        else:
            with phase("optimizer_step"):
                ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        if self.ema is not None and ok:
            with phase("ema"):
                self.ema.update(self.chunks)
        loss = float("nan")
        if value is not None:
            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(value, group=group)
            loss = float(value) / dist.get_world_size(group)
        return {
            "train/loss": loss,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/lr": lr,
            "train/update_ok": float(ok),
            "train/skipped_steps": float(self.nonfinite.total),
        }

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> TrainResult:
        job = self.job
        result = TrainResult(final_step=self.step)
        batches = self._iterators()
        if dist.get_rank() == 0:
            log.info(
                "training %s (%s) on %d ranks: tp=%d pp=%d cp=%d dp=%d, %d micro-batches/step, "
                "from step %d to %d",
                job.model.name,
                job.model.variant,
                self.info.world_size,
                self.info.tp_size,
                self.info.pp_size,
                self.info.cp_size,
                self.info.dp_size,
                self.num_microbatches,
                self.step,
                job.train.steps,
            )
        while self.step < job.train.steps:
            self.profiler.before_step(self.step + 1)
            t0 = time.perf_counter()
            try:
                m = self.train_step(batches)
            except NonFiniteError as err:
                raise NonFiniteError(f"{err} {self._save_last_good()}") from None
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.step += 1
            with phase("checkpoint_finalize"):
                self.checkpointer.finalize()  # an async save whose writers are done: commit it
            m.update(
                {
                    "throughput/step_time_ms": dt * 1e3,
                    "throughput/samples_per_s": job.train.global_batch_size / dt,
                    **self.throughput(dt, self.step - 1),
                    "memory/peak_gib": max_over_ranks(peak_memory_gib()),
                    "memory/estimate_gib": self.memory_estimate.total / 2**30,
                    "data/bad_samples": float(self.dataset.num_bad),
                    **{f"data/bad/{k}": float(v) for k, v in self.dataset.bad_counts.items()},
                    **self._pack_counts(),
                    **self.data.window(),
                }
            )
            if self.validator is not None and self.step % job.validation.interval == 0:
                with phase("validation"):
                    m.update(self.validate())
            if self.is_logging_rank:
                result.losses.append(m["train/loss"])
                self._append_metrics(m)
                self.metrics.scalars(self.step, m)
                if self.step % job.train.log_interval == 0 or self.step == 1:
                    self.metrics.progress(self.step, job.train.steps, m)
            stop = self.stop.agreed(step_seconds=dt)
            if (
                self.step % job.checkpoint.save_interval == 0
                or self.step == job.train.steps
                or stop
            ):
                with phase("checkpoint"):
                    self.save()
            self.profiler.after_step(self.step)
            if stop:
                why = "stop requested" if self.stop.requested else "train.max_minutes reached"
                log.warning("%s: checkpoint written at step %d, exiting", why, self.step)
                break
        with phase("checkpoint_finalize"):
            self.checkpointer.finalize(blocking=True)  # the last save is complete on return
        result.final_step = self.step
        result.checkpoint = self._last_saved
        self.profiler.close()
        self.metrics.close()
        self.data.close()
        return result

    def _drop_metrics_after(self, step: int) -> None:
        """Resumed at ``step``: records an interrupted run wrote for later steps are dropped
        (those steps run again), so metrics.jsonl holds each step once."""
        if not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if int(json.loads(line)["step"]) > step:
                    continue
            except (ValueError, KeyError, TypeError):  # a line cut by the kill
                continue
            keep.append(line)
        if len(keep) != len(lines):
            atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in keep))

    def _append_metrics(self, m: dict[str, float]) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        # Strict JSON (jq, pandas): a skipped step's NaN loss / grad norm is written as null.
        record = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()
        }
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": self.step, **record}, allow_nan=False) + "\n")

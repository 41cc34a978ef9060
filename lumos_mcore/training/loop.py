"""The training loop: megatron schedules + DDP + (distributed) optimizer + EMA + checkpoints."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
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
from lumos_mcore.parallel.state import init_distributed, initialize_parallel
from lumos_mcore.training.checkpoint import Checkpointer
from lumos_mcore.training.ema import EMA
from lumos_mcore.training.metrics import MetricsWriter, peak_memory_gib
from lumos_mcore.training.setup import build_model, build_optimizer, use_bf16
from lumos_mcore.training.step import DiffusionForwardStep, with_positions

log = logging.getLogger("lumos_mcore.train")


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports back."""

    final_step: int
    losses: list[float] = field(default_factory=list)  # logging rank only
    checkpoint: str | None = None


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM pre-emption) ask for a checkpoint and a clean exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread (embedded use)
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (one tiny all-reduce)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


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
        self.num_microbatches = job.train.num_microbatches(self.info.dp_size)
        self.chunks, self.tconfig = build_model(m, job.parallel, seed=job.train.seed)
        self.optimizer, self.scheduler = build_optimizer(
            self.chunks,
            job.optim,
            bf16=use_bf16(m),
            use_distributed_optimizer=job.parallel.use_distributed_optimizer,
            total_steps=job.train.steps,
        )
        self.ema = EMA(self.chunks, job.train.ema_decay) if job.train.ema_decay > 0 else None
        self.checkpointer = Checkpointer(job.checkpoint_dir, job.checkpoint.keep_last)
        self.step = 0
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
            out / "tensorboard", self.is_logging_rank and job.train.tensorboard
        )
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(job, out / "config.yaml")
        self.stop = _StopFlag()

    # -- data --------------------------------------------------------------------------------
    def _build_data(self):
        """Resumable DP-sliced micro-batches; raw media pass through the frozen encoders."""
        job = self.job
        if job.media is not None:
            from lumos_mcore.data.media.dataset import MediaDataset
            from lumos_mcore.encoders.frozen import FrozenEncoders, OnlineEncodingIterator

            self.dataset = MediaDataset(job.media)
            self.dataset.check_micro_batch_size(job.train.micro_batch_size)
            encoders = FrozenEncoders(job.media.encoders, seed=job.train.seed)
            _check_encoders_fit_model(encoders, job)
        else:
            self.dataset = FeatureDataset(job.data)
        data = MicroBatchIterator(
            self.dataset,
            global_batch_size=job.train.global_batch_size,
            micro_batch_size=job.train.micro_batch_size,
            dp_rank=self.info.dp_rank,
            dp_size=self.info.dp_size,
            consumed_samples=self.step * job.train.global_batch_size,
        )
        if job.media is not None:
            # One rank of each model replica encodes; the others receive its tensors.
            data = OnlineEncodingIterator(data, encoders, group=_replica_group(self.info.dp_rank))
        return StallTimer(data)

    # -- checkpoints -----------------------------------------------------------------------
    def _resume(self) -> None:
        job = self.job
        self.checkpointer.remove_partial()
        path = self.checkpointer.latest() if job.checkpoint.resume else None
        if path is None and job.checkpoint.load:
            path = Path(job.checkpoint.load)
        if path is None:
            return
        state = self.checkpointer.load(path, self.chunks, self.optimizer, self.scheduler, self.ema)
        self.step = int(state["step"])
        if dist.get_rank() == 0:
            log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> str:
        state = {
            "step": self.step,
            "consumed_samples": self.step * self.job.train.global_batch_size,
            "model_config": config_to_dict(self.job.model),
            "job": config_to_dict(self.job),
        }
        path = self.checkpointer.save(
            self.step, self.chunks, self.optimizer, self.scheduler, self.ema, state
        )
        if dist.get_rank() == 0:
            log.info("saved checkpoint %s", path)
        return str(path)

    # -- one step --------------------------------------------------------------------------
    def _iterators(self):
        it = with_positions(
            self.data,
            start_step=self.step,
            num_microbatches=self.num_microbatches,
            global_batch_size=self.job.train.global_batch_size,
            dp_rank=self.info.dp_rank,
            dp_size=self.info.dp_size,
        )
        if len(self.chunks) == 1:
            return it
        return list(itertools.tee(it, len(self.chunks)))  # every virtual stage sees each batch

    def train_step(self, batches) -> dict[str, float]:
        """Forward/backward over the micro-batches, optimizer step, schedule, EMA."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=batches,
            model=self.chunks,
            num_microbatches=self.num_microbatches,
            seq_length=self.job.model.num_tokens,
            micro_batch_size=self.job.train.micro_batch_size,
            forward_only=False,
        )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        if self.ema is not None and ok:
            self.ema.update(self.chunks)
        loss = float("nan")
        if self.info.is_last_stage:
            value = torch.stack([x["loss"] for x in losses]).mean().to(_device())
            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(value, group=group)
            loss = float(value) / dist.get_world_size(group)
        return {
            "train/loss": loss,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/lr": lr,
            "train/update_ok": float(ok),
        }

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> TrainResult:
        job = self.job
        result = TrainResult(final_step=self.step)
        tokens_per_step = job.train.global_batch_size * job.model.num_tokens
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
        last_saved = None
        while self.step < job.train.steps:
            t0 = time.perf_counter()
            m = self.train_step(batches)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.step += 1
            m.update(
                {
                    "throughput/step_time_ms": dt * 1e3,
                    "throughput/samples_per_s": job.train.global_batch_size / dt,
                    "throughput/tokens_per_s": tokens_per_step / dt,
                    "memory/peak_gib": peak_memory_gib(),
                    "data/bad_samples": float(self.dataset.num_bad),
                    **{f"data/bad/{k}": float(v) for k, v in self.dataset.bad_counts.items()},
                    **self.data.window(),
                }
            )
            if self.is_logging_rank:
                result.losses.append(m["train/loss"])
                self._append_metrics(m)
                self.metrics.scalars(self.step, m)
                if self.step % job.train.log_interval == 0 or self.step == 1:
                    self.metrics.progress(self.step, job.train.steps, m)
            stop = self.stop.agreed()
            if (
                self.step % job.checkpoint.save_interval == 0
                or self.step == job.train.steps
                or stop
            ):
                last_saved = self.save()
            if stop:
                log.warning("stop requested: checkpoint written at step %d, exiting", self.step)
                break
        result.final_step = self.step
        result.checkpoint = last_saved
        self.metrics.close()
        self.data.close()
        return result

    def _append_metrics(self, m: dict[str, float]) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": self.step, **m}) + "\n")

"""Optimizer, schedule, loop and checkpoint sections of a job config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lumos_mcore.config.parallel import interleaved_fits

LR_STYLES = ("constant", "linear", "cosine")
GRID_SAMPLERS = ("ddpm", "dpm++2m", "euler")


@dataclass
class OptimConfig:
    """AdamW (decoupled weight decay) with warm-up; defaults are the Lumos paper's I2I recipe."""

    lr: float = 1.6e-4
    min_lr: float | None = None  # None = lr (constant after warm-up)
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 1000
    lr_decay_style: str = "constant"
    lr_decay_steps: int | None = None  # None = train.steps

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr={self.lr}: must be a positive finite number")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr}: must lie in [0, optim.lr={self.lr}]")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay}: must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"optim.beta1/beta2=({self.beta1}, {self.beta2}): must be in [0, 1)")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad}: must be >= 0 (0 disables)")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.lr_decay_style not in LR_STYLES:
            raise ValueError(
                f"optim.lr_decay_style={self.lr_decay_style!r}: choose one of {', '.join(LR_STYLES)}"
            )


@dataclass
class TrainConfig:
    """The loop: how many steps, batch sizes, seeds, EMA, logging cadence, output folder."""

    steps: int = 1000
    micro_batch_size: int = 4
    global_batch_size: int = 16
    seed: int = 1234
    ema_decay: float = 0.9999  # 0 disables EMA weights
    log_interval: int = 10
    output_dir: str = "runs/lumos"
    tensorboard: bool = True
    # MFU denominator per rank in TFLOP/s; None = the GPU's spec peak (bf16 dense) on CUDA, a
    # matmul probe measured once at start-up on CPU (as tools/benchmark_throughput.py does).
    peak_tflops: float | None = None
    # Consecutive steps whose loss or gradients are not finite (NaN / Inf) that are skipped
    # (no update, no EMA; the step's samples are passed over) before the run stops. 0 stops at
    # the first such step. Either way the stop writes a checkpoint of the last good state.
    nonfinite_skips: int = 0
    # Wall-clock budget of the run in minutes, counted from the trainer's start (set-up
    # included): the run ends with a checkpoint after the last step that fits, like on SIGUSR1,
    # for schedulers that send no signal before their limit. Leave room for one save. None = off.
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        if not self.output_dir.strip():
            raise ValueError(
                "train.output_dir is empty: give the run folder (checkpoints, logs and metrics "
                "are written under it)"
            )
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"train.peak_tflops={self.peak_tflops}: must be positive or None")
        for flag in ("steps", "micro_batch_size", "global_batch_size", "log_interval"):
            if getattr(self, flag) <= 0:
                raise ValueError(f"train.{flag}={getattr(self, flag)}: must be positive")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size}: must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"train.max_minutes={self.max_minutes}: must be positive or None")
        if self.nonfinite_skips < 0:
            raise ValueError(
                f"train.nonfinite_skips={self.nonfinite_skips}: must be >= 0 (0 stops the run at "
                "the first step with a non-finite loss or gradient)"
            )

    def num_microbatches(self, dp: int, pp: int = 1, vpp: int | None = None) -> int:
        """Micro-batches per step on each data-parallel rank (validated against ``dp``; with
        interleaved pipeline stages megatron's schedule also needs a multiple of ``pp``)."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size}: must be a multiple of "
                f"train.micro_batch_size x data-parallel size = {self.micro_batch_size} x {dp}"
            )
        n = self.global_batch_size // per_step
        if not interleaved_fits(n, pp, vpp):
            raise ValueError(
                f"parallel.vpp={vpp}: the interleaved pipeline schedule runs a multiple of "
                f"parallel.pp={pp} micro-batches per step, but train.global_batch_size="
                f"{self.global_batch_size} gives {n} (micro batch {self.micro_batch_size} x "
                f"dp {dp}); make the global batch a multiple of {per_step * pp}"
            )
        return n


@dataclass
class CheckpointConfig:
    """Where and how often to save; resume picks up the newest complete checkpoint."""

    dir: str | None = None  # None = <train.output_dir>/checkpoints
    save_interval: int = 500
    resume: bool = True
    keep_last: int = 2  # 0 keeps all
    # Milestones: checkpoints at multiples of this step are kept besides the newest keep_last
    # (0 = none); a multiple of save_interval, so that saves land on them.
    keep_every: int = 0
    load: str | None = None  # explicit checkpoint folder to start from (weights + state)
    # Weights-only start (progressive stages 256 -> 512 -> 1024): a previous stage's megatron
    # checkpoint folder or checkpoint root (full training or weights-only export), or an HF
    # diffusers folder / Lumos-PixArt .pth / .safetensors file (converted on load). Only the
    # weights (and EMA) are read; optimizer, lr schedule and step start fresh. This run's own
    # checkpoints take precedence on resubmission.
    init_from: str | None = None
    init_strict: bool = True  # False: skip missing / unexpected / shape-mismatched keys, report
    init_from_ema: bool = False  # start the model from the source's EMA weights
    # Write the sharded tensors in a background process while training goes on; the folder is
    # renamed and `latest` updated once every rank's writer is done (at most one in flight).
    async_save: bool = False

    def __post_init__(self) -> None:
        if self.save_interval <= 0:
            raise ValueError(f"checkpoint.save_interval={self.save_interval}: must be positive")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last}: must be >= 0")
        if self.keep_every < 0 or self.keep_every % self.save_interval:
            raise ValueError(
                f"checkpoint.keep_every={self.keep_every}: must be 0 (no milestones) or a "
                f"multiple of checkpoint.save_interval={self.save_interval}, so that a "
                "checkpoint is written at every milestone step"
            )
        if self.init_from is not None and self.load is not None:
            raise ValueError(
                f"checkpoint.init_from={self.init_from}: give either checkpoint.load (resume the "
                f"full training state of {self.load}) or checkpoint.init_from (weights only), "
                "not both"
            )
        if self.init_from is not None and not self.init_from:
            raise ValueError("checkpoint.init_from='': give a checkpoint folder or root, or null")


@dataclass
class ValidationConfig:
    """Periodic validation: held-out loss (fixed noise/timesteps) and a sample grid.

    The held-out set is ``validation.path`` (precomputed feature shards with an ``index.json``,
    e.g. held-out media encoded by ``tools/encode_features.py``), or, with ``holdout=H > 0``,
    the last ``H`` samples of ``data.path``'s index (raw-media jobs: the last ``H`` usable
    samples of ``media.path``, decoded and encoded online like training): training never reads
    them (its epochs are ``N - H`` samples long) and validation uses the first ``num_samples``
    of them (``num_samples`` and ``grid_samples`` must be <= ``H``). The split depends only on
    ``H`` (not on ``interval``), so keep it fixed across the resumes of a run: changing it
    changes the training order. With neither, the first ``num_samples`` samples of
    ``data.path`` in index order are used, which are *not* held out (a warning says so);
    raw-media jobs need ``holdout`` or ``path``.
    """

    interval: int = 0  # steps between validations; 0 = off
    path: str | None = None  # held-out feature shards (index.json); None = training subset
    num_samples: int = 32  # held-out samples per validation (all DP ranks together)
    holdout: int = 0  # without path: reserve the last N samples of data.path / media.path
    seed: int = 0  # seeds the fixed noise / timesteps of every held-out sample
    ema: bool = True  # with EMA weights: also log val/loss_ema and sample with the EMA weights
    grid_samples: int = 4  # images (videos: frame strips) in val/samples; 0 = no grid
    grid_steps: int = 20  # sampler steps of the grid
    grid_sampler: str | None = None  # None = dpm++2m (ddpm objective) / euler (flow)
    grid_cfg_scale: float = 4.0  # classifier-free guidance of the grid; 1 = off

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"validation.interval={self.interval}: must be >= 0 (0 = off)")
        if self.num_samples < 1:
            raise ValueError(f"validation.num_samples={self.num_samples}: must be >= 1")
        if self.holdout < 0:
            raise ValueError(f"validation.holdout={self.holdout}: must be >= 0 (0 = none)")
        if self.holdout and self.path is not None:
            raise ValueError(
                f"validation.holdout={self.holdout} and validation.path={self.path}: set one "
                "(holdout carves the held-out set out of data.path; path is a separate one)"
            )
        if self.holdout and max(self.num_samples, self.grid_samples) > self.holdout:
            raise ValueError(
                f"validation.num_samples={self.num_samples} / validation.grid_samples="
                f"{self.grid_samples}: must be <= validation.holdout={self.holdout} (validation "
                "reads only the held-out samples)"
            )
        if self.seed < 0:
            raise ValueError(f"validation.seed={self.seed}: must be >= 0")
        if self.grid_samples < 0:
            raise ValueError(f"validation.grid_samples={self.grid_samples}: must be >= 0")
        if self.grid_steps < 1:
            raise ValueError(f"validation.grid_steps={self.grid_steps}: must be >= 1")
        if self.grid_sampler is not None and self.grid_sampler not in GRID_SAMPLERS:
            raise ValueError(
                f"validation.grid_sampler={self.grid_sampler!r}: choose one of "
                f"{', '.join(GRID_SAMPLERS)} (or leave unset)"
            )
        if self.grid_cfg_scale < 1.0:
            raise ValueError(f"validation.grid_cfg_scale={self.grid_cfg_scale}: must be >= 1")
        if self.path is not None and not (Path(self.path) / "index.json").is_file():
            raise ValueError(
                f"validation.path={self.path}: no index.json found; point it at held-out "
                "feature shards (tools/encode_features.py, tools/make_synthetic_shards.py)"
            )

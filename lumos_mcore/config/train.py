"""Optimizer, schedule, loop and checkpoint sections of a job config."""

from __future__ import annotations

from dataclasses import dataclass

LR_STYLES = ("constant", "linear", "cosine")


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
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: must be positive")
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

    def __post_init__(self) -> None:
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

    def num_microbatches(self, dp: int) -> int:
        """Micro-batches per step on each data-parallel rank (validated against ``dp``)."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size}: must be a multiple of "
                f"train.micro_batch_size x data-parallel size = {self.micro_batch_size} x {dp}"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    """Where and how often to save; resume picks up the newest complete checkpoint."""

    dir: str | None = None  # None = <train.output_dir>/checkpoints
    save_interval: int = 500
    resume: bool = True
    keep_last: int = 2  # 0 keeps all
    load: str | None = None  # explicit checkpoint folder to start from (weights + state)

    def __post_init__(self) -> None:
        if self.save_interval <= 0:
            raise ValueError(f"checkpoint.save_interval={self.save_interval}: must be positive")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last}: must be >= 0")

"""Progress lines, TensorBoard scalars and memory readings for the training loop."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import psutil
import torch

log = logging.getLogger("lumos_mcore.train")


def peak_memory_gib() -> float:
    """Peak accelerator memory on CUDA; resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class MetricsWriter:
    """Writes scalars to TensorBoard and progress lines to the log (logging rank only)."""

    def __init__(
        self, log_dir: str | os.PathLike | None, enabled: bool, resume_step: int = 0
    ) -> None:
        """``resume_step``: the checkpoint's step; TensorBoard drops what an interrupted run
        logged after it (those steps are trained again), so no curve shows them twice."""
        self.enabled = enabled
        self.tb = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            purge = resume_step + 1 if resume_step > 0 else None
            self.tb = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)

    def image(self, tag: str, step: int, image) -> None:
        """An ``[H, W, 3]`` uint8 image (e.g. the validation sample grid)."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def progress(self, step: int, total: int, m: dict[str, float]) -> None:
        if not self.enabled:
            return
        log.info(
            "step %d/%d | loss %.4f | lr %.3e | grad-norm %.3f | %.1f samples/s | "
            "%.0f tokens/s | %.0f ms/step | mem %.2f GiB",
            step,
            total,
            m["train/loss"],
            m["train/lr"],
            m["train/grad_norm"],
            m["throughput/samples_per_s"],
            m["throughput/tokens_per_s"],
            m["throughput/step_time_ms"],
            m["memory/peak_gib"],
        )
        if "throughput/mfu" in m:
            log.info(
                "step %d | %.3f TFLOP/s (all ranks) | MFU %.1f%%",
                step,
                m["throughput/tflops_per_s"],
                100 * m["throughput/mfu"],
            )

    def validation(self, step: int, m: dict[str, float]) -> None:
        if self.enabled:
            ema = f" | val loss (EMA) {m['val/loss_ema']:.4f}" if "val/loss_ema" in m else ""
            log.info("step %d | val loss %.4f%s", step, m["val/loss"], ema)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()

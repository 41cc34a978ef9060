"""The diffusion training step as megatron's ``forward_step_func``.

megatron's schedules call ``forward_step(data_iterator, model)`` once per micro-batch on every
pipeline stage, and ``loss_func(output)`` on the last stage. Every stage of a model replica must
therefore draw *the same* timesteps, noise and condition-dropout decisions for a micro-batch
without talking to each other. We seed a generator per sample from ``(seed, global position)``,
where the global position of a sample is its index in the stream of training samples
(``step * global_batch + offset``). The draws are then identical on all TP/PP/CP ranks of a
replica, independent of the data-parallel size (DP=2 sees the noise DP=1 sees), and reproduced
exactly after a resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from lumos_mcore.diffusion.objective import DiffusionObjective

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: decorrelates neighbouring seeds


def sample_seed(seed: int, position: int) -> int:
    """Seed of the generator for one training sample (stable across layouts and resumes)."""
    return (seed * _MIX + position * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


@dataclass
class DiffusionDraws:
    """Per-sample random draws of one micro-batch."""

    t: Tensor  # [B] objective timesteps
    noise: Tensor  # [B, C, ...]
    drop: Tensor  # [B] bool: use the null condition (classifier-free guidance training)


def draw_for_positions(
    objective: DiffusionObjective,
    positions: list[int],
    latent_shape: tuple[int, ...],
    *,
    seed: int,
    cond_dropout: float,
) -> DiffusionDraws:
    """Timestep, noise and dropout for each sample, from its own seeded generator."""
    ts, noises, drops = [], [], []
    for pos in positions:
        g = torch.Generator().manual_seed(sample_seed(seed, pos))
        ts.append(objective.sample_timesteps(1, generator=g))  # [1]
        noises.append(torch.randn(latent_shape, generator=g))  # [C, ...]
        drops.append(torch.rand(1, generator=g) < cond_dropout)  # [1]
    return DiffusionDraws(torch.cat(ts), torch.stack(noises), torch.cat(drops))


def with_positions(
    batches: Iterator[dict],
    *,
    start_step: int,
    num_microbatches: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> Iterator[dict]:
    """Attach each sample's global position (``"position"`` ``[B]`` long) to the micro-batches.

    Micro-batch ``m`` of step ``s`` on DP rank ``r`` covers positions
    ``s * GB + r * GB / dp + m * mbs + [0, mbs)`` — the same layout the data sampler uses.
    """
    per_rank = global_batch_size // dp_size
    k = start_step * num_microbatches
    for batch in batches:
        step, m = divmod(k, num_microbatches)
        b = batch["latent"].shape[0]
        start = step * global_batch_size + dp_rank * per_rank + m * b
        batch["position"] = torch.arange(start, start + b)
        k += 1
        yield batch


class DiffusionForwardStep:
    """Callable ``forward_step_func`` for megatron's ``get_forward_backward_func()``.

    Micro-batches must carry ``"position"`` (see :func:`with_positions`).
    """

    def __init__(
        self,
        objective: DiffusionObjective,
        *,
        seed: int,
        cond_dropout: float,
        device: torch.device,
    ) -> None:
        self.objective = objective
        self.seed = seed
        self.cond_dropout = cond_dropout
        self.device = device

    def __call__(self, data_iterator: Iterator[dict], model: torch.nn.Module, *args):
        batch = next(data_iterator)
        x0 = batch["latent"].to(self.device, non_blocking=True).float()  # [B, C, H, W]
        cond = batch["cond"].to(self.device, non_blocking=True)  # [B, Lc, Cc]
        cond_mask = batch.get("cond_mask")
        if cond_mask is not None:
            cond_mask = cond_mask.to(self.device, non_blocking=True)  # [B, Lc]
            if bool(cond_mask.all()):
                cond_mask = None  # no padding: skip masking work
        draws = draw_for_positions(
            self.objective,
            batch["position"].tolist(),
            tuple(x0.shape[1:]),
            seed=self.seed,
            cond_dropout=self.cond_dropout,
        )
        t = draws.t.to(self.device)  # [B]
        noise = draws.noise.to(self.device)  # [B, C, H, W]
        x_t = self.objective.add_noise(x0, noise, t)  # [B, C, H, W]
        extra = {}
        if "resolution" in batch:
            extra["resolution"] = batch["resolution"].to(self.device)  # [B, 2]
            extra["aspect_ratio"] = batch["aspect_ratio"].to(self.device)  # [B, 1]
        output = model(
            latents=x_t,
            timesteps=self.objective.model_timesteps(t),
            cond=cond,
            cond_mask=cond_mask,
            force_drop_ids=draws.drop.to(self.device),
            **extra,
        )  # last stage: [B, C_out, H, W]; other stages: hidden states
        return output, partial(self.loss_func, x0=x0, x_t=x_t, noise=noise, t=t)

    def loss_func(self, output: Tensor, *, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor):
        """Mean per-sample loss of the micro-batch (megatron divides by #micro-batches)."""
        terms = self.objective.loss_terms(output.float(), x0=x0, x_t=x_t, noise=noise, t=t)
        loss = terms["loss"].mean()
        reported = {k: v.detach().mean() for k, v in terms.items()}
        return loss, reported

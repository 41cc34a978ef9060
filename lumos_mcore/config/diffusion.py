"""Configuration of the diffusion objective (section ``diffusion.``).

Two objectives share one config so a recipe switches between them with a single override
(``diffusion.objective=flow``):

* ``ddpm`` — the DiT / PixArt-alpha objective (IDDPM): discrete timesteps, ε-prediction, and with
  ``learn_sigma`` a learned interpolation between log β_t and log β̃_t trained by the VLB term.
* ``flow`` — rectified flow (Lumina / SD3): linear path, velocity target, logit-normal timesteps.

``learn_sigma`` with ``flow``: allowed on purpose. The flag decides the model's output width
(2C channels); the flow objective reads only the first C channels, so a DDPM-pretrained
checkpoint (2C head) can be fine-tuned with flow matching without reshaping its final layer.
The last C channels then receive zero gradient and are ignored by the flow sampler.
``vlb_weight`` has no effect under ``flow``.
"""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("ddpm", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class DiffusionConfig:
    """Noise process, training objective and condition dropout."""

    objective: str = "ddpm"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    learn_sigma: bool = True
    vlb_weight: float = 1.0
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    flow_shift: float = 1.0  # t -> s·t / (1 + (s-1)·t): training draws and sampling grid alike
    cond_dropout: float = 0.1

    def model_out_channels(self, in_channels: int) -> int:
        """Channels the denoiser must output: ε (or velocity), plus the σ interpolation if learned."""
        return 2 * in_channels if self.learn_sigma else in_channels

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"diffusion.objective={self.objective!r}: unknown objective; "
                f"choose one of {', '.join(OBJECTIVES)}"
            )
        min_steps = 2 if self.objective == "ddpm" else 1
        if self.num_train_timesteps < min_steps:
            raise ValueError(
                f"diffusion.num_train_timesteps={self.num_train_timesteps}: must be >= {min_steps} "
                f"for objective {self.objective!r}"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"diffusion.beta_schedule={self.beta_schedule!r}: unknown schedule; "
                f"choose one of {', '.join(BETA_SCHEDULES)}"
            )
        if self.beta_schedule in ("linear", "scaled_linear"):
            if not 0.0 < self.beta_start < 1.0:
                raise ValueError(f"diffusion.beta_start={self.beta_start}: must lie in (0, 1)")
            if not self.beta_start <= self.beta_end < 1.0:
                raise ValueError(
                    f"diffusion.beta_end={self.beta_end}: must lie in "
                    f"[diffusion.beta_start={self.beta_start}, 1)"
                )
        if self.vlb_weight < 0.0:
            raise ValueError(f"diffusion.vlb_weight={self.vlb_weight}: must be >= 0")
        if not self.flow_logit_std > 0.0:
            raise ValueError(f"diffusion.flow_logit_std={self.flow_logit_std}: must be > 0")
        if not self.flow_shift > 0.0:
            raise ValueError(f"diffusion.flow_shift={self.flow_shift}: must be > 0")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(
                f"diffusion.cond_dropout={self.cond_dropout}: must lie in [0, 1) "
                "(1 would never train the conditional model)"
            )

"""Noise processes, training objectives (DDPM ε + learned σ, flow matching) and samplers."""

from lumos_mcore.diffusion.flow import FlowMatching, shift_time
from lumos_mcore.diffusion.gaussian import GaussianDiffusion, get_betas, space_timesteps
from lumos_mcore.diffusion.objective import DiffusionObjective, build_objective, masked_mean
from lumos_mcore.diffusion.samplers import (
    cfg_model_fn,
    ddpm_sample,
    dpm_solver_sample,
    flow_euler_sample,
    sample,
)

__all__ = [
    "DiffusionObjective",
    "FlowMatching",
    "GaussianDiffusion",
    "build_objective",
    "cfg_model_fn",
    "ddpm_sample",
    "dpm_solver_sample",
    "flow_euler_sample",
    "get_betas",
    "masked_mean",
    "sample",
    "shift_time",
    "space_timesteps",
]

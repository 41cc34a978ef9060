"""Imported once by the forkserver that ``tests.dist_utils`` forks ranks from (CPU only).

Everything the rank functions of the suite import, so that no rank pays for it: torch,
megatron-core, the library, and the frozen-encoder / decoding stacks the media tests use.
A module that fails to import is left to the rank that needs it (which then reports the error
itself), so a broken optional package cannot take the server down.
"""

from __future__ import annotations

import contextlib
import importlib

MODULES = (
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.dist_checkpointing",
    "megatron.core.pipeline_parallel",
    "lumos_mcore.training.loop",
    "lumos_mcore.sample",
    "lumos_mcore.data.packing",
    "lumos_mcore.data.media.dataset",
    "lumos_mcore.data.media.dali_decode",
    "lumos_mcore.encoders.frozen",
    "lumos_mcore.models.dit.packing",
    "diffusers.models.autoencoders.autoencoder_kl",
    "transformers.models.auto.modeling_auto",
    "transformers.models.t5.modeling_t5",
    "transformers.models.dinov2.modeling_dinov2",
    "nvidia.dali.pipeline",
    "nvidia.dali.fn",
)

for _name in MODULES:
    with contextlib.suppress(Exception):  # the rank that needs it will raise it
        importlib.import_module(_name)

"""Pure-PyTorch, diffusers-style model classes (no megatron import): the Hugging Face export
format of the engine and the numerical reference for the megatron models."""

from lumos_mcore.hf.lumos_transformer_2d import (
    LumosBlock,
    LumosCrossAttention,
    LumosSelfAttention,
    LumosTransformer2DModel,
)
from lumos_mcore.hf.lumos_transformer_3d import LumosTransformer3DModel, LumosVideoBlock

__all__ = [
    "LumosBlock",
    "LumosCrossAttention",
    "LumosSelfAttention",
    "LumosTransformer2DModel",
    "LumosTransformer3DModel",
    "LumosVideoBlock",
]

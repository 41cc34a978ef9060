"""Pure-PyTorch pieces shared by every Lumos model (no megatron import): embeddings, output
layer, (un)patchify helpers and the size-named backbone registry."""

from lumos_mcore.models.common.embeddings import (
    ConditionEmbedder,
    FinalLayer,
    Mlp,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    get_3d_sincos_pos_embed,
    modulate,
    patchify,
    timestep_embedding,
    unpatchify,
)
from lumos_mcore.models.common.registry import MODEL_SIZES, DiTSize, get_model_size

__all__ = [
    "MODEL_SIZES",
    "ConditionEmbedder",
    "DiTSize",
    "FinalLayer",
    "Mlp",
    "PatchEmbed",
    "SizeEmbedder",
    "TimestepEmbedder",
    "get_1d_sincos_pos_embed",
    "get_2d_sincos_pos_embed",
    "get_3d_sincos_pos_embed",
    "get_model_size",
    "modulate",
    "patchify",
    "timestep_embedding",
    "unpatchify",
]

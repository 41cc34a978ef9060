"""Pure-PyTorch pieces shared by every Lumos model (no megatron import): embeddings, output
layer, (un)patchify helpers, rotary position frequencies and the size-named backbone registry."""

from lumos_mcore.models.common.embeddings import (
    CameraEmbedder,
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
    patchify_video,
    sincos_pos_embed_from_coords,
    timestep_embedding,
    token_coords,
    unpatchify,
    unpatchify_video,
)
from lumos_mcore.models.common.registry import MODEL_SIZES, DiTSize, get_model_size
from lumos_mcore.models.common.rope import rope_axes_dims, rope_freqs

__all__ = [
    "MODEL_SIZES",
    "CameraEmbedder",
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
    "patchify_video",
    "rope_axes_dims",
    "rope_freqs",
    "sincos_pos_embed_from_coords",
    "timestep_embedding",
    "token_coords",
    "unpatchify",
    "unpatchify_video",
]

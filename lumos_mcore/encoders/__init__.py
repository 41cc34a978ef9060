"""Frozen encoders for training from raw media: SD-style VAE, DINO (CLS / patch), T5.

Each loads from a local Hugging Face directory (never downloads), runs in eval mode under
``torch.no_grad`` with ``requires_grad=False``. ``FrozenEncoders.encode`` maps a decoded
``MediaDataset`` batch to the ``latent`` / ``cond`` / ``cond_mask`` batch the training step reads
(online mode); ``tools/encode_features.py`` runs the same encoders once and writes feature shards
(offline mode). diffusers / transformers are imported when an encoder is built.
"""

from lumos_mcore.encoders.dino import FrozenDINO
from lumos_mcore.encoders.frozen import FrozenEncoders, OnlineEncodingIterator
from lumos_mcore.encoders.t5 import FrozenT5
from lumos_mcore.encoders.vae import FrozenVAE

__all__ = ["FrozenDINO", "FrozenEncoders", "FrozenT5", "FrozenVAE", "OnlineEncodingIterator"]

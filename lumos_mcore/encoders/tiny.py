"""Tiny randomly-initialised encoders saved as local Hugging Face directories.

For tests and the CPU demo: the same loaders and code paths as the real SD-VAE / DINO / T5
checkpoints, at a size that runs in milliseconds and without any download. The tiny VAE keeps
the factor-8 downsampling of the SD-VAE (four blocks), so bucket sizes and latent sizes relate
as they do with the real one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lumos_mcore.data.media.synthetic import _COLORS, _SHAPES

_WORDS = (
    *("a", "an", "the", "over", "under", "and", "of", "with", "on", "in", "at", "to", "is"),
    *("from", "by", "drifting", "moving", "up", "down", "left", "right", "gradient"),
    *("background", "image", "video", "photo", "picture", "small", "large", "bright", "dark"),
)


def save_tiny_vae(out: str | os.PathLike, *, seed: int = 0, latent_channels: int = 4) -> Path:
    return save_random_vae(
        out, seed=seed, latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8),
        layers_per_block=1, norm_num_groups=4, sample_size=64,
    )  # fmt: skip


def save_random_vae(
    out: str | os.PathLike,
    *,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    norm_num_groups: int,
    sample_size: int,
    seed: int = 0,
    latent_channels: int = 4,
) -> Path:
    """A randomly initialised diffusers ``AutoencoderKL`` saved to ``out``: the tiny test VAE,
    or the SD-VAE's shape (``(128, 256, 512, 512)``, 2 layers per block, 32 groups) where a
    benchmark needs its cost per frame."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )
    vae.save_pretrained(out)
    return Path(out)


def save_tiny_dino(
    out: str | os.PathLike, *, seed: int = 0, kind: str = "dinov2", hidden_size: int = 32
) -> Path:
    """A 2-layer DINOv2 (or ViT) with patch 8, plus a preprocessor_config.json."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(seed)
    common = {
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 8,
        "image_size": 32,
    }
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(mlp_ratio=2, **common))
    elif kind == "vit":
        model = ViTModel(
            ViTConfig(intermediate_size=2 * hidden_size, **common), add_pooling_layer=False
        )
    else:
        raise ValueError(f"kind={kind!r}: choose dinov2 or vit")
    model.save_pretrained(out)
    with open(Path(out) / "preprocessor_config.json", "w") as f:
        json.dump(
            {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, f, indent=1
        )
    return Path(out)


def save_tiny_t5(out: str | os.PathLike, *, seed: int = 0, d_model: int = 32) -> Path:
    """A 2-layer T5 encoder and a word-level tokenizer (T5 ids: pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = sorted(set(_WORDS) | set(_COLORS) | set(_SHAPES))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(out)
    return Path(out)


def save_tiny_encoders(out_dir: str | os.PathLike, *, seed: int = 0) -> dict[str, Path]:
    """``{"vae", "dino", "t5"}`` -> directories under ``out_dir`` (use as media.encoders.*)."""
    out = Path(out_dir)
    return {
        "vae": save_tiny_vae(out / "vae", seed=seed),
        "dino": save_tiny_dino(out / "dino", seed=seed + 1),
        "t5": save_tiny_t5(out / "t5", seed=seed + 2),
    }

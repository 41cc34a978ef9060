"""Frozen DINO (transformers ``ViTModel`` / ``Dinov2Model``): CLS or patch tokens of an image."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from lumos_mcore.encoders.common import freeze, resolve_device, resolve_dtype

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")


class FrozenDINO:
    """Condition tokens from a self-supervised ViT.

    Preprocessing follows the DINO image processors: shorter side resized to ``image_size``
    (bicubic, antialiased), centre crop ``image_size`` x ``image_size``, ImageNet mean/std
    (or the ones in the directory's ``preprocessor_config.json``). ``cls`` returns the final
    CLS token L2-normalised ``[B, 1, D]`` (Lumos I2I); ``patch`` the patch tokens ``[B, N, D]``
    (register tokens excluded).
    """

    def __init__(
        self,
        path: str,
        *,
        image_size: int = 224,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = "fp32",
    ) -> None:
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        if config.model_type not in _MODEL_TYPES:
            raise ValueError(
                f"media.encoders.dino={path}: model_type {config.model_type!r} is not a DINO "
                f"backbone; expected one of {_MODEL_TYPES}"
            )
        self.patch_size = int(config.patch_size)
        if image_size % self.patch_size:
            raise ValueError(
                f"media.encoders.dino_image_size={image_size}: not a multiple of the patch size "
                f"{self.patch_size}"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        model = AutoModel.from_pretrained(path, **kwargs)
        self.model = freeze(model.to(device=self.device, dtype=self.dtype))
        self.is_vit = config.model_type == "vit"
        self.num_registers = int(getattr(config, "num_register_tokens", 0) or 0)
        self.hidden_size = int(config.hidden_size)
        self.image_size = image_size
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        proc = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(proc):
            with open(proc) as f:
                p = json.load(f)
            mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised [B, 3, S, S]."""
        x = (pixels.to(self.device, torch.float32) + 1.0) * 0.5  # [B, 3, H, W] in [0, 1]
        h, w = x.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top : top + side, left : left + side]  # [B, 3, side, side]
        if side != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size,) * 2, mode="bicubic", antialias=True, align_corners=False
            )  # [B, 3, S, S]
        return ((x - self.mean) / self.std).to(self.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, *, tokens: str = "cls") -> torch.Tensor:
        """``tokens="cls"``: [B, 1, D] unit-norm; ``"patch"``: [B, N, D]. Float32."""
        if tokens not in ("cls", "patch"):
            raise ValueError(f"tokens={tokens!r}: choose cls or patch")
        kwargs = {"interpolate_pos_encoding": True} if self.is_vit else {}
        hidden = self.model(
            pixel_values=self.preprocess(pixels), **kwargs
        ).last_hidden_state.float()  # [B, 1 + R + N, D], after the final layer norm
        if tokens == "cls":
            return F.normalize(hidden[:, :1], dim=-1)  # [B, 1, D]
        return hidden[:, 1 + self.num_registers :].contiguous()  # [B, N, D]

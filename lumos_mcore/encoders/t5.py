"""Frozen T5 encoder (transformers ``T5EncoderModel``) over captions, padded to a fixed length."""

from __future__ import annotations

import torch

from lumos_mcore.encoders.common import freeze, resolve_device, resolve_dtype


class FrozenT5:
    """Caption -> ``[B, L, D]`` token features and ``[B, L]`` mask (True = real token).

    Captions are tokenised to exactly ``max_length`` tokens (PixArt-alpha: 120), truncated or
    padded; features at padding positions are zeroed so stored features do not depend on what
    the encoder computes for padding.
    """

    def __init__(
        self,
        path: str,
        *,
        max_length: int = 120,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = "fp32",
    ) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = T5EncoderModel.from_pretrained(path)
        self.model = freeze(model.to(device=self.device, dtype=self.dtype))
        self.max_length = max_length
        self.hidden_size = int(model.config.d_model)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            list(captions),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tok["input_ids"], tok["attention_mask"]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, L, D] (float32) and mask [B, L] (bool)."""
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        mask = mask.bool()
        return hidden.float() * mask[..., None], mask

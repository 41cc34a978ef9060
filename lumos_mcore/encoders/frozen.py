"""The frozen encoders as one step: a decoded raw-media batch -> the model's training inputs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from lumos_mcore.config.media import EncodersConfig
from lumos_mcore.encoders.dino import FrozenDINO
from lumos_mcore.encoders.t5 import FrozenT5
from lumos_mcore.encoders.vae import FrozenVAE

_PASS_THROUGH = ("index", "resolution", "aspect_ratio", "camera_pose")


class FrozenEncoders:
    """VAE latents plus condition tokens, exactly the keys ``FeatureDataset`` batches carry.

    ``encode(raw_batch)`` takes a ``MediaDataset`` micro-batch (``pixels`` [B, 3, (T,) H, W] in
    [-1, 1], ``caption`` list) and returns ``latent`` [B, C, (T,) h, w], ``cond`` [B, Lc, Dc],
    ``cond_mask`` [B, Lc] (+ ``index``, ``resolution``, ``aspect_ratio``, ``camera_pose`` passed
    through). Videos are conditioned on the DINO features of their first frame. Everything runs
    under ``torch.no_grad`` with the encoders in eval mode and ``requires_grad=False``.
    """

    def __init__(self, cfg: EncodersConfig, *, seed: int = 0) -> None:
        cfg.check_complete()
        self.cfg = cfg
        self.seed = seed
        common = {"device": cfg.device, "dtype": cfg.dtype}
        self.vae = FrozenVAE(
            cfg.vae,  # type: ignore[arg-type]
            subfolder=cfg.vae_subfolder,
            sampling=cfg.vae_sampling,
            scaling_factor=cfg.vae_scaling_factor,
            batch=cfg.vae_batch,
            **common,
        )
        self.dino: FrozenDINO | None = None
        self.t5: FrozenT5 | None = None
        if cfg.cond in ("dino_cls", "dino_patch"):
            self.dino = FrozenDINO(cfg.dino, image_size=cfg.dino_image_size, **common)  # type: ignore[arg-type]
        else:
            self.t5 = FrozenT5(cfg.t5, max_length=cfg.t5_max_length, **common)  # type: ignore[arg-type]
        self.device = self.vae.device

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def cond_dim(self) -> int:
        """Dc: what ``model.cond_channels`` must be."""
        return self.dino.hidden_size if self.dino is not None else self.t5.hidden_size  # type: ignore[union-attr]

    @property
    def cond_tokens(self) -> int:
        """Lc: what ``model.cond_tokens`` must be."""
        if self.cfg.cond == "dino_cls":
            return 1
        if self.cfg.cond == "dino_patch":
            return self.dino.num_patches  # type: ignore[union-attr]
        return self.cfg.t5_max_length

    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels = batch["pixels"]  # [B, 3, (T,) H, W]
        seeds = None
        if self.cfg.vae_sampling == "sample":
            seeds = [self.seed * 1_000_003 + int(i) for i in batch["index"].tolist()]
        latent = self.vae.encode(pixels, seeds=seeds)  # [B, C, (T,) h, w]
        if self.dino is not None:
            image = pixels[:, :, 0] if pixels.dim() == 5 else pixels  # [B, 3, H, W]
            tokens = "cls" if self.cfg.cond == "dino_cls" else "patch"
            cond = self.dino.encode(image, tokens=tokens)  # [B, Lc, D]
            mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)  # [B, Lc]
        else:
            cond, mask = self.t5.encode(batch["caption"])  # type: ignore[union-attr]  # [B, L, D]
        out = {"latent": latent, "cond": cond, "cond_mask": mask}
        for k in _PASS_THROUGH:
            if k in batch:
                out[k] = batch[k]
        return out


class OnlineEncodingIterator:
    """Wraps the raw-media ``MicroBatchIterator`` so the trainer sees feature batches.

    Encoding happens in the consuming thread (on the training device), after the prefetch
    threads decoded the pixels. ``consumed_samples``, ``state_dict``, ``load_state_dict`` and
    ``close`` are those of the wrapped iterator, so checkpoints and resume are unchanged.

    ``group``: the ranks that read the same samples (one model replica: TP x PP x CP). Only its
    first rank runs the encoders; the others receive ``latent`` / ``cond`` / ``cond_mask`` by
    broadcast. That saves the repeated encoder work and guarantees bit-identical inputs on all
    ranks of a replica, which GPU kernels do not promise when each rank encodes for itself.
    """

    def __init__(self, batches: Any, encoders: Any, *, group: Any = None) -> None:
        self.batches = batches
        self.encoders = encoders
        self.group = group
        self.src: int | None = None
        if group is not None:
            import torch.distributed as dist

            self.src = dist.get_process_group_ranks(group)[0]
            if dist.get_world_size(group) == 1:
                self.group = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        raw = next(self.batches)
        if self.group is None:
            return self.encoders.encode(raw)
        return self._encode_and_broadcast(raw)

    def _encode_and_broadcast(self, raw: dict[str, Any]) -> dict[str, Any]:
        import torch.distributed as dist

        keys = ("latent", "cond", "cond_mask")
        if dist.get_rank() == self.src:
            out = self.encoders.encode(raw)
            meta: list[Any] = [[(k, tuple(out[k].shape), str(out[k].dtype)) for k in keys]]
        else:
            out, meta = {}, [None]
        dist.broadcast_object_list(meta, src=self.src, group=self.group)
        device = getattr(self.encoders, "device", torch.device("cpu"))
        for k, shape, dtype in meta[0]:
            if k not in out:
                out[k] = torch.empty(
                    shape, dtype=getattr(torch, dtype.split(".")[-1]), device=device
                )
            if out[k].dtype == torch.bool:  # not every backend broadcasts bool
                flat = out[k].to(torch.uint8)
                dist.broadcast(flat, src=self.src, group=self.group)
                out[k] = flat.bool()
            else:
                dist.broadcast(out[k], src=self.src, group=self.group)
        for k in _PASS_THROUGH:
            if k in raw:
                out[k] = raw[k]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batches, name)

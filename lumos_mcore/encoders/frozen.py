"""The frozen encoders as one step: a decoded raw-media batch -> the model's training inputs.

Dense micro-batches (one bucket) are encoded in one call per encoder. Packs (``media.pack``)
hold samples of several buckets: each same-shape group is encoded as one batch and the
per-sample results are assembled into ``DiffusionForwardStep.prepare_packed``'s format by the
feature packer's own :func:`~lumos_mcore.data.packing.collate_pack`, so both sources give the
step the same pack layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lumos_mcore.config.media import EncodersConfig
from lumos_mcore.encoders.dino import FrozenDINO
from lumos_mcore.encoders.t5 import FrozenT5
from lumos_mcore.encoders.vae import FrozenVAE

_PASS_THROUGH = ("index", "resolution", "aspect_ratio", "camera_pose")
# Per-sample encoder outputs of a pack, broadcast from the replica's encoding rank.
_PACK_KEYS = ("latent", "cond", "cond_mask")


@dataclass(frozen=True)
class EncoderFacts:
    """What the trainer must know of the frozen encoders without loading them: the shapes they
    produce, read from the local config.json files. Ranks that receive their replica's
    encodings by broadcast keep only these, so the encoder weights sit on one rank per replica.
    """

    latent_channels: int  # C of the VAE latents: model.in_channels
    downsample: int  # VAE spatial factor (2 ** (levels - 1))
    cond_dim: int  # Dc: model.cond_channels
    cond_tokens: int  # Lc: model.cond_tokens

    @classmethod
    def read(cls, cfg: EncodersConfig) -> EncoderFacts:
        cfg.check_complete()
        vae = _read_json(Path(cfg.vae) / cfg.vae_subfolder / "config.json")  # type: ignore[arg-type]
        if cfg.cond == "t5":
            dim, tokens = (
                int(_read_json(Path(cfg.t5) / "config.json")["d_model"]),
                cfg.t5_max_length,
            )  # type: ignore[arg-type]
        else:
            dino = _read_json(Path(cfg.dino) / "config.json")  # type: ignore[arg-type]
            dim = int(dino["hidden_size"])
            side = cfg.dino_image_size // int(dino["patch_size"])
            tokens = 1 if cfg.cond == "dino_cls" else side * side
        return cls(
            latent_channels=int(vae["latent_channels"]),
            downsample=2 ** (len(vae["block_out_channels"]) - 1),
            cond_dim=dim,
            cond_tokens=tokens,
        )


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_pack(batch: dict[str, Any]) -> bool:
    """A raw pack (``MediaDataset.collate_pack``): ``pixels`` is a list of differently shaped
    samples rather than one ``[B, ...]`` tensor."""
    return isinstance(batch.get("pixels"), list)


def assemble_pack(raw: dict[str, Any], encoded: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """A raw pack + its per-sample encodings -> ``prepare_packed``'s batch.

    ``encoded``: ``latent`` ``n x [C, (T,) h, w]``, ``cond`` ``n x [Lc, Dc]``, ``cond_mask``
    ``n x [Lc]`` in pack order. Runs on every rank of a replica (deterministic), so only the
    encoder outputs travel by broadcast.
    """
    from lumos_mcore.data.packing import collate_pack

    index = raw["index"].tolist()
    samples = [
        {"latent": lat, "cond": c, "cond_mask": m, "index": i}
        for lat, c, m, i in zip(encoded["latent"], encoded["cond"], encoded["cond_mask"], index)
    ]
    out = collate_pack(
        samples,
        raw["position"].tolist(),
        pack_length=raw.get("pack_length"),
        loss_scale=raw.get("loss_scale"),
    )
    for k in ("resolution", "aspect_ratio", "camera_pose"):
        if k in raw:
            out[k] = raw[k]
    return out


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

    @torch.no_grad()
    def encode_samples(self, pack: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """Per-sample ``latent`` / ``cond`` / ``cond_mask`` of a raw pack, in pack order.

        Samples of one shape (one bucket) are encoded together, as a dense micro-batch of
        that bucket would be: fewer, larger encoder calls, and a sample's encoding does not
        depend on which other shapes share its pack.
        """
        pixels = pack["pixels"]  # n x [3, (T,) H, W]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(pixels):
            groups.setdefault(tuple(x.shape), []).append(i)
        out: dict[str, list[Any]] = {k: [None] * len(pixels) for k in _PACK_KEYS}
        for members in groups.values():
            batch = {
                "pixels": torch.stack([pixels[i] for i in members]),  # [B, 3, (T,) H, W]
                "caption": [pack["caption"][i] for i in members],
                "index": pack["index"][members],  # [B]
            }
            enc = self.encode(batch)
            for k in _PACK_KEYS:
                for j, i in enumerate(members):
                    out[k][i] = enc[k][j]  # latent [C, (T,) h, w]; cond [Lc, Dc]; mask [Lc]
        return out

    def encode_pack(self, pack: dict[str, Any]) -> dict[str, Any]:
        """A raw pack -> ``prepare_packed``'s format (``encode_samples`` + ``assemble_pack``)."""
        return assemble_pack(pack, self.encode_samples(pack))


class OnlineEncodingIterator:
    """Wraps the raw-media ``MicroBatchIterator`` so the trainer sees feature batches.

    Encoding happens in the consuming thread (on the training device), after the prefetch
    threads decoded the pixels. ``consumed_samples``, ``state_dict``, ``load_state_dict`` and
    ``close`` are those of the wrapped iterator, so checkpoints and resume are unchanged.

    ``group``: the ranks that read the same samples (one model replica: TP x PP x CP). Only its
    first rank runs the encoders; the others receive ``latent`` / ``cond`` / ``cond_mask`` by
    broadcast (onto ``device``, the training device) and need no encoders at all
    (``encoders=None``). That saves the repeated encoder work and the encoders' memory on those
    ranks, and guarantees bit-identical inputs on all ranks of a replica, which GPU kernels do
    not promise when each rank encodes for itself.

    Packs (``media.pack``, :func:`is_pack`) are encoded per same-shape group
    (``FrozenEncoders.encode_samples``); the per-sample tensors are broadcast as one flat buffer
    per key and every rank assembles the pack itself (:func:`assemble_pack`).
    """

    def __init__(
        self,
        batches: Any,
        encoders: Any,
        *,
        group: Any = None,
        device: torch.device | None = None,
    ) -> None:
        self.batches = batches
        self.encoders = encoders  # None on the ranks that only receive (not the source)
        # Where the broadcast runs: the training device. NCCL moves CUDA tensors only, so
        # encodings made on the CPU (media.encoders.device=cpu) go to the GPU first.
        self.device = device or getattr(encoders, "device", None) or torch.device("cpu")
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
        if is_pack(raw):
            if self.group is None:
                return self.encoders.encode_pack(raw)
            return assemble_pack(raw, self._encode_pack_and_broadcast(raw))
        if self.group is None:
            return self.encoders.encode(raw)
        return self._encode_and_broadcast(raw)

    def _encode_pack_and_broadcast(self, raw: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """The pack's per-sample encodings on every rank of the replica: the source encodes,
        then each key's differently shaped tensors travel as one flat buffer (shapes and dtype
        first, by object broadcast), so a pack costs one collective per key, not per sample."""
        import torch.distributed as dist

        device = self.device
        if dist.get_rank() == self.src:
            enc = self.encoders.encode_samples(raw)
            meta: list[Any] = [
                [(k, [tuple(t.shape) for t in enc[k]], str(enc[k][0].dtype)) for k in _PACK_KEYS]
            ]
        else:
            enc, meta = {}, [None]
        dist.broadcast_object_list(meta, src=self.src, group=self.group)
        out: dict[str, list[torch.Tensor]] = {}
        for k, shapes, dtype in meta[0]:
            numels = [int(torch.Size(s).numel()) for s in shapes]
            if k in enc:
                flat = torch.cat([t.reshape(-1) for t in enc[k]]).to(device)  # [sum numel]
            else:
                flat = torch.empty(
                    sum(numels), dtype=getattr(torch, dtype.split(".")[-1]), device=device
                )
            if flat.dtype == torch.bool:  # not every backend broadcasts bool
                wire = flat.to(torch.uint8)
                dist.broadcast(wire, src=self.src, group=self.group)
                flat = wire.bool()
            else:
                dist.broadcast(flat, src=self.src, group=self.group)
            out[k] = [
                part.reshape(s) for part, s in zip(torch.split(flat, numels), shapes)
            ]  # n x [shape_i]
        return out

    def _encode_and_broadcast(self, raw: dict[str, Any]) -> dict[str, Any]:
        import torch.distributed as dist

        keys = ("latent", "cond", "cond_mask")
        if dist.get_rank() == self.src:
            out = self.encoders.encode(raw)
            meta: list[Any] = [[(k, tuple(out[k].shape), str(out[k].dtype)) for k in keys]]
        else:
            out, meta = {}, [None]
        dist.broadcast_object_list(meta, src=self.src, group=self.group)
        device = self.device
        for k, shape, dtype in meta[0]:
            if k in out:
                out[k] = out[k].to(device)
            else:
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

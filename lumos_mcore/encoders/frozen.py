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


def vae_seeds(seed: int, index: torch.Tensor) -> list[int]:
    """The posterior seed of each sample: a function of the run seed and the sample index
    only, so a sample's latent noise does not depend on batching, packing or which rank
    encodes it."""
    return [seed * 1_000_003 + int(i) for i in index.tolist()]


def shape_groups(pack: dict[str, Any]) -> list[tuple[list[int], dict[str, Any]]]:
    """A raw pack's samples grouped by shape, in first-seen order: ``(members, batch)`` with
    ``batch`` the dense raw micro-batch of those members (``pixels`` [B, 3, (T,) H, W],
    ``caption``, ``index``). Deterministic, so every rank of a replica forms the same groups."""
    pixels = pack["pixels"]  # n x [3, (T,) H, W]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(pixels):
        groups.setdefault(tuple(x.shape), []).append(i)
    return [
        (
            members,
            {
                "pixels": torch.stack([pixels[i] for i in members]),  # [B, 3, (T,) H, W]
                "caption": [pack["caption"][i] for i in members],
                "index": pack["index"][members],  # [B]
            },
        )
        for members in groups.values()
    ]


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
        self.vae = self.build_vae(cfg)
        self.dino: FrozenDINO | None = None
        self.t5: FrozenT5 | None = None
        if cfg.cond in ("dino_cls", "dino_patch"):
            self.dino = FrozenDINO(cfg.dino, image_size=cfg.dino_image_size, **common)  # type: ignore[arg-type]
        else:
            self.t5 = FrozenT5(cfg.t5, max_length=cfg.t5_max_length, **common)  # type: ignore[arg-type]
        self.device = self.vae.device

    @staticmethod
    def build_vae(cfg: EncodersConfig) -> FrozenVAE:
        """The VAE alone, as this class loads it: what the other ranks of a replica load under
        ``media.encoders.shard_vae``."""
        return FrozenVAE(
            cfg.vae,  # type: ignore[arg-type]
            subfolder=cfg.vae_subfolder,
            sampling=cfg.vae_sampling,
            scaling_factor=cfg.vae_scaling_factor,
            batch=cfg.vae_batch,
            device=cfg.device,
            dtype=cfg.dtype,
        )

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

    def vae_seeds(self, index: torch.Tensor) -> list[int] | None:
        """Per-sample posterior seeds for ``vae_sampling="sample"`` (None for ``mode``)."""
        if self.cfg.vae_sampling != "sample":
            return None
        return vae_seeds(self.seed, index)

    @torch.no_grad()
    def encode_cond(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``cond`` [B, Lc, Dc] and ``cond_mask`` [B, Lc] of a raw batch (DINO of the first
        frame, or T5 of the caption)."""
        if self.dino is not None:
            pixels = batch["pixels"]  # [B, 3, (T,) H, W]
            image = pixels[:, :, 0] if pixels.dim() == 5 else pixels  # [B, 3, H, W]
            tokens = "cls" if self.cfg.cond == "dino_cls" else "patch"
            cond = self.dino.encode(image, tokens=tokens)  # [B, Lc, D]
            mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)  # [B, Lc]
            return cond, mask
        return self.t5.encode(batch["caption"])  # type: ignore[union-attr]  # [B, L, D], [B, L]

    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels = batch["pixels"]  # [B, 3, (T,) H, W]
        latent = self.vae.encode(pixels, seeds=self.vae_seeds(batch["index"]))  # [B, C, (T,) h, w]
        cond, mask = self.encode_cond(batch)
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
        out: dict[str, list[Any]] = {k: [None] * len(pixels) for k in _PACK_KEYS}
        for members, batch in shape_groups(pack):
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

    ``vae`` (``media.encoders.shard_vae``): this rank's ``FrozenVAE``, given on *every* rank of
    the group. The micro-batch's frames are then split into equal contiguous shares, each rank
    encodes its share and the latents are all-gathered: each frame is still encoded once, by
    one rank, so the inputs stay identical across the replica, and the VAE time drops by the
    group size. ``seed`` (``train.seed``) gives the posterior noise of ``vae_sampling=sample``
    on ranks without the full encoders. The condition encoder stays on the first rank.

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
        vae: FrozenVAE | None = None,
        seed: int = 0,
    ) -> None:
        self.batches = batches
        self.encoders = encoders  # None on the ranks that only receive (not the source)
        # Where the broadcast runs: the training device. NCCL moves CUDA tensors only, so
        # encodings made on the CPU (media.encoders.device=cpu) go to the GPU first.
        self.device = device or getattr(encoders, "device", None) or torch.device("cpu")
        self.group = group
        self.vae = vae
        self.seed = seed
        self.src: int | None = None
        if group is not None:
            import torch.distributed as dist

            self.src = dist.get_process_group_ranks(group)[0]
            if dist.get_world_size(group) == 1:
                self.group = None
        elif vae is not None and encoders is None:
            raise ValueError("OnlineEncodingIterator(vae=...) without a group needs encoders")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        raw = next(self.batches)
        if is_pack(raw):
            if self.group is None:
                return self.encoders.encode_pack(raw)
            return assemble_pack(raw, self._encode_pack_in_group(raw))
        if self.group is None:
            return self.encoders.encode(raw)
        return self._encode_in_group(raw)

    def _is_src(self) -> bool:
        import torch.distributed as dist

        return dist.get_rank() == self.src

    # -- dense micro-batches -------------------------------------------------------------------
    def _encode_in_group(self, raw: dict[str, Any]) -> dict[str, Any]:
        if self.vae is None:
            out = self.encoders.encode(raw) if self._is_src() else {}
            out = self._broadcast(out, ("latent", "cond", "cond_mask"))
        else:
            cond = {}
            if self._is_src():
                cond["cond"], cond["cond_mask"] = self.encoders.encode_cond(raw)
            out = self._broadcast(cond, ("cond", "cond_mask"))
            out["latent"] = self._sharded_latents(raw["pixels"], raw["index"])
        for k in _PASS_THROUGH:
            if k in raw:
                out[k] = raw[k]
        return out

    def _broadcast(self, out: dict[str, torch.Tensor], keys: tuple[str, ...]) -> dict[str, Any]:
        """``keys`` of the source's ``out`` on every rank of the group, on ``self.device``
        (shapes and dtypes first, by object broadcast)."""
        import torch.distributed as dist

        meta: list[Any] = [None]
        if self._is_src():
            meta = [[(k, tuple(out[k].shape), str(out[k].dtype)) for k in keys]]
        dist.broadcast_object_list(meta, src=self.src, group=self.group)
        res: dict[str, Any] = {}
        for k, shape, dtype in meta[0]:
            if k in out:
                t = out[k].to(self.device)
            else:
                t = torch.empty(shape, dtype=_dtype(dtype), device=self.device)
            res[k] = self._broadcast_tensor(t)
        return res

    def _broadcast_tensor(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        # A strided view (e.g. DINO's patch tokens sliced after the CLS / register tokens) must
        # not go on the wire: NCCL refuses it, gloo sends its storage order and the receivers
        # get scrambled values.
        t = t.contiguous()
        if t.dtype == torch.bool:  # not every backend broadcasts bool
            wire = t.to(torch.uint8)
            dist.broadcast(wire, src=self.src, group=self.group)
            return wire.bool()
        dist.broadcast(t, src=self.src, group=self.group)
        return t

    def _sharded_latents(self, pixels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, (T,) h, w]`` of a dense batch, each rank of the group encoding an
        equal contiguous share of the ``B*T`` frames, all-gathered (``vae`` mode)."""
        import torch.distributed as dist

        vae = self.vae
        frames, shape = vae.flatten_frames(pixels)  # [F, 3, H, W]
        seeds = vae_seeds(self.seed, index) if vae.sampling == "sample" else None
        noise = vae.frame_noise(seeds, pixels)  # [F, C, h, w] or None
        n, k, f = dist.get_world_size(self.group), dist.get_rank(self.group), frames.shape[0]
        bounds = [f * j // n for j in range(n + 1)]
        lo, hi = bounds[k], bounds[k + 1]
        mine = vae.encode_frames(frames[lo:hi], None if noise is None else noise[lo:hi])
        c, h, w = vae.latent_shape(*frames.shape[-2:])
        width = max(bounds[j + 1] - bounds[j] for j in range(n))
        buf = torch.zeros((width, c, h, w), dtype=torch.float32, device=self.device)
        buf[: hi - lo] = mine.to(self.device)  # [width, C, h, w], padded
        parts = [torch.empty_like(buf) for _ in range(n)]
        dist.all_gather(parts, buf, group=self.group)
        z = torch.cat([parts[j][: bounds[j + 1] - bounds[j]] for j in range(n)])  # [F, C, h, w]
        return vae.unflatten_latents(z, shape)

    # -- packs -----------------------------------------------------------------------------------
    def _encode_pack_in_group(self, raw: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """The pack's per-sample encodings on every rank of the replica."""
        if self.vae is None:
            enc = self.encoders.encode_samples(raw) if self._is_src() else {}
            return self._broadcast_lists(enc, _PACK_KEYS)
        n = len(raw["pixels"])
        latents: list[Any] = [None] * n
        cond: dict[str, list[Any]] = {"cond": [None] * n, "cond_mask": [None] * n}
        for members, batch in shape_groups(raw):
            z = self._sharded_latents(batch["pixels"], batch["index"])  # [B, C, (T,) h, w]
            if self._is_src():
                c, m = self.encoders.encode_cond(batch)  # [B, Lc, Dc], [B, Lc]
            for j, i in enumerate(members):
                latents[i] = z[j]
                if self._is_src():
                    cond["cond"][i], cond["cond_mask"][i] = c[j], m[j]
        out = self._broadcast_lists(cond if self._is_src() else {}, ("cond", "cond_mask"))
        out["latent"] = latents
        return out

    def _broadcast_lists(
        self, enc: dict[str, list[torch.Tensor]], keys: tuple[str, ...]
    ) -> dict[str, list[torch.Tensor]]:
        """Per-sample tensors of differently shaped samples: each key's list travels as one
        flat buffer (shapes and dtype first, by object broadcast), so a pack costs one
        collective per key, not per sample."""
        import torch.distributed as dist

        meta: list[Any] = [None]
        if self._is_src():
            meta = [[(k, [tuple(t.shape) for t in enc[k]], str(enc[k][0].dtype)) for k in keys]]
        dist.broadcast_object_list(meta, src=self.src, group=self.group)
        out: dict[str, list[torch.Tensor]] = {}
        for k, shapes, dtype in meta[0]:
            numels = [int(torch.Size(s).numel()) for s in shapes]
            if k in enc:
                flat = torch.cat([t.reshape(-1) for t in enc[k]]).to(self.device)  # [sum numel]
            else:
                flat = torch.empty(sum(numels), dtype=_dtype(dtype), device=self.device)
            flat = self._broadcast_tensor(flat)
            out[k] = [
                part.reshape(s) for part, s in zip(torch.split(flat, numels), shapes)
            ]  # n x [shape_i]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batches, name)


def _dtype(name: str) -> torch.dtype:
    """``"torch.float32"`` -> ``torch.float32`` (dtypes travel as strings in the metadata)."""
    return getattr(torch, name.split(".")[-1])

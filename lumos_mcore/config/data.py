"""Data section of the training config (``data.*`` flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA_KINDS = ("features",)
PACK_COSTS = ("tokens", "attention")


@dataclass
class DataConfig:
    """Where the training samples come from and how they are read.

    ``kind="features"``: precomputed VAE latents + condition features in webdataset shards with an
    ``index.json`` (see ``lumos_mcore.data.shards``).
    """

    path: str  # directory holding index.json and the shards
    kind: str = "features"
    num_workers: int = 1  # background threads preparing micro-batches; 0 = read in the caller
    prefetch: int = 2  # micro-batches queued per worker thread
    seed: int = 0  # seeds the global sample order, together with the epoch
    shuffle: bool = True
    # Shards shuffled as a unit of this many, then samples shuffled inside each unit: larger mixes
    # more sources into one batch, smaller keeps each rank's reads within fewer shards.
    shuffle_shards_per_block: int = 4
    # A shard whose bad samples exceed this fraction of its samples stops training.
    max_bad_fraction: float = 0.01
    # Pad the condition sequence to this length (static shapes); None = longest in the micro-batch.
    cond_pad_to: int | None = None
    check_finite: bool = True  # NaN/inf latents or conditions count as bad samples
    # Sequence packing (docs/video.md#packing): each step's train.global_batch_size samples are
    # bucketed into packs of at most pack_capacity model tokens (frames * H/p * W/p), one pack
    # per micro-batch (train.micro_batch_size must be 1); the number of packs per step varies.
    pack: bool = False
    pack_capacity: int | None = None  # tokens per pack; required with pack=true
    pack_cost: str = "tokens"  # balance DP ranks by tokens, or tokens + tokens^2/8192 (attention)

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind={self.kind!r}: unsupported; choose one of {DATA_KINDS}")
        if not self.path:
            raise ValueError("data.path='': required; the directory holding index.json")
        if self.kind == "features" and not (Path(self.path) / "index.json").is_file():
            raise ValueError(
                f"data.path={self.path}: no index.json found; run tools/make_synthetic_shards.py "
                f"--out {self.path} for synthetic data, or index existing shards with "
                "lumos_mcore.data.shards.build_index"
            )
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers}: must be >= 0 (0 = no threads)")
        if self.prefetch < 1:
            raise ValueError(f"data.prefetch={self.prefetch}: must be >= 1")
        if self.seed < 0:
            raise ValueError(f"data.seed={self.seed}: must be >= 0")
        if self.shuffle_shards_per_block < 1:
            raise ValueError(
                f"data.shuffle_shards_per_block={self.shuffle_shards_per_block}: must be >= 1"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={self.max_bad_fraction}: must be in [0, 1]")
        if self.cond_pad_to is not None and self.cond_pad_to < 1:
            raise ValueError(f"data.cond_pad_to={self.cond_pad_to}: must be >= 1 or None")
        if self.pack_cost not in PACK_COSTS:
            raise ValueError(
                f"data.pack_cost={self.pack_cost!r}: choose one of {', '.join(PACK_COSTS)}"
            )
        if self.pack:
            if self.pack_capacity is None or self.pack_capacity < 1:
                raise ValueError(
                    f"data.pack_capacity={self.pack_capacity}: data.pack=true needs a positive "
                    "token capacity per pack (at least the largest sample's frames * H/p * W/p)"
                )
            if self.cond_pad_to is not None:
                raise ValueError(
                    f"data.cond_pad_to={self.cond_pad_to}: not used with data.pack=true (a pack "
                    "concatenates each sample's own condition tokens); leave it unset"
                )

"""The job config: one small dataclass per component, composed (no god config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lumos_mcore.config.data import DataConfig
from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.config.media import MediaDataConfig
from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import CheckpointConfig, OptimConfig, TrainConfig


@dataclass
class JobConfig:
    """Everything a training run needs; loaded from YAML + ``key=value`` overrides."""

    data: DataConfig | None = None  # precomputed features (latents + condition tokens)
    media: MediaDataConfig | None = None  # raw images / videos, encoded online
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if (self.data is None) == (self.media is None):
            raise ValueError(
                "data.path / media.path: give exactly one — data.path for precomputed feature "
                "shards (tools/make_synthetic_shards.py, tools/encode_features.py) or media.path "
                "for raw image/video shards encoded online (tools/make_media_shards.py)"
            )
        if self.media is not None:
            self.media.encoders.check_complete()
        if self.model.learn_sigma != self.diffusion.learn_sigma:
            raise ValueError(
                f"model.learn_sigma={self.model.learn_sigma} but "
                f"diffusion.learn_sigma={self.diffusion.learn_sigma}: set both the same (the "
                "model outputs the variance channels the objective trains)"
            )

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.train.output_dir}/checkpoints"

"""The job config: one small dataclass per component, composed (no god config)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lumos_mcore.config.data import DataConfig
from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.config.media import MediaDataConfig
from lumos_mcore.config.model import ModelConfig, fp8_row_multiple
from lumos_mcore.config.parallel import ParallelConfig, check_te_packed_cp
from lumos_mcore.config.profile import ProfileConfig
from lumos_mcore.config.train import (
    CheckpointConfig,
    OptimConfig,
    TrainConfig,
    ValidationConfig,
)


def _te_spec(model: ModelConfig) -> bool:
    """Whether the model will be built on the TE spec (``auto``: where TE imports)."""
    if model.spec == "te":
        return True
    from lumos_mcore.models.dit.layer_spec import te_available  # imports megatron

    return te_available()


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
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        if (self.data is None) == (self.media is None):
            raise ValueError(
                "data.path / media.path: give exactly one — data.path for precomputed feature "
                "shards (tools/make_synthetic_shards.py, tools/encode_features.py) or media.path "
                "for raw image/video shards encoded online (tools/make_media_shards.py)"
            )
        if self.media is not None:
            self.media.encoders.check_complete()
        for section, packed in (("data", self.data), ("media", self.media)):
            if packed is not None and packed.pack and self.train.micro_batch_size != 1:
                raise ValueError(
                    f"train.micro_batch_size={self.train.micro_batch_size}: must be 1 with "
                    f"{section}.pack=true (one pack per micro-batch; train.global_batch_size "
                    "counts samples)"
                )
        packs = any(section is not None and section.pack for section in (self.data, self.media))
        if packs and self.parallel.cp > 1 and self.model.spec != "local" and _te_spec(self.model):
            check_te_packed_cp(self.parallel.cp_comm_type, self.model.cp_layout)
        if self.parallel.cp > 1 or (packs and self.model.temporal_attention):
            self._check_te_shards(packs)
        if packs and self.model.fp8 is not None and self.parallel.pp > 1:
            p = self.parallel
            multiple = (
                fp8_row_multiple(self.model.fp8) * p.cp * (p.tp if p.sequence_parallel else 1)
            )
            if self.model.num_tokens % multiple:
                raise ValueError(
                    f"model.fp8={self.model.fp8!r} with packs under parallel.pp={p.pp}: every "
                    f"pack is model.num_tokens={self.model.num_tokens} tokens long, which must be "
                    f"a multiple of {multiple} (FP8 GEMM rows per rank x cp x sp); change the "
                    "model size / resolution, parallel.cp or parallel.sequence_parallel"
                )
        if self.model.learn_sigma != self.diffusion.learn_sigma:
            raise ValueError(
                f"model.learn_sigma={self.model.learn_sigma} but "
                f"diffusion.learn_sigma={self.diffusion.learn_sigma}: set both the same (the "
                "model outputs the variance channels the objective trains)"
            )

        v = self.validation
        if v.interval and v.path is None and not v.holdout and self.media is not None:
            # Validating on training media would need it encoded twice for a number that is
            # not held out; ask for a held-out set instead.
            raise ValueError(
                f"validation.interval={v.interval}: a raw-media job needs a held-out set: "
                "validation.holdout=H (the last H samples of media.path, never trained on) or "
                "validation.path (held-out feature shards, e.g. from tools/encode_features.py)"
            )
        flow_sampler = v.grid_sampler == "euler"
        if v.grid_sampler is not None and flow_sampler != (self.diffusion.objective == "flow"):
            raise ValueError(
                f"validation.grid_sampler={v.grid_sampler!r} does not fit "
                f"diffusion.objective={self.diffusion.objective!r} (euler is the flow sampler; "
                "ddpm / dpm++2m sample the ddpm objective)"
            )
        if self.profile.enabled and self.profile.start_step > self.train.steps:
            raise ValueError(
                f"profile.start_step={self.profile.start_step}: the run ends at train.steps="
                f"{self.train.steps}, so nothing would be traced; start the window earlier"
            )

    def _check_te_shards(self, packs: bool) -> None:
        """Sequence shards the model can run, refused here rather than at the first forward:
        the zig-zag CP layout (``model.cp_layout=zigzag``, or ``auto`` on the TE spec) cuts
        every sample into 2*cp chunks, and TE's spatial / temporal attention takes unpacked
        batches whose CP shards hold whole frames."""
        m, p = self.model, self.parallel
        te = m.spec != "local" and _te_spec(m)
        zigzag = m.cp_layout == "zigzag" or (m.cp_layout == "auto" and te)
        layout = f"model.cp_layout={m.cp_layout!r}" + (" (zig-zag on the TE spec)" if te else "")
        if p.cp > 1 and zigzag and not packs:  # packs are padded to it by the packer
            split = p.cp * (p.tp if p.sequence_parallel else 1)
            multiple = math.lcm(2 * p.cp, split)
            if m.num_tokens % multiple:
                raise ValueError(
                    f"parallel.cp={p.cp} with {layout}: every sample is cut into 2*cp chunks, "
                    f"so model.num_tokens={m.num_tokens} must be a multiple of {multiple}; "
                    "change the resolution / frames, parallel.cp, or set "
                    "model.cp_layout=contiguous"
                )
        if te and p.cp > 1 and p.cp_comm_type == "a2a" and (m.num_heads_ // p.tp) % p.cp:
            raise ValueError(
                f"parallel.cp_comm_type='a2a' with parallel.cp={p.cp}: TE's all-to-all context "
                f"parallelism splits each rank's {m.num_heads_ // p.tp} heads (model.num_heads="
                f"{m.num_heads_} / tp={p.tp}) over the cp ranks; choose a cp that divides them "
                "or parallel.cp_comm_type=p2p"
            )
        if te and m.temporal_attention:
            if packs:
                raise ValueError(
                    "data.pack / media.pack: spatial/temporal video attention on the TE spec "
                    "takes unpacked batches; set model.video_attention=full_3d to pack, or "
                    "model.spec=local"
                )
            chunks = 2 * p.cp if zigzag else p.cp
            if p.cp > 1 and m.num_frames % chunks:
                raise ValueError(
                    f"parallel.cp={p.cp} with {layout}: spatial/temporal attention on the TE "
                    f"spec needs context-parallel shards of whole frames, so model.num_frames="
                    f"{m.num_frames} must be a multiple of {chunks}; change num_frames or "
                    "parallel.cp, or use model.video_attention=full_3d"
                )

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.train.output_dir}/checkpoints"

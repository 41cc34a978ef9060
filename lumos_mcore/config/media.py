"""Raw-media data section (``media.*`` flags) and the frozen encoders (``media.encoders.*``).

Training from raw media reads webdataset shards of encoded images/videos (written by
``tools/make_media_shards.py``), decodes them (DALI, or PyAV/Pillow), resizes/crops each sample to
its aspect-ratio / duration bucket and encodes the pixels with frozen encoders inside the training
step ("online"). The "offline" alternative runs the same encoders once with
``tools/encode_features.py`` and trains on the resulting feature shards (``data.kind=features``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lumos_mcore.config.data import PACK_COSTS  # media.pack_cost: the data.pack_cost choices

MODALITIES = ("image", "video")
DECODERS = ("auto", "dali", "pyav")
DALI_DEVICES = ("auto", "cpu", "gpu")
COLOR_MATRICES = ("bt601", "auto")
COND_KINDS = ("dino_cls", "dino_patch", "t5")
VAE_SAMPLING = ("mode", "sample")
ENCODER_DTYPES = ("fp32", "bf16", "fp16")
ENCODER_DEVICES = ("auto", "cpu", "cuda")


def _choice(flag: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{flag}={value!r}: unsupported; choose one of {options}")


def _hf_dir(flag: str, path: str | None, subfolder: str = "") -> None:
    """A local Hugging Face model directory must exist and hold a config.json (no downloads)."""
    if path is None:
        return
    if not path:
        raise ValueError(f"{flag}='': give a local Hugging Face model directory or leave it unset")
    cfg = Path(path) / subfolder / "config.json"
    if not cfg.is_file():
        raise ValueError(
            f"{flag}={path}: no {cfg.relative_to(path)} found; point it at a local directory "
            "written by save_pretrained (models are never downloaded)"
        )


@dataclass
class EncodersConfig:
    """Frozen encoders that turn decoded pixels into the model's inputs.

    ``vae``: a diffusers ``AutoencoderKL`` (video: applied per frame); latents are scaled by the
    VAE config's ``scaling_factor`` (and ``shift_factor`` when set) unless
    ``vae_scaling_factor`` overrides it. ``cond`` picks the condition tokens: ``dino_cls`` (1
    token, L2-normalised CLS of a transformers ViT/DINOv2), ``dino_patch`` (the patch tokens), or
    ``t5`` (T5 encoder over the caption, ``t5_max_length`` tokens with a padding mask). Videos are
    conditioned on their first frame (I2V). Every path is a local directory.

    ``shard_vae``: the ranks of one model replica (TP x PP x CP) read the same samples, and by
    default only the first of them encodes while the others wait for the broadcast. With
    ``shard_vae=true`` every rank of the replica loads the VAE (SD's: 84M parameters, 0.3 GiB in
    fp32) and encodes an equal share of the micro-batch's frames; the latents are all-gathered,
    so each frame is still encoded once and every rank gets the same tensors. The condition
    encoder (DINO / T5, often the large one) stays on the first rank. Worth it when VAE encoding
    of video shows in the step time (``train/stall_ms``).
    """

    vae: str | None = None
    vae_subfolder: str = ""  # e.g. "vae" inside a diffusers pipeline directory
    vae_sampling: str = "mode"  # mode = posterior mean (deterministic); sample = posterior draw
    vae_scaling_factor: float | None = None
    vae_batch: int = 16  # images/frames per VAE call (bounds activation memory for video)
    cond: str = "dino_cls"
    dino: str | None = None
    dino_image_size: int = 224  # DINO input side; patch tokens = (size / patch) ** 2
    t5: str | None = None  # T5EncoderModel weights + tokenizer files in one directory
    t5_max_length: int = 120
    dtype: str = "fp32"
    device: str = "auto"  # auto = the current CUDA device when there is one, else CPU
    shard_vae: bool = False  # split the VAE frames across the replica's ranks (see above)

    def __post_init__(self) -> None:
        _choice("media.encoders.vae_sampling", self.vae_sampling, VAE_SAMPLING)
        _choice("media.encoders.cond", self.cond, COND_KINDS)
        _choice("media.encoders.dtype", self.dtype, ENCODER_DTYPES)
        _choice("media.encoders.device", self.device, ENCODER_DEVICES)
        _hf_dir("media.encoders.vae", self.vae, self.vae_subfolder)
        _hf_dir("media.encoders.dino", self.dino)
        _hf_dir("media.encoders.t5", self.t5)
        if self.vae_scaling_factor is not None and not self.vae_scaling_factor > 0:
            raise ValueError(
                f"media.encoders.vae_scaling_factor={self.vae_scaling_factor}: must be > 0 "
                "(or unset to use the VAE config's scaling_factor)"
            )
        if self.vae_batch < 1:
            raise ValueError(f"media.encoders.vae_batch={self.vae_batch}: must be >= 1")
        if self.dino_image_size < 1:
            raise ValueError(f"media.encoders.dino_image_size={self.dino_image_size}: must be >= 1")
        if self.t5_max_length < 1:
            raise ValueError(f"media.encoders.t5_max_length={self.t5_max_length}: must be >= 1")

    def check_complete(self) -> None:
        """Raise unless the encoders needed to encode are configured (VAE + the condition's)."""
        if self.vae is None:
            raise ValueError(
                "media.encoders.vae: required to encode raw media (a local AutoencoderKL "
                "directory, e.g. the 'vae' folder of a Stable Diffusion checkpoint)"
            )
        if self.cond in ("dino_cls", "dino_patch") and self.dino is None:
            raise ValueError(
                f"media.encoders.dino: required for media.encoders.cond={self.cond!r} (a local "
                "ViT / DINOv2 directory)"
            )
        if self.cond == "t5" and self.t5 is None:
            raise ValueError(
                "media.encoders.t5: required for media.encoders.cond='t5' (a local directory with "
                "T5 encoder weights and its tokenizer)"
            )


@dataclass
class MediaDataConfig:
    """Raw encoded images or videos in webdataset shards with a ``lumos-media`` ``index.json``.

    ``buckets`` are output sizes ``[H, W]`` in pixels; each sample goes to the bucket closest to
    its aspect ratio, is resized to cover it and centre-cropped. Videos take ``num_frames``
    frames at ``frame_stride`` (paper: 16 at stride 3) from a seeded start; several
    ``num_frames`` values are duration buckets (a clip goes to the longest that fits). With more
    than one bucket the sample order is built from same-bucket chunks of ``bucket_chunk``
    samples, so every micro-batch has one shape (the micro-batch size must divide it).

    ``pack=true`` (docs/video.md, *Packed training from the loader*): each step's
    ``train.global_batch_size`` samples are packed into sequences of at most ``pack_capacity``
    model tokens (``frames * (H/d/p) * (W/d/p)`` of each sample's bucket, ``d`` the VAE
    downsampling), one pack per micro-batch (``train.micro_batch_size`` must be 1). Packs mix
    buckets, so ``shuffle_shards_per_block`` may then exceed 1 (windows draw from several
    same-bucket chunks) and a small ``bucket_chunk`` mixes shapes more finely.
    """

    path: str  # directory holding index.json and the media shards
    modality: str = "image"
    buckets: list[list[int]] = field(default_factory=lambda: [[256, 256]])
    num_frames: list[int] = field(default_factory=lambda: [16])
    frame_stride: int = 3
    # A sample whose source is smaller than its bucket by more than this factor is skipped
    # (counted as too_small); 1.0 = never upscale.
    max_upscale: float = 1.0
    decoder: str = "auto"  # auto = DALI when importable (per-codec PyAV fallback), else PyAV
    dali_device: str = "auto"  # auto = GPU decoding (mixed) when CUDA is present
    dali_threads: int = 2  # DALI worker threads per pipeline
    # Video colour conversion on the PyAV route: bt601 = what DALI's CPU decoder does for every
    # stream (both routes then give the same pixels); auto = follow the stream's colorspace tag.
    color_matrix: str = "bt601"
    bucket_chunk: int = 64
    num_workers: int = 1  # background threads preparing micro-batches; 0 = in the caller
    prefetch: int = 2
    seed: int = 0
    shuffle: bool = True
    shuffle_shards_per_block: int = 1
    # A shard whose bad samples exceed this fraction of its samples stops training.
    max_bad_fraction: float = 0.01
    # Sequence packing, as data.pack / data.pack_capacity / data.pack_cost for feature shards.
    pack: bool = False
    pack_capacity: int | None = None  # tokens per pack; required with pack=true
    pack_cost: str = "tokens"  # balance DP ranks by tokens, or tokens + tokens^2/8192 (attention)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)

    def __post_init__(self) -> None:
        _choice("media.modality", self.modality, MODALITIES)
        _choice("media.decoder", self.decoder, DECODERS)
        _choice("media.dali_device", self.dali_device, DALI_DEVICES)
        _choice("media.color_matrix", self.color_matrix, COLOR_MATRICES)
        if not self.path:
            raise ValueError("media.path='': required; the directory holding the media index.json")
        if not os.path.isfile(os.path.join(self.path, "index.json")):
            raise ValueError(
                f"media.path={self.path}: no index.json found; write shards with "
                f"tools/make_media_shards.py --out {self.path} (or tools/make_synthetic_media.py)"
            )
        if not self.buckets:
            raise ValueError("media.buckets=[]: give at least one [H, W] output size")
        self.buckets = [list(b) for b in self.buckets]
        seen = set()
        for i, b in enumerate(self.buckets):
            if len(b) != 2 or any(int(v) != v or v < 8 for v in b):
                raise ValueError(
                    f"media.buckets[{i}]={b}: each bucket is [H, W] in pixels, integers >= 8"
                )
            if b[0] % 8 or b[1] % 8:
                raise ValueError(
                    f"media.buckets[{i}]={b}: H and W must be multiples of 8 (the VAE downsamples "
                    "by 8)"
                )
            if tuple(b) in seen:
                raise ValueError(f"media.buckets[{i}]={b}: listed twice")
            seen.add(tuple(b))
        if not self.num_frames or any(n < 1 for n in self.num_frames):
            raise ValueError(f"media.num_frames={self.num_frames}: give frame counts >= 1")
        if len(set(self.num_frames)) != len(self.num_frames):
            raise ValueError(f"media.num_frames={self.num_frames}: duplicate duration buckets")
        if self.frame_stride < 1:
            raise ValueError(f"media.frame_stride={self.frame_stride}: must be >= 1")
        if not self.max_upscale >= 1.0:
            raise ValueError(f"media.max_upscale={self.max_upscale}: must be >= 1.0")
        if self.dali_threads < 1:
            raise ValueError(f"media.dali_threads={self.dali_threads}: must be >= 1")
        if self.bucket_chunk < 1:
            raise ValueError(f"media.bucket_chunk={self.bucket_chunk}: must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"media.num_workers={self.num_workers}: must be >= 0 (0 = no threads)")
        if self.prefetch < 1:
            raise ValueError(f"media.prefetch={self.prefetch}: must be >= 1")
        if self.seed < 0:
            raise ValueError(f"media.seed={self.seed}: must be >= 0")
        if self.shuffle_shards_per_block < 1:
            raise ValueError(
                f"media.shuffle_shards_per_block={self.shuffle_shards_per_block}: must be >= 1"
            )
        if self.num_buckets > 1 and self.shuffle_shards_per_block != 1 and not self.pack:
            raise ValueError(
                f"media.shuffle_shards_per_block={self.shuffle_shards_per_block}: must be 1 with "
                f"{self.num_buckets} buckets (each shuffle unit is one same-bucket chunk of "
                "media.bucket_chunk samples; mixing units would mix shapes in a micro-batch)"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"media.max_bad_fraction={self.max_bad_fraction}: must be in [0, 1]")
        if self.pack_cost not in PACK_COSTS:
            raise ValueError(
                f"media.pack_cost={self.pack_cost!r}: choose one of {', '.join(PACK_COSTS)}"
            )
        if self.pack and (self.pack_capacity is None or self.pack_capacity < 1):
            raise ValueError(
                f"media.pack_capacity={self.pack_capacity}: media.pack=true needs a positive "
                "token capacity per pack (at least the largest bucket's frames * H/d/p * W/d/p, "
                "d = VAE downsampling, p = model.patch_size)"
            )

    @property
    def num_buckets(self) -> int:
        """Distinct output shapes: spatial buckets x duration buckets (video)."""
        frames = len(self.num_frames) if self.modality == "video" else 1
        return len(self.buckets) * frames

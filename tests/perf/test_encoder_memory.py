"""The frozen encoders' memory model (perf/encoder_memory.py) against what runs on CPU: weight
bytes equal the loaded encoders', the VAE working-set formula equals the live bytes measured by
``LiveTensorBytes`` for several encoder shapes, and a whole ``FrozenEncoders.encode`` call
(images, videos in ``vae_batch`` chunks, DINO and T5) is within 2 % of the estimate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lumos_mcore.config.media import EncodersConfig
from lumos_mcore.encoders.frozen import FrozenEncoders
from lumos_mcore.encoders.tiny import save_tiny_encoders
from lumos_mcore.perf.encoder_memory import (
    LiveTensorBytes,
    encode_working_bytes,
    encoder_weight_bytes,
    estimate_encoder_memory,
    vae_encode_peak_bytes,
)
from lumos_mcore.perf.memory import estimate_job_memory


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return save_tiny_encoders(tmp_path_factory.mktemp("encoders"))


def _cfg(enc, **kw) -> EncodersConfig:
    base = dict(
        vae=str(enc["vae"]),
        dino=str(enc["dino"]),
        t5=str(enc["t5"]),
        dino_image_size=32,
        t5_max_length=16,
        device="cpu",
    )
    return EncodersConfig(**{**base, **kw})


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_live_tensor_bytes_counts_new_storages_once():
    with LiveTensorBytes() as live:
        a = torch.ones(1000)  # 4000 B
        v = a.view(10, 100)  # a view: no new memory
        a.mul_(2.0)  # in place: no new memory
        b = v * 2  # 4000 B more
        del a, v
        c = b + 1  # a's storage is free again: peak stays 8000
    assert live.peak == 8000 and live.current == 8000  # b and c alive
    del b, c
    assert live.current == 0


@pytest.mark.parametrize(
    ("channels", "per_block"),
    [([8, 8, 8, 8], 1), ([8, 32, 64, 64], 2), ([16, 16, 64, 128], 1), ([4, 32, 32], 3)],
)
def test_vae_formula_equals_measured_peak(channels, per_block):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=channels,
        layers_per_block=per_block,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        latent_channels=4,
        norm_num_groups=4,
    ).eval()
    for frames, h, w in [(2, 64, 64), (1, 96, 64)]:
        x = torch.randn(frames, 3, h, w)
        with torch.no_grad(), LiveTensorBytes() as live:
            vae.encode(x).latent_dist.mode()
        want = vae_encode_peak_bytes(
            dict(vae.config), frames=frames, height=h, width=w, dtype_bytes=4
        )
        assert live.peak == want, (channels, per_block, frames, h, w)


@pytest.mark.parametrize(
    ("cond", "dtype"), [("dino_cls", "fp32"), ("dino_patch", "bf16"), ("t5", "fp32")]
)
def test_weight_bytes_equal_loaded_encoders(encoders, cond, dtype):
    cfg = _cfg(encoders, cond=cond, dtype=dtype)
    fe = FrozenEncoders(cfg)
    cond_model = fe.dino.model if fe.dino is not None else fe.t5.model
    got = encoder_weight_bytes(cfg)
    name = "t5" if cond == "t5" else "dino"
    assert got == {"vae": _module_bytes(fe.vae.vae), name: _module_bytes(cond_model)}


@pytest.mark.parametrize(
    ("cond", "dtype", "vae_batch", "shape"),
    [
        ("dino_cls", "fp32", 16, (2, 3, 64, 96)),  # images
        ("dino_patch", "bf16", 16, (4, 3, 64, 64)),  # bf16 encoders: the VAE input is a copy
        ("t5", "fp32", 2, (2, 3, 4, 64, 64)),  # video in chunks of 2 frames, T5 captions
        ("dino_cls", "fp32", 3, (2, 3, 4, 128, 128)),  # 8 frames in chunks of 3
    ],
)
def test_encode_call_within_two_percent(encoders, cond, dtype, vae_batch, shape):
    """The estimate bounds the measured call; less the decoded pixels (here made before the
    call, on the device already) and their fp32 copy that the CPU encoder skips, it is the
    measured peak to 2 %."""
    cfg = _cfg(encoders, cond=cond, dtype=dtype, vae_batch=vae_batch)
    fe = FrozenEncoders(cfg)
    pixels = torch.rand(*shape) * 2 - 1
    batch = {"pixels": pixels, "caption": ["a cat"] * shape[0], "index": torch.arange(shape[0])}
    with torch.no_grad(), LiveTensorBytes() as live:
        fe.encode(batch)
    video = len(shape) == 5
    est = encode_working_bytes(
        cfg, samples=shape[0], frames=shape[2] if video else 1, height=shape[-2], width=shape[-1]
    )
    assert est >= live.peak
    made_here = pixels.numel() * 4  # the pixels term
    if not video and dtype == "fp32":
        made_here *= 2  # .to(fp32) on CPU returns the same tensor: no copy is made
    assert abs(est - made_here - live.peak) <= 0.02 * live.peak, (est, made_here, live.peak)


def test_worst_bucket_packs_and_cpu_placement(encoders):
    cfg = _cfg(encoders, device="auto")
    buckets = [[64, 64], [64, 128]]
    one = estimate_encoder_memory(cfg, buckets=buckets, clip_lengths=[1], micro_batch_size=2)
    shape = dict(samples=2, frames=1, height=64, width=128)
    assert one.working == encode_working_bytes(cfg, **shape)  # the larger bucket decides
    assert one.weight_bytes == sum(encoder_weight_bytes(cfg).values()) > 0
    # A 96-token pack holds 6 samples of 64x64 (16 tokens) but 3 of 64x128: 6 x 64x64 decides.
    packed = estimate_encoder_memory(
        cfg, buckets=buckets, clip_lengths=[1], micro_batch_size=1, pack_capacity=96
    )
    assert packed.working == encode_working_bytes(cfg, samples=6, frames=1, height=64, width=64)
    video = estimate_encoder_memory(cfg, buckets=buckets, clip_lengths=[2, 4], micro_batch_size=1)
    assert video.working == encode_working_bytes(cfg, samples=1, frames=4, height=64, width=128)
    on_cpu = estimate_encoder_memory(
        dataclasses.replace(cfg, device="cpu"),
        buckets=buckets,
        clip_lengths=[1],
        micro_batch_size=2,
    )
    assert on_cpu.weight_bytes == 0 and on_cpu.working == 0 and not on_cpu.on_device


def test_job_estimate_adds_weights_and_the_larger_peak(encoders, tmp_path):
    """The encoders' weights add to the static memory; encoding and the train step's
    activations do not overlap, so only the larger of the two peaks counts."""
    from lumos_mcore.config.media import MediaDataConfig
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.config.train import TrainConfig
    from lumos_mcore.data.media.synthetic import write_synthetic_media

    media_dir = write_synthetic_media(tmp_path / "media", num_images=2, sizes=[(64, 64)], seed=0)
    media = MediaDataConfig(
        path=str(media_dir), buckets=[[64, 64]], encoders=_cfg(encoders, device="auto")
    )
    model = ModelConfig(name="Lumos-Micro/2", latent_size=8, cond_channels=32)
    train = TrainConfig(micro_batch_size=4, global_batch_size=8)
    args = (model, ParallelConfig(), train, 1)
    plain = estimate_job_memory(*args, bf16=False)
    with_enc = estimate_job_memory(*args, bf16=False, media=media)
    weights = sum(encoder_weight_bytes(media.encoders).values())
    work = encode_working_bytes(media.encoders, samples=4, frames=1, height=64, width=64)
    assert with_enc.encoders == weights and with_enc.encode_working == work
    step = plain.activations + plain.working
    assert with_enc.total == plain.static + weights + max(step, work)
    assert dict(with_enc.rows())["frozen encoders"] == pytest.approx(weights / 2**30)

"""Config validation: every error names its flag; YAML + overrides build the media section."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumos_mcore.config.loader import load_config
from lumos_mcore.config.media import EncodersConfig, MediaDataConfig


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"modality": "audio"}, "media.modality='audio'"),
        ({"buckets": []}, r"media.buckets=\[\]: give at least one"),
        (
            {"buckets": [[64, 64], [60, 64]]},
            r"media.buckets\[1\]=\[60, 64\]: H and W must be multiples of 8",
        ),
        ({"buckets": [[64, 64], [64, 64]]}, r"media.buckets\[1\]=\[64, 64\]: listed twice"),
        ({"buckets": [[64]]}, r"media.buckets\[0\]=\[64\]"),
        ({"num_frames": [16, 16]}, "media.num_frames=.*duplicate"),
        ({"frame_stride": 0}, "media.frame_stride=0"),
        ({"max_upscale": 0.5}, "media.max_upscale=0.5"),
        ({"decoder": "ffmpeg"}, "media.decoder='ffmpeg'"),
        ({"dali_device": "tpu"}, "media.dali_device='tpu'"),
        ({"color_matrix": "bt2020"}, "media.color_matrix='bt2020'"),
        ({"bucket_chunk": 0}, "media.bucket_chunk=0"),
        ({"max_bad_fraction": 1.5}, "media.max_bad_fraction=1.5"),
        (
            {"buckets": [[64, 64], [64, 96]], "shuffle_shards_per_block": 4},
            "media.shuffle_shards_per_block=4: must be 1 with 2 buckets",
        ),
    ],
)
def test_media_config_errors_name_the_flag(synth_media, kw, flag) -> None:
    with pytest.raises(ValueError, match=flag):
        MediaDataConfig(path=str(synth_media), **kw)


def test_media_path_needs_an_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"media.path=.*no index.json.*make_media_shards"):
        MediaDataConfig(path=str(tmp_path))


def test_encoder_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"media.encoders.vae=.*no config.json"):
        EncodersConfig(vae=str(tmp_path))
    with pytest.raises(ValueError, match="media.encoders.cond='clip'"):
        EncodersConfig(cond="clip")
    with pytest.raises(ValueError, match="media.encoders.vae_scaling_factor=0"):
        EncodersConfig(vae_scaling_factor=0)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="media.encoders.dino: required"):
        EncodersConfig(vae=str(tmp_path)).check_complete()
    with pytest.raises(ValueError, match="media.encoders.t5: required"):
        EncodersConfig(vae=str(tmp_path), cond="t5").check_complete()
    with pytest.raises(ValueError, match="media.encoders.vae: required"):
        EncodersConfig().check_complete()


def test_yaml_and_overrides(synth_media, tmp_path: Path) -> None:
    y = tmp_path / "m.yaml"
    y.write_text(f"path: {synth_media}\nmodality: video\nbuckets: [[32, 32], [32, 48]]\n")
    cfg = load_config(MediaDataConfig, y, ["num_frames=[8,4]", "encoders.cond=t5"])
    assert cfg.buckets == [[32, 32], [32, 48]] and cfg.num_frames == [8, 4]
    assert cfg.encoders.cond == "t5" and cfg.num_buckets == 4

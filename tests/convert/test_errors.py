"""Conversion failures name what is wrong and leave nothing behind; the streaming writer.

All in the test process (HF / PixArt outputs need no torch.distributed), plus one run of the
command-line tool for its exit status and message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.convert import ShardedSafetensorsWriter, TensorSpec, convert_checkpoint, parse_size
from lumos_mcore.convert import pipeline as pipeline_mod
from lumos_mcore.hf import LumosTransformer2DModel
from lumos_mcore.models.dit.hf_adapter import ConversionError, model_config_from_hf_config

REPO = Path(__file__).resolve().parents[2]
HF = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=64,
    depth=2,
    num_heads=4,
    cond_channels=16,
    cond_tokens=2,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_errors")
    model = LumosTransformer2DModel(**HF)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "hf")
    return root / "hf"


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _config_yaml(path: Path, **changes) -> Path:
    cfg = model_config_from_hf_config(HF)
    fields = {k: getattr(cfg, k) for k in ("name", "latent_size", "cond_channels", "cond_tokens")}
    fields.update(depth=cfg.depth_, hidden_size=cfg.hidden_size_, num_heads=cfg.num_heads_)
    fields.update(changes)
    path.write_text(yaml.safe_dump({"model": fields}))
    return path


def test_wrong_config_names_tensor_and_both_shapes(hf_dir, tmp_path):
    cfg = _config_yaml(tmp_path / "job.yaml", hidden_size=48)
    dst = tmp_path / "out" / "hf"
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(hf_dir, "hf", dst, "hf", model_config=cfg)
    m = re.search(
        r"tensor '([\w.]+)' has shape (\([\d, ]*\)), expected (\([\d, ]*\))", str(err.value)
    )
    assert m is not None, str(err.value)
    name, have, want = m.group(1), eval(m.group(2)), eval(m.group(3))  # noqa: S307 - a tuple
    stored = load_file(hf_dir / "diffusion_pytorch_model.safetensors")[name]
    assert have == tuple(stored.shape)
    from lumos_mcore.models.dit.hf_adapter import hf_shapes

    assert want == hf_shapes(model_config_from_hf_config({**HF, "hidden_size": 48}))[name]
    assert not dst.exists() and not (tmp_path / "out").exists()


def test_wrong_depth_and_heads_are_refused(hf_dir, tmp_path):
    base = model_config_from_hf_config(HF)
    deeper = ModelConfig(
        name=base.name,
        latent_size=8,
        cond_channels=16,
        cond_tokens=2,
        depth=3,
        hidden_size=64,
        num_heads=4,
    )
    with pytest.raises(ConversionError, match=r"lacks .*blocks\.2\."):
        convert_checkpoint(hf_dir, "hf", tmp_path / "a", "hf", model_config=deeper)
    other_heads = ModelConfig(**{**deeper.__dict__, "depth": 2, "num_heads": 2})
    with pytest.raises(ConversionError, match=r"model\.num_heads=2.*num_heads=4"):
        convert_checkpoint(hf_dir, "hf", tmp_path / "b", "mcore", model_config=other_heads)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_inexpressible_targets_and_layouts(hf_dir, tmp_path):
    with pytest.raises(ConversionError, match=r"adaln_type='zero'"):
        convert_checkpoint(hf_dir, "hf", tmp_path / "px", "pixart-diffusers")
    with pytest.raises(ValueError, match=r"parallel\.tp=3"):
        convert_checkpoint(hf_dir, "hf", tmp_path / "m", "mcore", tp=3)
    with pytest.raises(ValueError, match=r"parallel\.pp=4.*num_layers=2"):
        convert_checkpoint(hf_dir, "hf", tmp_path / "m", "mcore", pp=4)
    with pytest.raises(ValueError, match=r"only applies to --dst-format mcore"):
        convert_checkpoint(hf_dir, "hf", tmp_path / "h", "hf", tp=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_destination_is_kept_unless_overwrite(hf_dir, tmp_path):
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_checkpoint(hf_dir, "hf", dst, "hf")
    assert (dst / "keep.txt").read_text() == "x"
    convert_checkpoint(hf_dir, "hf", dst, "hf", overwrite=True, dtype="bf16")
    assert not (dst / "keep.txt").exists()
    ref = load_file(hf_dir / "diffusion_pytorch_model.safetensors")
    out = load_file(dst / "diffusion_pytorch_model.safetensors")
    assert out.keys() == ref.keys()
    assert all(torch.equal(out[k], ref[k].to(torch.bfloat16)) for k in ref)
    assert _leftovers(tmp_path) == []


def test_failure_mid_stream_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    calls = []
    real_write = ShardedSafetensorsWriter.write

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 7:
            raise OSError("disk full")
        real_write(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", failing_write)
    dst = tmp_path / "new" / "deeper" / "hf"
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(hf_dir, "hf", dst, "hf", max_shard_size="20KB")
    assert len(calls) == 7
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path) == []


def test_corrupt_source_fails_cleanly(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):  # noqa: B017 - safetensors reports truncation its own way
        convert_checkpoint(broken, "hf", tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_command_line_error_exit(hf_dir, tmp_path):
    cfg = _config_yaml(tmp_path / "model.yaml", hidden_size=48)
    dst = tmp_path / "cli_out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_checkpoint.py"),
            "--src",
            str(hf_dir),
            "--src-format",
            "hf",
            "--dst",
            str(dst),
            "--dst-format",
            "hf",
            "--config",
            str(cfg),
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and "expected" in proc.stderr
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.yaml"]


# ---------------------------------------------------------------------------------------------
# the streaming writer
# ---------------------------------------------------------------------------------------------
def test_streaming_writer_matches_safetensors_and_shards(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "a.weight": torch.randn(64, 33, generator=g),
        "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.big": torch.randn(100, 100, generator=g),  # larger than a shard: its own file
        "d.half": torch.randn(3, 5, generator=g).half(),
        "e.index": torch.arange(10),
        "f.scalar": torch.tensor(2.5),
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, specs, max_shard_size="10KB")
    for name, t in tensors.items():
        writer.write(name, t)
    files = writer.close()
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in tensors.values()
    )
    assert [f.name for f in files[:-1]] == sorted(set(index["weight_map"].values()))
    assert index["weight_map"]["c.big"] not in (
        index["weight_map"]["a.weight"],
        index["weight_map"]["d.half"],
    )
    loaded = {}
    for f in files[:-1]:
        loaded.update(load_file(f))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert parse_size("2GiB") == 2**31 and parse_size("500MB") == 5 * 10**8
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_writer_refuses_unannounced_tensors(tmp_path):
    spec = TensorSpec("w", (2, 2), torch.float32)
    writer = ShardedSafetensorsWriter(tmp_path, [spec])
    with pytest.raises(ValueError, match=r"'w' \(2, 3\).*announced"):
        writer.write("w", torch.zeros(2, 3))
    writer.abort()
    writer = ShardedSafetensorsWriter(tmp_path, [spec, TensorSpec("v", (1,), torch.float32)])
    writer.write("w", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never came"):
        writer.close()
    writer.abort()


def test_model_config_yaml_forms(tmp_path):
    (tmp_path / "section.yaml").write_text(yaml.safe_dump({"name": "Lumos-B/2", "latent_size": 16}))
    cfg = pipeline_mod.load_model_config(tmp_path / "section.yaml")
    assert (cfg.depth_, cfg.hidden_size_, cfg.latent_size) == (12, 768, 16)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": {"name": "Lumos-B/2", "widht": 3}}))
    with pytest.raises(ConversionError, match="widht"):
        pipeline_mod.load_model_config(tmp_path / "bad.yaml")

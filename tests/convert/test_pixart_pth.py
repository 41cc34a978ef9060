"""diffusers PixArt and released Lumos ``.pth`` checkpoints through the converter.

- A randomly initialised ``PixArtTransformer2DModel`` (every weight random, saved with
  ``save_pretrained``) -> megatron -> the trainer loads it and saves again without training
  (step 0) -> ``pixart-diffusers``: identical tensors, ``from_pretrained`` works, and the
  megatron model's forward equals diffusers' forward (fp32, <= 1e-5 relative).
- A tiny state dict in the released Lumos layout (``.pth`` training container) -> megatron and
  -> HF: both forwards equal a float64 re-implementation of the released Lumos block written
  below (per-head attention loops, per-block adaLN-Zero).
- The same I2I weights inflated to an I2V model (spatial + temporal attention, 3 frames):
  ``load_model`` gives the megatron video model, whose every frame equals the I2I model (the
  ``.pth`` on megatron, checked against the reference above) on that frame, at that frame's
  timestep (the new temporal out-projections are zero, their Q/K/V random).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file

from lumos_mcore.convert import McoreCheckpointReader, convert_checkpoint, inflate_i2i_to_i2v
from lumos_mcore.data.synthetic import write_synthetic_feature_shards
from lumos_mcore.hf import LumosTransformer2DModel
from tests.dist_utils import run_distributed
from tests.training.helpers import make_job

PIXART = dict(
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    cross_attention_dim=48,
    caption_channels=12,
    sample_size=8,
    patch_size=2,
)
# Released layout: hidden 144 = 2 heads of 72 (the DiT-XL/2 head width the loader assumes).
PTH = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=144,
    depth=2,
    num_heads=2,
    cond_channels=16,
    cond_tokens=3,
)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _pixart_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([13.0, 901.0]),
        "cond": torch.randn(2, 5, 12, generator=g),
        "cond_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool),
    }


def _pth_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(22)
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([40.0, 650.0]),
        "cond": torch.randn(2, 3, 16, generator=g),
    }


def _video_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(23)
    return {
        "latents": torch.randn(2, 4, 3, 8, 8, generator=g),  # [B, C, T, H, W]
        "timesteps": torch.tensor([[0.0, 120.0, 120.0], [0.0, 730.0, 730.0]]),  # per frame
        "cond": torch.randn(2, 3, 16, generator=g),
    }


def _diffusers_forward(model: PixArtTransformer2DModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(
            batch["latents"],
            encoder_hidden_states=batch["cond"],
            timestep=batch["timesteps"],
            encoder_attention_mask=batch["cond_mask"].long(),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample


def _megatron_job(rank, world, pixart_dir, pth_path, data, root, batches):
    """PixArt -> megatron -> trainer (load, save at step 0); .pth -> megatron; .pth -> I2V;
    the megatron forwards."""
    from lumos_mcore import load_model
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.config.train import CheckpointConfig
    from lumos_mcore.convert import McoreCheckpointReader
    from lumos_mcore.convert.sources import model_config_from_dict
    from lumos_mcore.training.checkpoint import Checkpointer
    from lumos_mcore.training.loop import Trainer
    from lumos_mcore.training.setup import build_model

    root = Path(root)
    converted = convert_checkpoint(pixart_dir, "pixart-diffusers", root / "px_mcore", "mcore")
    cfg = model_config_from_dict(McoreCheckpointReader(converted).model_config)
    job = make_job(
        data,
        root / "px_train",
        steps=1,
        model=cfg,
        checkpoint=CheckpointConfig(save_interval=4, load=str(converted)),
    )
    trainer = Trainer(job)
    saved = trainer.save()  # a training checkpoint of the loaded weights, step 0
    with torch.no_grad():
        pixart_out = trainer.chunks[0](**batches["pixart"])

    pth_mcore = convert_checkpoint(pth_path, "lumos-pth", root / "pth_mcore", "mcore", ema=True)
    pth_cfg = model_config_from_dict(McoreCheckpointReader(pth_mcore).model_config)
    chunks, _ = build_model(pth_cfg, ParallelConfig(), seed=3, wrap_ddp=False)
    Checkpointer(root).load(pth_mcore, chunks)
    with torch.no_grad():
        pth_out = chunks[0](**batches["pth"])

    i2v = inflate_i2i_to_i2v(pth_path, root / "i2v", src_format="lumos-pth", num_frames=3, ema=True)
    video_model = load_model(i2v)
    video = batches["video"]
    with torch.no_grad():
        video_out = video_model(**video)
        per_frame = [  # the I2I model (the .pth on megatron) on each frame
            chunks[0](video["latents"][:, :, f], video["timesteps"][:, f], video["cond"])
            for f in range(video["latents"].shape[2])
        ]
    return {
        "saved": saved,
        "pixart_out": pixart_out,
        "pth_out": pth_out,
        "video_out": video_out,
        "image_per_frame": torch.stack(per_frame, dim=2),
        "video_model": type(video_model).__name__,
        "i2v": str(i2v),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_pixart_pth")
    pixart = PixArtTransformer2DModel(**PIXART).eval()
    _randomise(pixart, seed=1)
    pixart.save_pretrained(root / "pixart")

    ema = LumosTransformer2DModel(**PTH)
    _randomise(ema, seed=2)
    raw = LumosTransformer2DModel(**PTH)
    _randomise(raw, seed=3)
    pth = root / "Lumos_I2I.pth"
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in raw.state_dict().items()},
            "ema": {**ema.state_dict(), "pos_embed": ema.pos_embed.clone()},
            "step": 5000,
        },
        pth,
    )
    data = write_synthetic_feature_shards(
        root / "data", num_samples=8, latent_size=8, cond_tokens=120, cond_dim=12, seed=0
    )
    (res,) = run_distributed(
        _megatron_job,
        1,
        str(root / "pixart"),
        str(pth),
        data,
        str(root),
        {"pixart": _pixart_inputs(), "pth": _pth_inputs(), "video": _video_inputs()},
        timeout=300,
    )
    return {
        "root": root,
        "pixart": pixart,
        "pth": pth,
        "ema_sd": {k: v.clone() for k, v in ema.state_dict().items()},
        **res,
    }


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    return float((out - ref).abs().max() / ref.abs().max())


def test_legacy_transformer2d_pixart_folder_is_read_as_pixart(setup):
    """Released PixArt-α folders predate ``PixArtTransformer2DModel``: their config says
    ``Transformer2DModel`` with ``norm_type="ada_norm_single"`` (diffusers remaps it the same
    way). Detected and loaded as PixArt, they give the model of the current-format folder."""
    import json
    import shutil

    from lumos_mcore import load_model
    from lumos_mcore.convert.sources import detect_format

    legacy = setup["root"] / "pixart_legacy"
    shutil.copytree(setup["root"] / "pixart", legacy)
    config = json.loads((legacy / "config.json").read_text())
    assert config["norm_type"] == "ada_norm_single"
    config["_class_name"] = "Transformer2DModel"
    (legacy / "config.json").write_text(json.dumps(config))
    assert detect_format(legacy) == "pixart-diffusers"
    batch = _pixart_inputs()
    with torch.no_grad():
        out = load_model(legacy)(**batch)
    assert _rel_err(out, _diffusers_forward(setup["pixart"], batch)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# PixArt
# ---------------------------------------------------------------------------------------------
def test_megatron_forward_equals_diffusers_pixart(setup):
    ref = _diffusers_forward(setup["pixart"], _pixart_inputs())
    assert ref.abs().mean() > 1e-2
    assert _rel_err(setup["pixart_out"], ref) <= 1e-5


def test_pixart_round_trip_is_identical(setup):
    out = setup["root"] / "px_back"
    convert_checkpoint(Path(setup["saved"]).parent, "mcore", out, "pixart-diffusers")
    original = setup["pixart"].state_dict()
    back = load_file(out / "diffusion_pytorch_model.safetensors")
    params = {k for k, _ in setup["pixart"].named_parameters()}
    assert params <= set(back) <= set(original)
    for name, tensor in back.items():
        assert torch.equal(tensor, original[name]), name
    reloaded = PixArtTransformer2DModel.from_pretrained(out).eval()
    for key, value in PIXART.items():
        assert reloaded.config[key] == value, key
    batch = _pixart_inputs()
    assert torch.equal(
        _diffusers_forward(reloaded, batch), _diffusers_forward(setup["pixart"], batch)
    )


def test_load_model_reads_pixart_folder(setup):
    from lumos_mcore import load_model

    batch = _pixart_inputs()
    model = load_model(setup["root"] / "pixart")
    with torch.no_grad():
        out = model(**batch)
    assert _rel_err(out, _diffusers_forward(setup["pixart"], batch)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# released Lumos .pth
# ---------------------------------------------------------------------------------------------
def _ln(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _lin(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
    hd = q.shape[-1] // heads
    out = torch.empty_like(q)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd), dim=-1)
        out[..., s] = w @ v[..., s]
    return out


def _sincos_2d(d: int, grid: int) -> torch.Tensor:
    """MAE / DiT 2-D table: first half of the channels encodes the column, second the row."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_d(d // 2, cols), one_d(d // 2, rows)], dim=1)  # [grid*grid, D]


def lumos_reference(sd: dict, latents, t, cond, heads: int) -> torch.Tensor:
    """The released Lumos I2I forward over a raw state dict, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    latents, cond = latents.double(), cond.double()
    b, cin, hh, ww = latents.shape
    d, _, p, _ = sd["x_embedder.proj.weight"].shape
    h, w = hh // p, ww // p
    patches = latents.reshape(b, cin, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
    x = patches @ sd["x_embedder.proj.weight"].reshape(d, -1).T + sd["x_embedder.proj.bias"]
    x = x + _sincos_2d(d, h)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    args = t.double()[:, None] * freqs[None]
    te = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # [B, 256], cos first
    te = _lin(_silu(_lin(te, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")  # [B, D]
    y = _lin(_gelu_tanh(_lin(cond, sd, "y_embedder.y_proj.fc1")), sd, "y_embedder.y_proj.fc2")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        pre = f"blocks.{i}"
        mod = _lin(_silu(te), sd, f"{pre}.adaLN_modulation.1")[:, None]  # [B, 1, 6D]
        sh1, sc1, g1, sh2, sc2, g2 = mod.split(d, dim=-1)
        q, k, v = _lin(_ln(x) * (1 + sc1) + sh1, sd, f"{pre}.attn.qkv").split(d, dim=-1)
        x = x + g1 * _lin(_heads_attention(q, k, v, heads), sd, f"{pre}.attn.proj")
        ck, cv = _lin(y, sd, f"{pre}.cross_attn.kv_linear").split(d, dim=-1)
        cq = _lin(x, sd, f"{pre}.cross_attn.q_linear")
        x = x + _lin(_heads_attention(cq, ck, cv, heads), sd, f"{pre}.cross_attn.proj")
        hid = _gelu_tanh(_lin(_ln(x) * (1 + sc2) + sh2, sd, f"{pre}.mlp.fc1"))
        x = x + g2 * _lin(hid, sd, f"{pre}.mlp.fc2")
    shift, scale = sd["final_layer.scale_shift_table"][:, None, None] + te[None, :, None]
    o = _lin(_ln(x) * (1 + scale) + shift, sd, "final_layer.linear")  # [B, N, p*p*C]
    c = o.shape[-1] // (p * p)
    o = o.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
    return o.reshape(b, c, hh, ww).float()


@pytest.fixture(scope="module")
def pth_reference(setup):
    batch = _pth_inputs()
    ref = lumos_reference(setup["ema_sd"], batch["latents"], batch["timesteps"], batch["cond"], 2)
    assert ref.abs().mean() > 1e-2
    return ref


def test_released_pth_to_megatron_matches_reference(setup, pth_reference):
    assert _rel_err(setup["pth_out"], pth_reference) <= 1e-5


def test_released_pth_to_hf_matches_reference(setup, pth_reference):
    from lumos_mcore import load_model

    out_dir = setup["root"] / "pth_hf"
    convert_checkpoint(setup["pth"], "lumos-pth", out_dir, "hf", ema=True)
    model = LumosTransformer2DModel.from_pretrained(out_dir).eval()
    batch = _pth_inputs()
    with torch.no_grad():
        out = model(batch["latents"], batch["timesteps"], batch["cond"]).sample
        direct = load_model(setup["pth"])(**batch)  # EMA container preferred
    assert _rel_err(out, pth_reference) <= 1e-5
    assert torch.equal(direct, out)


# ---------------------------------------------------------------------------------------------
# I2I -> I2V inflation
# ---------------------------------------------------------------------------------------------
def test_inflated_i2v_is_the_image_model_per_frame(setup):
    assert setup["video_model"] == "LumosInferenceModel"  # the HF video class, one process
    out, ref = setup["video_out"], setup["image_per_frame"]
    assert out.shape == ref.shape == (2, 8, 3, 8, 8)
    assert ref.abs().mean() > 1e-2
    for f in range(3):
        assert _rel_err(out[:, :, f], ref[:, :, f]) <= 1e-5, f"frame {f}"


def test_inflated_checkpoint_keeps_image_weights_and_zero_temporal_outputs(setup):
    i2v = dict(McoreCheckpointReader(setup["i2v"]).tensors())
    i2i = dict(McoreCheckpointReader(setup["root"] / "pth_mcore").tensors())
    new = sorted(set(i2v) - set(i2i))
    assert set(i2i) <= set(i2v)
    assert all(torch.equal(i2v[k], i2i[k]) for k in i2i)
    assert new and all(".temporal_attention." in k for k in new)
    for name in new:
        if ".linear_proj." in name:
            assert not i2v[name].any(), name
        elif name.endswith("linear_qkv.weight"):
            assert i2v[name].abs().mean() > 1e-3, name  # trainable from the first step

"""megatron LumosDiT <-> LumosTransformer2DModel state-dict maps, and released ``.pth`` loading.

One spawned single-process megatron job builds randomised ``LumosDiT`` models (adaLN-Zero;
adaLN-single with size conditioning, padded condition tokens, a forced null condition and a
non-square latent) and a model loaded from a ``.pth`` written here in the released layout; the
test process then checks that

- ``mcore_to_hf`` weights in ``LumosTransformer2DModel`` (strict load) give the megatron
  outputs to 1e-5 — the megatron model computes the reference semantics;
- ``hf_to_mcore(mcore_to_hf(sd))`` is bit-identical to ``sd``;
- the ``.pth`` model on megatron equals an explicit re-implementation of the Lumos block
  written below (per-head loops, diffusers' own sin-cos / timestep features);
- wrong names, shapes and configs fail with messages naming what is wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import Timesteps
from diffusers.models.embeddings import get_2d_sincos_pos_embed as hf_2d_sincos

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.hf import LumosTransformer2DModel
from lumos_mcore.models.dit.hf_adapter import (
    ConversionError,
    StateDictConverter,
    hf_config_from_model_config,
    hf_to_mcore,
    mcore_to_hf,
    model_config_from_hf_config,
)
from lumos_mcore.models.dit.lumos_pth import load_lumos_pth
from tests.dist_utils import run_distributed

CASES = {
    "zero": dict(
        name="Lumos-Micro/2",
        latent_size=8,
        depth=2,
        hidden_size=48,
        num_heads=4,
        cond_tokens=3,
        cond_channels=12,
    ),
    "single_size_mask": dict(
        name="Lumos-Micro/2",
        variant="t2i",
        latent_size=8,
        depth=2,
        hidden_size=48,
        num_heads=2,
        cond_tokens=5,
        cond_channels=16,
        adaln_type="single",
        use_size_conditioning=True,
        learn_sigma=False,
        pos_interpolation_scale=2.0,
        norm_eps=1e-5,
    ),
}
# Released-layout checkpoint: hidden 144 -> 2 heads of 72 (the DiT-XL/2 head width).
PTH = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=144,
    depth=2,
    num_heads=2,
    cond_channels=16,
    cond_tokens=1,
)


def _randomise(params, seed: int, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(kw: dict, hw: tuple[int, int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lc, cc = kw.get("cond_tokens", 1), kw.get("cond_channels", 768)
    batch = {
        "latents": torch.randn(2, 4, *hw, generator=g),
        "timesteps": torch.tensor([17.0, 803.0]),
        "cond": torch.randn(2, lc, cc, generator=g),
    }
    if kw.get("use_size_conditioning"):
        batch["cond_mask"] = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
        batch["force_drop_ids"] = torch.tensor([False, True])
        batch["resolution"] = torch.tensor([[512.0, 768.0], [256.0, 256.0]])
        batch["aspect_ratio"] = torch.tensor([[1.5], [1.0]])
    return batch


INPUTS = {
    "zero": _inputs(CASES["zero"], (8, 8), 1),
    "single_size_mask": _inputs(CASES["single_size_mask"], (8, 12), 2),
    "pth": _inputs(PTH, (8, 8), 3),
}


# ---------------------------------------------------------------------------------------------
# the megatron side (one spawned process)
# ---------------------------------------------------------------------------------------------
def _megatron_job(rank, world, cases, inputs, pth_path):
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.models.dit.model import LumosDiT, build_transformer_config
    from lumos_mcore.models.dit.state_dict import load_full_state_dict
    from lumos_mcore.parallel.state import initialize_parallel

    initialize_parallel(ParallelConfig(), num_attention_heads=2, num_layers=2)
    results = {}
    for i, (name, kw) in enumerate(cases.items()):
        cfg = ModelConfig(**kw)
        model = LumosDiT(build_transformer_config(cfg), cfg)
        _randomise(model.parameters(), seed=10 + i)
        with torch.no_grad():
            out = model(**inputs[name])
        results[name] = {"state": model.state_dict(), "out": out}

    hf_sd, cfg = load_lumos_pth(pth_path)
    model = LumosDiT(build_transformer_config(cfg), cfg)
    load_full_state_dict(model, hf_to_mcore(hf_sd, cfg))
    with torch.no_grad():
        results["pth"] = {"cfg": cfg, "out": model(**inputs["pth"])}
    return results


def _hf_forward(model: LumosTransformer2DModel, batch: dict) -> torch.Tensor:
    extra = None
    if "resolution" in batch:
        extra = {"resolution": batch["resolution"], "aspect_ratio": batch["aspect_ratio"]}
    with torch.no_grad():
        return model(
            batch["latents"],
            batch["timesteps"],
            batch["cond"],
            encoder_attention_mask=batch.get("cond_mask"),
            added_cond_kwargs=extra,
            force_drop_ids=batch.get("force_drop_ids"),
        ).sample


def _released_checkpoint() -> tuple[dict, dict]:
    """(EMA weights with pos_embed, training weights) of a tiny released-layout model."""
    model = LumosTransformer2DModel(**PTH)
    _randomise(model.parameters(), seed=5)
    ema = {k: v.clone() for k, v in model.state_dict().items()}  # not views of the params
    ema["pos_embed"] = model.pos_embed.clone()
    _randomise(model.parameters(), seed=6)
    return ema, dict(model.state_dict(), pos_embed=model.pos_embed.clone())


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    ema, raw = _released_checkpoint()
    path = tmp_path_factory.mktemp("pth") / "Lumos_I2I.pth"
    # DDP prefix, EMA next to the raw weights, and non-tensor bookkeeping: a training container.
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in raw.items()},
            "ema": {f"module.{k}": v for k, v in ema.items()},
            "step": 1000,
        },
        path,
    )
    return path, ema


@pytest.fixture(scope="module")
def megatron(released):
    (res,) = run_distributed(_megatron_job, 1, CASES, INPUTS, str(released[0]))
    return res


# ---------------------------------------------------------------------------------------------
# megatron <-> HF
# ---------------------------------------------------------------------------------------------
def _params(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_export_reproduces_megatron_outputs(megatron, case):
    cfg = ModelConfig(**CASES[case])
    hf_sd = mcore_to_hf(megatron[case]["state"], cfg)
    model = LumosTransformer2DModel(**hf_config_from_model_config(cfg)).eval()
    model.load_state_dict(hf_sd, strict=True)
    out = _hf_forward(model, INPUTS[case])
    ref = megatron[case]["out"]
    assert out.shape == ref.shape
    assert ref.abs().mean() > 1e-2  # every path carries signal
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err <= 1e-5, f"{case}: relative error {err:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact(megatron, case):
    cfg = ModelConfig(**CASES[case])
    params = _params(megatron[case]["state"])
    back = hf_to_mcore(mcore_to_hf(megatron[case]["state"], cfg), cfg)
    assert back.keys() == params.keys()
    for name, tensor in params.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name], tensor), name


def test_fused_qkv_is_regrouped_per_head():
    """HF ``[Q; K; V]`` rows land in megatron's ``[q_h; k_h; v_h]`` order (2 heads of 3)."""
    cfg = ModelConfig(name="Lumos-Micro/2", depth=1, hidden_size=12, num_heads=2, latent_size=4)
    conv = StateDictConverter(cfg, "hf")
    rows = torch.arange(36.0)[:, None].expand(36, 12)  # row r holds value r
    ((name, out),) = conv.convert_key("blocks.0.attn.qkv.weight", rows)
    assert name == "decoder.layers.0.self_attention.linear_qkv.weight"
    q, k, v = range(0, 12), range(12, 24), range(24, 36)
    order = [*q[:6], *k[:6], *v[:6], *q[6:], *k[6:], *v[6:]]
    assert out[:, 0].tolist() == order
    ((_, kv),) = conv.convert_key("blocks.0.cross_attn.kv_linear.bias", torch.arange(24.0))
    assert kv.tolist() == [*range(0, 6), *range(12, 18), *range(6, 12), *range(18, 24)]


def test_config_round_trip_and_registry_name():
    cfg = ModelConfig(**CASES["single_size_mask"])
    hf_cfg = hf_config_from_model_config(cfg)
    model = LumosTransformer2DModel(**hf_cfg)
    back = model_config_from_hf_config(dict(model.config))  # FrozenDict with _class_name etc.
    for field in (
        "depth_",
        "hidden_size_",
        "num_heads_",
        "patch_size",
        "in_channels",
        "latent_size",
        "learn_sigma",
        "cond_channels",
        "cond_tokens",
        "adaln_type",
        "use_size_conditioning",
        "pos_interpolation_scale",
        "norm_eps",
        "variant",
    ):
        assert getattr(back, field) == getattr(cfg, field), field
    # A shape that is a registry entry keeps its name and carries no overrides.
    tiny = model_config_from_hf_config(
        dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, sample_size=16)
    )
    assert (tiny.name, tiny.depth, tiny.hidden_size, tiny.variant) == (
        "Lumos-Tiny/2",
        None,
        None,
        "i2i",
    )
    assert model_config_from_hf_config(hf_cfg, spec="local").spec == "local"


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def _tiny_sd() -> tuple[ModelConfig, dict]:
    cfg = ModelConfig(**CASES["zero"])
    model = LumosTransformer2DModel(**hf_config_from_model_config(cfg))
    return cfg, model.state_dict()


def test_unknown_missing_and_repeated_tensors_are_named():
    cfg, sd = _tiny_sd()
    with pytest.raises(ConversionError, match=r"'blocks\.0\.attn\.extra\.weight'"):
        hf_to_mcore(dict(sd, **{"blocks.0.attn.extra.weight": torch.zeros(1)}), cfg)
    with pytest.raises(ConversionError, match=r"layer 2 does not exist \(depth=2\)"):
        hf_to_mcore(dict(sd, **{"blocks.2.attn.proj.bias": torch.zeros(48)}), cfg)
    missing = dict(sd)
    del missing["blocks.1.cross_attn.kv_linear.bias"]
    with pytest.raises(ConversionError, match=r"lacks 1 tensor.*blocks\.1\.cross_attn\.kv_linear"):
        hf_to_mcore(missing, cfg)
    with pytest.raises(ConversionError, match="this is a hf name"):
        mcore_to_hf(sd, cfg)
    conv = StateDictConverter(cfg, "hf")
    conv.convert_key("final_layer.linear.bias", torch.zeros(32))
    with pytest.raises(ConversionError, match="given twice"):
        conv.convert_key("final_layer.linear.bias", torch.zeros(32))
    # adaLN-single tensors are unknown to an adaLN-Zero model
    with pytest.raises(ConversionError, match=r"'t_block\.1\.weight'.*adaln_type='zero'"):
        conv.convert_key("t_block.1.weight", torch.zeros(288, 48))


def test_shape_mismatch_names_tensor_and_both_shapes():
    cfg, sd = _tiny_sd()
    bad = dict(sd, **{"blocks.1.attn.qkv.weight": torch.zeros(144, 40)})
    with pytest.raises(
        ConversionError,
        match=r"'blocks\.1\.attn\.qkv\.weight' has shape \(144, 40\), expected \(144, 48\)",
    ):
        hf_to_mcore(bad, cfg)
    mc = {"decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(96, 48)}
    with pytest.raises(ConversionError, match=r"\(96, 48\), expected \(192, 48\)"):
        mcore_to_hf(mc, cfg)


def test_inexpressible_hf_configs_are_refused():
    base = hf_config_from_model_config(ModelConfig(**CASES["zero"]))
    with pytest.raises(ConversionError, match=r"config\.out_channels=5"):
        model_config_from_hf_config(dict(base, out_channels=5))
    with pytest.raises(ConversionError, match=r"config\.mlp_ratio=3\.0"):
        model_config_from_hf_config(dict(base, mlp_ratio=3.0))
    with pytest.raises(ConversionError, match=r"config\.patch_size=3"):
        model_config_from_hf_config(dict(base, patch_size=3, sample_size=9))
    with pytest.raises(ConversionError, match=r"config\.pos_base_size=8"):
        model_config_from_hf_config(dict(base, pos_base_size=8))
    with pytest.raises(ConversionError, match=r"\['qk_norms'\]"):
        model_config_from_hf_config(dict(base, qk_norms=True))
    with pytest.raises(ConversionError, match=r"\['camera_dim'\] are not LumosTransformer3DModel"):
        model_config_from_hf_config(dict(base, num_frames=2, camera_dim=12))


# ---------------------------------------------------------------------------------------------
# released .pth checkpoints
# ---------------------------------------------------------------------------------------------
def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x * torch.sigmoid(x)


def _attention(q, k, v, heads):
    hd = q.shape[-1] // heads
    out = torch.empty_like(q)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd), dim=-1)
        out[..., s] = w @ v[..., s]
    return out


def lumos_reference(sd, latents, t, cond, heads):
    """Released Lumos I2I forward (per-block adaLN-Zero) over a raw state dict, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    latents, cond = latents.double(), cond.double()
    b, cin, hh, ww = latents.shape
    d, _, p, _ = sd["x_embedder.proj.weight"].shape
    h, w = hh // p, ww // p
    # patch embedding: each patch's (c, p, q) pixels through one linear map
    patches = latents.reshape(b, cin, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)
    x = patches @ sd["x_embedder.proj.weight"].reshape(d, -1).T + sd["x_embedder.proj.bias"]
    x = x + hf_2d_sincos(d, (h, w), base_size=h, interpolation_scale=1.0).double()
    te = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t).double()
    te = _lin(_silu(_lin(te, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")  # [B, D]
    y = _lin(_gelu_tanh(_lin(cond, sd, "y_embedder.y_proj.fc1")), sd, "y_embedder.y_proj.fc2")
    for i in range(sum(k.endswith("attn.proj.bias") and "cross" not in k for k in sd)):
        pre = f"blocks.{i}"
        mod = _lin(_silu(te), sd, f"{pre}.adaLN_modulation.1")[:, None]  # [B, 1, 6D]
        sh1, sc1, g1, sh2, sc2, g2 = mod.split(d, dim=-1)
        qkv = _lin(_ln(x) * (1 + sc1) + sh1, sd, f"{pre}.attn.qkv")
        q, k, v = qkv.split(d, dim=-1)
        x = x + g1 * _lin(_attention(q, k, v, heads), sd, f"{pre}.attn.proj")
        kv = _lin(y, sd, f"{pre}.cross_attn.kv_linear")
        ca = _attention(_lin(x, sd, f"{pre}.cross_attn.q_linear"), *kv.split(d, dim=-1), heads)
        x = x + _lin(ca, sd, f"{pre}.cross_attn.proj")
        hid = _gelu_tanh(_lin(_ln(x) * (1 + sc2) + sh2, sd, f"{pre}.mlp.fc1"))
        x = x + g2 * _lin(hid, sd, f"{pre}.mlp.fc2")
    shift, scale = sd["final_layer.scale_shift_table"][:, None, None] + te[None, :, None]
    o = _lin(_ln(x) * (1 + scale) + shift, sd, "final_layer.linear")  # [B, N, p*p*C]
    c = o.shape[-1] // (p * p)
    o = o.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
    return o.reshape(b, c, hh, ww).float()


def test_released_pth_on_megatron_matches_reference(released, megatron):
    _, ema = released
    cfg = megatron["pth"]["cfg"]
    assert (cfg.depth_, cfg.hidden_size_, cfg.num_heads_, cfg.patch_size) == (2, 144, 2, 2)
    assert (cfg.latent_size, cfg.cond_tokens, cfg.cond_channels) == (8, 1, 16)
    assert (cfg.adaln_type, cfg.learn_sigma, cfg.use_size_conditioning) == ("zero", True, False)
    assert cfg.pos_interpolation_scale == 1.0
    batch = INPUTS["pth"]
    weights = {k: v for k, v in ema.items() if k != "pos_embed"}  # the EMA copy is the one read
    ref = lumos_reference(weights, batch["latents"], batch["timesteps"], batch["cond"], heads=2)
    out = megatron["pth"]["out"]
    assert ref.abs().mean() > 1e-2
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err <= 1e-5, f"relative error {err:.2e}"


def test_pth_container_options_and_overrides(released, tmp_path):
    path, ema = released
    sd, cfg = load_lumos_pth(path)
    assert "pos_embed" not in sd
    assert all(torch.equal(sd[k], ema[k]) for k in sd)
    raw_sd, _ = load_lumos_pth(path, prefer_ema=False)
    assert not torch.equal(raw_sd["final_layer.linear.weight"], sd["final_layer.linear.weight"])
    sd4, cfg4 = load_lumos_pth(path, num_heads=4)
    assert cfg4.num_heads_ == 4
    LumosTransformer2DModel(**hf_config_from_model_config(cfg4)).load_state_dict(sd4, strict=True)
    given = ModelConfig(**dict(_cfg_kwargs(cfg), num_heads=8, spec="local"))
    assert load_lumos_pth(path, given)[1] is given
    with pytest.raises(ConversionError, match=r"model\.cond_tokens=3 .* cond_tokens=1"):
        load_lumos_pth(path, ModelConfig(**dict(_cfg_kwargs(cfg), cond_tokens=3)))

    # A plain state dict with a table built at interpolation scale 2 (PixArt-style lewei scale).
    model = LumosTransformer2DModel(**dict(PTH, pos_interpolation_scale=2.0, sample_size=12))
    plain = tmp_path / "plain.pth"
    torch.save(dict(model.state_dict(), pos_embed=model.pos_embed), plain)
    _, cfg2 = load_lumos_pth(plain)
    assert (cfg2.pos_interpolation_scale, cfg2.latent_size) == (2.0, 12)


def _cfg_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        name=cfg.name,
        depth=cfg.depth_,
        hidden_size=cfg.hidden_size_,
        num_heads=cfg.num_heads_,
        latent_size=cfg.latent_size,
        cond_tokens=cfg.cond_tokens,
        cond_channels=cfg.cond_channels,
    )


def test_pth_errors_name_what_is_wrong(released, tmp_path):
    _, ema = released

    def save(obj):
        path = tmp_path / "bad.pth"
        torch.save(obj, path)
        return path

    no_block = {k: v for k, v in ema.items() if not k.startswith("blocks.0.")}
    with pytest.raises(ConversionError, match=r"lacks blocks \[0\]"):
        load_lumos_pth(save(no_block))
    both = dict(ema, **{"blocks.0.scale_shift_table": torch.zeros(6, 144)})
    with pytest.raises(ConversionError, match="both 'blocks.0.adaLN_modulation.1.weight'"):
        load_lumos_pth(save(both))
    with pytest.raises(ConversionError, match=r"'pos_embed' has shape \(1, 15, 144\)"):
        load_lumos_pth(save(dict(ema, pos_embed=ema["pos_embed"][:, :15])))
    with pytest.raises(ConversionError, match="not the 2-D sin-cos table"):
        load_lumos_pth(save(dict(ema, pos_embed=ema["pos_embed"].flip(1))))
    shrunk = dict(ema, **{"blocks.1.mlp.fc2.bias": torch.zeros(143)})
    with pytest.raises(ConversionError, match=r"'blocks\.1\.mlp\.fc2\.bias' has shape \(143,\)"):
        load_lumos_pth(save(shrunk))
    with pytest.raises(ConversionError, match="'x_embedder.proj.weight', which every"):
        load_lumos_pth(save({k: v for k, v in ema.items() if not k.startswith("x_embedder")}))
    small = LumosTransformer2DModel(**dict(PTH, hidden_size=48, num_heads=4)).state_dict()
    with pytest.raises(ConversionError, match="not a multiple of head_dim=72; pass num_heads="):
        load_lumos_pth(save(small))
    with pytest.raises(ConversionError, match="no state dict found"):
        load_lumos_pth(save({"optimizer": {"lr": 1.0}, "step": 3}))

"""diffusers ``PixArtTransformer2DModel`` -> ``LumosTransformer2DModel`` -> megatron ``LumosDiT``.

Tiny PixArt models with *every* parameter randomised (the zero-initialised output projections
included) are converted; our HF class and the megatron model (one spawned process) must give
diffusers' own forward to 1e-5 in fp32 — for PixArt-alpha 256 defaults (no micro-conditions,
interpolation scale 1) and the 1024-MS defaults (``sample_size=128``: resolution / aspect-ratio
conditions and interpolation scale 2, run on a non-square latent with padded captions). The
way back to PixArt keys is bit-identical and the PixArt configs we cannot express are refused.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from lumos_mcore.hf import LumosTransformer2DModel
from lumos_mcore.models.dit.hf_adapter import (
    ConversionError,
    hf_to_mcore,
    model_config_from_hf_config,
)
from lumos_mcore.models.dit.pixart_adapter import (
    hf_config_from_pixart_config,
    hf_to_pixart,
    pixart_to_hf,
)
from tests.dist_utils import run_distributed

BASE = dict(
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=4,
    num_layers=2,
    cross_attention_dim=48,
    caption_channels=12,
)
CONFIGS = {
    # sample_size 8: use_additional_conditions -> False, interpolation_scale -> 1
    "alpha_256": dict(BASE, sample_size=8, patch_size=2, out_channels=8),
    # sample_size 128: use_additional_conditions -> True, interpolation_scale -> 2
    "ms_1024": dict(BASE, sample_size=128, patch_size=8, out_channels=None),
}
LATENT_HW = {"alpha_256": (8, 8), "ms_1024": (96, 128)}
CAPTION = 5


def _pixart(name: str, seed: int) -> PixArtTransformer2DModel:
    model = PixArtTransformer2DModel(**CONFIGS[name]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _inputs(name: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "latents": torch.randn(2, 4, *LATENT_HW[name], generator=g),
        "timesteps": torch.tensor([11.0, 907.0]),
        "cond": torch.randn(2, CAPTION, 12, generator=g),
        "cond_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool),
    }
    if name == "ms_1024":
        batch["resolution"] = torch.tensor([[768.0, 1024.0], [1024.0, 1024.0]])
        batch["aspect_ratio"] = torch.tensor([[0.75], [1.0]])
    return batch


def _pixart_forward(model: PixArtTransformer2DModel, batch: dict) -> torch.Tensor:
    extra = None
    if "resolution" in batch:
        extra = {"resolution": batch["resolution"], "aspect_ratio": batch["aspect_ratio"]}
    with torch.no_grad():
        return model(
            batch["latents"],
            encoder_hidden_states=batch["cond"],
            timestep=batch["timesteps"],
            added_cond_kwargs=extra,
            encoder_attention_mask=batch["cond_mask"].long(),
        ).sample


def _hf_forward(model: LumosTransformer2DModel, batch: dict, drop=None) -> torch.Tensor:
    extra = None
    if "resolution" in batch:
        extra = {"resolution": batch["resolution"], "aspect_ratio": batch["aspect_ratio"]}
    with torch.no_grad():
        return model(
            batch["latents"],
            batch["timesteps"],
            batch["cond"],
            encoder_attention_mask=batch["cond_mask"],
            added_cond_kwargs=extra,
            force_drop_ids=drop,
        ).sample


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def converted():
    """Per config: the PixArt model, its inputs and output, and the converted HF pieces."""
    cases = {}
    for i, name in enumerate(CONFIGS):
        model = _pixart(name, seed=i)
        batch = _inputs(name, seed=10 + i)
        hf_sd, hf_cfg = pixart_to_hf(model.state_dict(), model.config, cond_tokens=CAPTION)
        cases[name] = dict(
            pixart=model,
            batch=batch,
            ref=_pixart_forward(model, batch),
            hf_sd=hf_sd,
            hf_cfg=hf_cfg,
        )
    return cases


def _megatron_job(rank, world, jobs):
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.models.dit.model import LumosDiT, build_transformer_config
    from lumos_mcore.models.dit.state_dict import load_full_state_dict
    from lumos_mcore.parallel.state import initialize_parallel

    initialize_parallel(ParallelConfig(), num_attention_heads=2, num_layers=2)
    outs = {}
    for name, (cfg, mcore_sd, batch) in jobs.items():
        model = LumosDiT(build_transformer_config(cfg), cfg)
        load_full_state_dict(model, mcore_sd)
        with torch.no_grad():
            outs[name] = model(**batch)
    return outs


@pytest.fixture(scope="module")
def megatron_outputs(converted):
    jobs = {}
    for name, case in converted.items():
        cfg = model_config_from_hf_config(case["hf_cfg"])
        jobs[name] = (cfg, hf_to_mcore(case["hf_sd"], cfg), case["batch"])
    (outs,) = run_distributed(_megatron_job, 1, jobs)
    return outs


def test_pixart_defaults_are_resolved(converted):
    alpha, ms = converted["alpha_256"]["hf_cfg"], converted["ms_1024"]["hf_cfg"]
    assert (alpha["use_size_conditioning"], alpha["pos_interpolation_scale"]) == (False, 1.0)
    assert (ms["use_size_conditioning"], ms["pos_interpolation_scale"]) == (True, 2.0)
    assert (alpha["learn_sigma"], ms["learn_sigma"], ms["out_channels"]) == (True, False, 4)
    assert converted["ms_1024"]["pixart"].use_additional_conditions  # diffusers agrees


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_model_equals_diffusers_pixart(converted, name):
    case = converted[name]
    model = LumosTransformer2DModel(**case["hf_cfg"]).eval()
    model.load_state_dict(case["hf_sd"], strict=True)
    assert case["ref"].abs().mean() > 1e-2
    err = _rel_err(_hf_forward(model, case["batch"]), case["ref"])
    assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_megatron_model_equals_diffusers_pixart(converted, megatron_outputs, name):
    err = _rel_err(megatron_outputs[name], converted[name]["ref"])
    assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_to_pixart_is_bit_identical(converted, name):
    case = converted[name]
    original = case["pixart"].state_dict()
    back, pixart_cfg = hf_to_pixart(case["hf_sd"], case["hf_cfg"])
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    # The emitted config builds the same model (defaults resolved explicitly).
    rebuilt = PixArtTransformer2DModel(**pixart_cfg).eval()
    rebuilt.load_state_dict(back, strict=True)
    assert rebuilt.use_additional_conditions == case["pixart"].use_additional_conditions
    assert torch.equal(_pixart_forward(rebuilt, case["batch"]), case["ref"])


def test_null_caption_is_the_dropped_condition():
    """With ``null_cond`` given, dropping a sample's caption equals feeding PixArt that caption."""
    model = _pixart("alpha_256", seed=3)
    batch = _inputs("alpha_256", seed=4)
    null = torch.randn(CAPTION, 12, generator=torch.Generator().manual_seed(5))
    hf_sd, hf_cfg = pixart_to_hf(
        model.state_dict(), model.config, cond_tokens=CAPTION, null_cond=null
    )
    hf = LumosTransformer2DModel(**hf_cfg).eval()
    hf.load_state_dict(hf_sd, strict=True)
    out = _hf_forward(hf, batch, drop=torch.tensor([True, False]))
    swapped = dict(batch, cond=torch.stack([null, batch["cond"][1]]))
    assert _rel_err(out, _pixart_forward(model, swapped)) <= 1e-5
    default_sd, _ = pixart_to_hf(model.state_dict(), model.config, cond_tokens=CAPTION)
    assert torch.equal(default_sd["y_embedder.y_embedding"], torch.zeros(CAPTION, 12))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(norm_eps=1e-5), "norm_eps"),
        (dict(norm_elementwise_affine=True), "norm_elementwise_affine"),
        (dict(attention_bias=False), "attention_bias"),
        (dict(activation_fn="gelu"), "activation_fn"),
        (dict(caption_channels=None), "caption_channels"),
        (dict(cross_attention_dim=32), "cross_attention_dim"),
        (dict(dropout=0.1), "dropout"),
        (dict(attention_type="gated"), "attention_type"),
        (dict(only_cross_attention=True), "only_cross_attention"),
        (dict(flux_guidance=True), "flux_guidance"),
    ],
)
def test_inexpressible_pixart_configs_are_refused(change, field):
    with pytest.raises(ConversionError, match=rf"pixart config\.{field}"):
        hf_config_from_pixart_config(dict(CONFIGS["alpha_256"], **change))


def test_hub_style_config_fields_are_accepted():
    cfg = dict(
        CONFIGS["alpha_256"],
        _class_name="Transformer2DModel",
        only_cross_attention=False,
        double_self_attention=False,
        use_linear_projection=False,
        num_vector_embeds=None,
    )
    assert hf_config_from_pixart_config(cfg) == hf_config_from_pixart_config(CONFIGS["alpha_256"])


def test_tensor_errors_are_named(converted):
    case = converted["alpha_256"]
    sd, cfg = case["pixart"].state_dict(), case["pixart"].config
    with pytest.raises(
        ConversionError, match=r"pixart tensor 'transformer_blocks\.2\.ff\.net\.2\.bias'"
    ):
        pixart_to_hf(dict(sd, **{"transformer_blocks.2.ff.net.2.bias": torch.zeros(48)}), cfg)
    missing = {k: v for k, v in sd.items() if k != "transformer_blocks.1.attn2.to_v.bias"}
    with pytest.raises(
        ConversionError, match=r"lacks tensor 'transformer_blocks\.1\.attn2\.to_v\.bias'"
    ):
        pixart_to_hf(missing, cfg)
    with pytest.raises(ConversionError, match=r"'x_embedder\.proj\.weight' would have shape"):
        pixart_to_hf(dict(sd, **{"pos_embed.proj.weight": torch.zeros(48, 4, 3, 3)}), cfg)
    with pytest.raises(ConversionError, match=r"null_cond has shape \(4, 12\)"):
        pixart_to_hf(sd, cfg, cond_tokens=CAPTION, null_cond=torch.zeros(4, 12))
    with pytest.raises(ConversionError, match=r"config\.adaln_type='zero'"):
        hf_to_pixart(case["hf_sd"], dict(case["hf_cfg"], adaln_type="zero"))
    with pytest.raises(ConversionError, match=r"config\.norm_eps=1e-05"):
        hf_to_pixart(case["hf_sd"], dict(case["hf_cfg"], norm_eps=1e-5))
    with pytest.raises(
        ConversionError, match=r"hf tensor 'blocks\.0\.adaLN_modulation\.1\.weight'"
    ):
        hf_to_pixart(
            dict(case["hf_sd"], **{"blocks.0.adaLN_modulation.1.weight": torch.zeros(288, 48)}),
            case["hf_cfg"],
        )

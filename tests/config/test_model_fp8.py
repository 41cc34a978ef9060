"""``model.fp8``: validated where the config is read, refused up front where FP8 cannot run,
and turned into megatron's FP8 fields (TE recipe, format, bf16 layers at the ends)."""

from __future__ import annotations

import pytest
import torch

from lumos_mcore.config.model import ModelConfig


def test_fp8_flags_are_validated_with_their_names():
    with pytest.raises(ValueError, match=r"model.fp8='fp4': choose one of delayed, tensorwise"):
        ModelConfig(fp8="fp4")
    with pytest.raises(ValueError, match=r"model.fp8_format='e5m2'"):
        ModelConfig(fp8="tensorwise", fp8_format="e5m2")
    with pytest.raises(ValueError, match=r"model.fp8='tensorwise': FP8 runs in TransformerEngine"):
        ModelConfig(fp8="tensorwise", spec="local")
    with pytest.raises(ValueError, match=r"set model.precision=bf16"):
        ModelConfig(fp8="tensorwise", precision="fp32")
    with pytest.raises(ValueError, match=r"model.fp8_bf16_layers=2: the delayed recipe"):
        ModelConfig(fp8="delayed", fp8_bf16_layers=2)
    with pytest.raises(ValueError, match=r"model.fp8_bf16_layers=-1: must be >= 0"):
        ModelConfig(fp8="tensorwise", fp8_bf16_layers=-1)
    with pytest.raises(ValueError, match=r"model.fp8_bf16_layers=14: with 28 layers none"):
        ModelConfig(name="Lumos-XL/2", fp8="tensorwise", fp8_bf16_layers=14)


def test_bf16_layers_default():
    assert ModelConfig(name="Lumos-XL/2", fp8="tensorwise").fp8_bf16_layers_ == 1
    assert ModelConfig(name="Lumos-XL/2", fp8="mxfp8").fp8_bf16_layers_ == 1
    assert ModelConfig(name="Lumos-XL/2", fp8="delayed").fp8_bf16_layers_ == 0
    assert ModelConfig(name="Lumos-XL/2", fp8="tensorwise", fp8_bf16_layers=0).fp8_bf16_layers_ == 0


def test_fp8_refused_without_cuda_and_te_naming_the_flag():
    from lumos_mcore.models.dit.model import build_transformer_config

    cfg = ModelConfig(name="Lumos-Tiny/2", fp8="tensorwise", precision="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError,
            match=r"model.fp8='tensorwise': needs TransformerEngine on a CUDA GPU \(here: no CUDA\)",
        ):
            build_transformer_config(cfg, bf16=True)
    with pytest.raises(ValueError, match=r"model.fp8='tensorwise': needs bf16"):
        build_transformer_config(ModelConfig(name="Lumos-Tiny/2", fp8="tensorwise"), bf16=False)


def test_fp8_fields_reach_megatron(monkeypatch):
    """Where CUDA and TE are present the recipe becomes megatron's fp8 / fp8_recipe and the bf16
    end layers (checked here with CUDA and TE reported present)."""
    from lumos_mcore.models.dit import model as model_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_mod, "use_te_spec", lambda spec: True)
    xl = dict(name="Lumos-XL/2", precision="bf16")
    assert model_mod._fp8_overrides(ModelConfig(**xl, fp8="tensorwise"), True) == {
        "fp8": "hybrid",
        "fp8_recipe": "tensorwise",
        "first_last_layers_bf16": True,
        "num_layers_at_start_in_bf16": 1,
        "num_layers_at_end_in_bf16": 1,
    }
    delayed = model_mod._fp8_overrides(ModelConfig(**xl, fp8="delayed", fp8_format="e4m3"), True)
    assert delayed == {
        "fp8": "e4m3",
        "fp8_recipe": "delayed",
        "fp8_amax_history_len": 1024,
        "fp8_amax_compute_algo": "max",
    }
    assert model_mod._fp8_overrides(ModelConfig(**xl), True) == {}

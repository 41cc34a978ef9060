"""Shared pieces of the GPU tests: skip markers that name the missing piece, tiny models.

Skip reasons start with ``missing package:`` or ``needs`` so ``tools/gpu_proof.sh`` can list
what was skipped and why. Without CUDA nothing here imports TransformerEngine, flash-attn or DALI
(the CPU suite collects these modules and skips them cleanly); with CUDA a package that is
present but fails to import (a build for another CUDA / torch) is skipped with the import error
rather than failing every test.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NUM_GPUS = torch.cuda.device_count() if HAS_CUDA else 0

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
requires_2_gpus = pytest.mark.skipif(NUM_GPUS < 2, reason=f"needs 2 GPUs (found {NUM_GPUS})")


def _import_problem(module: str) -> str | None:
    """None when ``module`` is usable here, else why not. Only with CUDA is it imported (the
    GPU tests skip on CPU anyway); without CUDA its presence is enough."""
    try:
        if importlib.util.find_spec(module) is None:
            return f"import {module}"
    except (ImportError, ValueError):
        return f"import {module}"
    if not HAS_CUDA:
        return None
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken build raising at import
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        return f"import {module} failed: {type(exc).__name__}: {first}"
    return None


def requires_package(module: str, package: str) -> pytest.MarkDecorator:
    """Skip when ``module`` does not import; the reason names the pip ``package``."""
    problem = _import_problem(module)
    return pytest.mark.skipif(problem is not None, reason=f"missing package: {package} ({problem})")


def requires_any_package(*candidates: tuple[str, str]) -> pytest.MarkDecorator:
    """Skip unless one of the ``(module, package)`` candidates imports; tried in order, and
    none after the first that imports (two copies of FA3 must not both be imported)."""
    problems = []
    for module, package in candidates:
        problem = _import_problem(module)
        if problem is None:
            return pytest.mark.skipif(False, reason="")
        problems.append(f"{package} ({problem})")
    return pytest.mark.skipif(True, reason=f"missing package: {' or '.join(problems)}")


def _te_problem() -> str | None:
    if not HAS_CUDA:
        return "needs CUDA"
    for module in ("transformer_engine.pytorch", "megatron.core.extensions.transformer_engine"):
        problem = _import_problem(module)
        if problem is not None:
            return f"missing package: transformer-engine[pytorch] ({problem})"
    # megatron's TE extension swallows a failing TE import and only sets HAVE_TE = False
    if not importlib.import_module("megatron.core.extensions.transformer_engine").HAVE_TE:
        return (
            "missing package: transformer-engine[pytorch] (megatron.core.extensions."
            "transformer_engine could not import it: HAVE_TE is False)"
        )
    return None


_TE_PROBLEM = _te_problem()
requires_te = pytest.mark.skipif(_TE_PROBLEM is not None, reason=_TE_PROBLEM or "")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN / inf fail."""
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite values"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def tiny_model_kwargs(**overrides) -> dict:
    """A small Lumos I2I config whose GEMMs satisfy FP8's shape rules (rows % 16, cols % 16):
    64 tokens x batch 2 = 128 rows, 16 condition tokens x batch 2 = 32 rows, width 128."""
    kw = dict(
        name="Lumos-Tiny/2",
        depth=3,
        hidden_size=128,
        num_heads=4,
        latent_size=16,
        cond_tokens=16,
        cond_channels=64,
        precision="bf16",
    )
    kw.update(overrides)
    return kw


def single_gpu_parallel(seed: int = 1234, **layout) -> None:
    """torch.distributed (one process, nccl) + megatron parallel state on the current GPU."""
    import os

    import torch.distributed as dist

    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel.state import find_free_port, initialize_parallel

    if not dist.is_initialized():  # a fresh port: an earlier test may have torn a group down
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(find_free_port())
    initialize_parallel(ParallelConfig(**layout), num_attention_heads=4, num_layers=3, seed=seed)


def tiny_batch(model_kw: dict, batch: int = 2, device: str = "cuda", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size, lc, cc = model_kw["latent_size"], model_kw["cond_tokens"], model_kw["cond_channels"]
    return {
        "latents": torch.randn(batch, 4, size, size, generator=g).to(device),
        "timesteps": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "cond": torch.randn(batch, lc, cc, generator=g).to(device),
    }


def randomize_(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Overwrite every parameter with small random values (zero-initialised adaLN / cross-
    attention projections would otherwise leave whole paths untested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def build_dit(model_kw: dict, spec: str, *, bf16: bool = True, **config_overrides):
    """A LumosDiT on the current GPU with the ``local`` or ``te`` layer spec (bf16 params by
    default); ``config_overrides`` go to ``build_transformer_config`` (cp, fp8 settings, ...)."""
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.models.dit.model import LumosDiT, build_transformer_config

    mcfg = ModelConfig(**{**model_kw, "spec": spec, "precision": "bf16" if bf16 else "fp32"})
    config = build_transformer_config(mcfg, bf16=bf16, **config_overrides)
    torch.manual_seed(0)
    return LumosDiT(config, mcfg).cuda(), config


def load_matching(dst: torch.nn.Module, src_state: dict) -> None:
    """Load ``src_state`` into ``dst`` by name; only TE's ``_extra_state`` (FP8 metadata) may
    differ between the local and TE layer specs."""
    missing, unexpected = dst.load_state_dict(src_state, strict=False)
    bad = [k for k in list(missing) + list(unexpected) if not k.endswith("_extra_state")]
    assert not bad, f"state dict keys differ beyond _extra_state: {bad}"

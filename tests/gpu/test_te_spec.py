"""TransformerEngine layer spec on CUDA: equal to the local spec, FP8 training, FP8 -> bf16.

The same weights are loaded into a LumosDiT built with the local spec (megatron linears + SDPA)
and one built with the TE spec (TE linears + fused attention); both run in bf16 and are compared
with each other and with a float32 local-spec model (the accuracy reference).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import (
    build_dit,
    load_matching,
    randomize_,
    rel_err,
    requires_te,
    single_gpu_parallel,
    tiny_batch,
    tiny_model_kwargs,
)

pytestmark = requires_te

KW = tiny_model_kwargs()


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from lumos_mcore.parallel.state import destroy_parallel

    single_gpu_parallel()
    yield
    destroy_parallel()


def run(model, batch, grad_out=None):
    """Forward (+ backward with ``grad_out``); returns output and {name: grad}."""
    model.zero_grad(set_to_none=True)
    out = model(
        batch["latents"], batch["timesteps"], batch["cond"], batch.get("cond_mask")
    )  # [B, C_out, H, W]
    grads = {}
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        grads = {
            n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None
        }
    return out.detach().float(), grads


@pytest.mark.parametrize("padded_condition", [False, True], ids=["dense", "padded_cond"])
def test_te_spec_matches_local_spec_in_bf16(padded_condition):
    """Also with padded condition tokens (T5 captions): TE's cross-attention padding mask."""
    local, _ = build_dit(KW, "local")
    randomize_(local)
    state = local.state_dict()
    te_model, _ = build_dit(KW, "te")
    load_matching(te_model, state)
    ref32, _ = build_dit(KW, "local", bf16=False)
    load_matching(
        ref32,
        {
            k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in state.items()
        },
    )

    batch = tiny_batch(KW)
    if padded_condition:
        mask = torch.ones(2, KW["cond_tokens"], dtype=torch.bool, device="cuda")
        mask[0, 5:] = False  # True = real token
        mask[1, 1:] = False
        batch["cond_mask"] = mask
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(batch["latents"].shape[0], 8, 16, 16, generator=g).cuda()
    out_local, g_local = run(local, batch, grad_out)
    out_te, g_te = run(te_model, batch, grad_out)
    out_32, g_32 = run(ref32, batch, grad_out)

    assert rel_err(out_te, out_local) < 2e-2
    # the TE spec is as accurate as the local one, measured against float32
    assert rel_err(out_te, out_32) <= 1.5 * rel_err(out_local, out_32) + 5e-3
    assert g_te.keys() == g_local.keys()
    for name in g_local:
        assert rel_err(g_te[name], g_32[name]) <= 1.5 * rel_err(g_local[name], g_32[name]) + 2e-2, (
            name
        )


def _fp8_kwargs(recipe: str) -> dict:
    from lumos_mcore.ops.te_fp8 import fp8_config_overrides

    return fp8_config_overrides(recipe, bf16_layers_at_ends=0 if recipe == "delayed" else 1)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_train_step(recipe):
    """A few AdamW steps in FP8: finite, loss goes down, FP8 only where intended."""
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    model, config = build_dit(KW, "te", **_fp8_kwargs(recipe))
    randomize_(model)
    bf16, _ = build_dit(KW, "te")
    load_matching(bf16, model.state_dict())
    batch = tiny_batch(KW)
    target = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(3)).cuda()

    # One forward + backward first: delayed scaling starts from scale 1 and only has an amax
    # history (hence useful scales) after a step with gradients enabled.
    model(batch["latents"], batch["timesteps"], batch["cond"]).float().sum().backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        first = model(batch["latents"], batch["timesteps"], batch["cond"]).float()
        ref = bf16(batch["latents"], batch["timesteps"], batch["cond"]).float()
    assert rel_err(first, ref) < 0.15  # e4m3 GEMM inputs (3 mantissa bits) vs bf16

    # which modules ran in FP8 during that forward
    te_mods = {n: m for n, m in model.named_modules() if isinstance(m, TransformerEngineBaseModule)}
    linears = {
        n: m for n, m in te_mods.items() if n.endswith(("linear_qkv", "linear_fc1", "linear_fc2"))
    }
    assert linears, "the TE spec built no TE linears"
    for name, mod in linears.items():
        layer = int(name.split("decoder.layers.")[1].split(".")[0]) + 1  # 1-based
        bf16_layer = config.first_last_layers_bf16 and layer in (1, config.num_layers)
        assert getattr(mod, "fp8", None) is (not bf16_layer), (
            f"{name}: fp8={getattr(mod, 'fp8', None)}"
        )
    for name, mod in model.named_modules():
        if name.endswith(("adaln.linear", "final_layer.linear")) or name.startswith(
            ("t_embedder", "y_embedder", "x_embedder")
        ):
            assert not isinstance(mod, TransformerEngineBaseModule), f"{name} must stay bf16"

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        # TE reuses cached FP8 weights until told otherwise (megatron's schedules do this on
        # each step's first micro-batch); without it the FP8 GEMMs would train stale weights.
        model.set_is_first_microbatch()
        out = model(batch["latents"], batch["timesteps"], batch["cond"])
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_fp8_checkpoint_loads_into_bf16_models():
    """Weights trained under FP8 load into bf16 TE and local-spec models (TE's FP8 metadata
    lives in ``_extra_state`` and is ignored by a bf16 model)."""
    model, _ = build_dit(KW, "te", **_fp8_kwargs("tensorwise"))
    randomize_(model)
    batch = tiny_batch(KW)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = model(batch["latents"], batch["timesteps"], batch["cond"])
    out.float().square().mean().backward()
    opt.step()
    state = {
        k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()
    }

    te_bf16, _ = build_dit(KW, "te")
    te_bf16.load_state_dict(state)  # strict: same keys, FP8 extra state accepted
    local, _ = build_dit(KW, "local")
    load_matching(local, state)
    for name, p in te_bf16.named_parameters():
        assert torch.equal(p, state[name]), name
    with torch.no_grad():
        a = te_bf16(batch["latents"], batch["timesteps"], batch["cond"]).float()
        b = local(batch["latents"], batch["timesteps"], batch["cond"]).float()
    assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("spec", ["te", "local"])
def test_single_condition_token_shortcut_matches_full_cross_attention(spec):
    """One DINO CLS token: the exact ``proj(V(cond))`` path (no mask) equals the TE / local
    fused cross-attention (taken when a mask is passed), outputs and gradients, in bf16."""
    kw = tiny_model_kwargs(cond_tokens=1)
    model, _ = build_dit(kw, spec)
    randomize_(model)
    batch = tiny_batch(kw)
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(2, 8, 16, 16, generator=g).cuda()
    out_fast, g_fast = run(model, batch, grad_out)
    masked = dict(batch, cond_mask=torch.ones(2, 1, dtype=torch.bool, device="cuda"))
    out_full, g_full = run(model, masked, grad_out)
    assert rel_err(out_fast, out_full) < 1e-2
    for name, grad in g_full.items():
        if "cross_attention.linear_q" in name:
            assert g_fast[name].abs().max() == 0, name  # exactly zero on the shortcut
            continue
        assert rel_err(g_fast[name], grad) < 2e-2, name


def test_te_spec_initialises_like_the_local_spec():
    """With ``use_cpu_initialization`` megatron's TE linears draw their master weights from the
    CPU generator like the local linears, inside each layer's ``init_rng`` block, so a fresh TE
    model starts from exactly the local spec's weights (hence from the same weights at every
    TP / PP layout)."""
    local, _ = build_dit(KW, "local")
    te_model, _ = build_dit(KW, "te")
    te_params = dict(te_model.named_parameters())
    assert te_params.keys() == dict(local.named_parameters()).keys()
    for name, p in local.named_parameters():
        assert torch.equal(te_params[name], p), name


def test_model_fp8_flag_trains_in_fp8():
    """``model.fp8=tensorwise`` (the job config route) gives megatron's FP8 fields and a model
    whose layer GEMMs run in FP8 (first / last layers bf16), with finite gradients."""
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    model, config = build_dit(tiny_model_kwargs(fp8="tensorwise"), "te")
    assert (config.fp8, config.fp8_recipe, config.first_last_layers_bf16) == (
        "hybrid",
        "tensorwise",
        True,
    )
    randomize_(model)
    batch = tiny_batch(KW)
    out = model(batch["latents"], batch["timesteps"], batch["cond"])
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    fc1 = {
        n: getattr(m, "fp8", None)
        for n, m in model.named_modules()
        if isinstance(m, TransformerEngineBaseModule) and n.endswith("linear_fc1")
    }
    assert fc1 and [fc1[n] for n in sorted(fc1)] == [False, True, False], fc1  # 3 layers

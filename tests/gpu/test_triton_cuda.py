"""Triton kernels compiled for the GPU at the model's real widths, and the measured dispatch.

The CPU suite runs the same kernels in triton's interpreter (tests/kernels); here they run at
Lumos-XL width (D = 1152, 16 heads x 72) against float64 references on the GPU, and
``lumos_mcore.ops`` must time both paths and record its choice.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import rel_err, requires_cuda, requires_package

pytestmark = [requires_cuda, requires_package("triton", "triton")]

S, B, D, H, HD = 1024, 2, 1152, 16, 72


@pytest.fixture(autouse=True)
def compiled_mode():
    import lumos_kernels

    if lumos_kernels.interpret_mode():
        pytest.skip("triton was imported in interpreter mode (TRITON_INTERPRET=1) in this process")


def _leaf(*shape, dtype=torch.bfloat16, scale=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dtype).requires_grad_()


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("per_token", [False, True])
def test_norm_modulate_cuda(norm, per_token):
    from lumos_kernels import norm_modulate_reference, norm_modulate_triton

    x = _leaf(S, B, D, scale=3.0, seed=1)
    ms = (S, B, D) if per_token else (1, B, D)
    shift, scale = _leaf(*ms, scale=0.5, seed=2), _leaf(*ms, scale=0.5, seed=3)
    y = norm_modulate_triton(x, shift, scale, 1e-6, norm)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, shift, scale), dy)
    l64 = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    ref = norm_modulate_reference(*l64, 1e-6, norm)
    ref_grads = torch.autograd.grad(ref, l64, dy.double())
    eager = norm_modulate_reference(x.detach(), shift.detach(), scale.detach(), 1e-6, norm)
    assert rel_err(y, ref) < 1e-2
    assert rel_err(y, ref) <= rel_err(eager, ref) * 1.05 + 1e-6  # one rounding vs several
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual_cuda(per_token):
    from lumos_kernels import gated_residual_triton

    x, y = _leaf(S, B, D, seed=4), _leaf(S, B, D, seed=5)
    gate = _leaf(*((S, B, D) if per_token else (1, B, D)), seed=6)
    bias = _leaf(D, seed=7)
    out = gated_residual_triton(x, y, gate, bias)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, y, gate, bias), dout)
    l64 = [t.detach().double().requires_grad_() for t in (x, y, gate, bias)]
    ref = l64[0] + l64[2] * (l64[1] + l64[3])
    ref_grads = torch.autograd.grad(ref, l64, dout.double())
    assert rel_err(out, ref) < 1e-2
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 2e-2


def test_rope3d_cuda_on_qkv_view():
    from lumos_kernels import (
        apply_rope3d_reference,
        apply_rope3d_triton,
        rope3d_freqs,
        rope3d_positions,
    )

    t, h, w = 4, 16, 16  # 1024 tokens
    freqs = rope3d_freqs(rope3d_positions(t, h, w), HD).cuda()
    qkv = _leaf(t * h * w, B, H, 3 * HD, seed=8)
    q = qkv[..., :HD]  # strided view, as megatron splits its fused QKV
    out = apply_rope3d_triton(q, freqs)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, (qkv,), dout)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = apply_rope3d_reference(qkv64[..., :HD], freqs.double())
    (ref_grad,) = torch.autograd.grad(ref, (qkv64,), dout.double())
    assert rel_err(out, ref) < 1e-2 and rel_err(grad, ref_grad) < 1e-2


def test_dispatch_measures_and_records(monkeypatch):
    from lumos_mcore import ops

    monkeypatch.delenv("LUMOS_KERNELS", raising=False)
    ops.reset_kernel_choices()
    try:
        x = _leaf(S, B, D, seed=9)
        shift, scale = _leaf(1, B, D, seed=10), _leaf(1, B, D, seed=11)
        out = ops.norm_modulate(x, shift, scale)
        choice = ops.kernel_choices()["norm_modulate"]
        assert choice.triton_ms > 0 and choice.torch_ms > 0
        assert choice.backend == ("triton" if choice.triton_ms < choice.torch_ms else "torch")
        from lumos_kernels import norm_modulate_reference

        want = norm_modulate_reference(x.detach(), shift.detach(), scale.detach())
        assert rel_err(out, want) < 1e-2
        choices = ops.autoselect(seq_len=S, batch=B, hidden_size=D, num_heads=H)
        assert set(choices) == set(ops.OPS)
    finally:
        ops.reset_kernel_choices()

"""Fused gated residual ``x + gate * (y + bias)``: Triton forward/backward against float64."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import TOL, rel_err

pytest.importorskip("triton", reason="triton is not installed (requirements.txt)")

S, B, D = 11, 2, 40


def gate_tensor(kind: str, dtype, device, g):
    if kind == "chunk":  # gate1 of an adaLN output [1, B, 6D] (strided view)
        mod = torch.randn(1, B, 6 * D, generator=g).to(device, dtype).requires_grad_()
        return mod, mod.chunk(6, dim=-1)[2]
    shape = {"sample2d": (B, D), "sample3d": (1, B, D), "token": (S, B, D)}[kind]
    gate = torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    return gate, gate


CASES = [
    ("sample3d", True, torch.float32),
    ("sample2d", False, torch.float32),
    ("token", True, torch.float32),
    ("token", False, torch.bfloat16),
    ("chunk", True, torch.bfloat16),
]


@pytest.mark.parametrize("kind,with_bias,dtype", CASES)
def test_forward_backward_match_float64(device, kind, with_bias, dtype):
    from lumos_kernels import gated_residual_triton

    g = torch.Generator().manual_seed(hash((kind, with_bias, str(dtype))) % 2**31)
    x = torch.randn(S, B, D, generator=g).to(device, dtype).requires_grad_()
    y = torch.randn(S, B, D, generator=g).to(device, dtype).requires_grad_()
    leaf, gate = gate_tensor(kind, dtype, device, g)
    bias = torch.randn(D, generator=g).to(device, dtype).requires_grad_() if with_bias else None
    leaves = [x, y, leaf] + ([bias] if with_bias else [])

    out = gated_residual_triton(x, y, gate, bias)
    assert out.shape == x.shape and out.dtype == dtype
    dout = torch.randn(S, B, D, generator=g).to(device, dtype)
    grads = torch.autograd.grad(out, leaves, dout)

    l64 = [t.detach().double().requires_grad_() for t in leaves]
    g64 = l64[2].chunk(6, dim=-1)[2] if kind == "chunk" else l64[2]
    y64 = l64[1] + l64[3] if with_bias else l64[1]
    ref = l64[0] + g64 * y64
    ref_grads = torch.autograd.grad(ref, l64, dout.double())

    assert rel_err(out, ref) < TOL[dtype]
    for name, got, want in zip(["x", "y", "gate", "bias"], grads, ref_grads):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < 2 * TOL[dtype], name


def test_residual_grad_is_passed_through(device):
    """``d x = d out`` exactly (no copy through a kernel, no rounding)."""
    from lumos_kernels import gated_residual_triton

    g = torch.Generator().manual_seed(1)
    x = torch.randn(S, B, D, generator=g, device="cpu").to(device).requires_grad_()
    y, gate = (
        torch.randn(S, B, D, generator=g).to(device),
        torch.randn(B, D, generator=g).to(device),
    )
    dout = torch.randn(S, B, D, generator=g).to(device)
    (dx,) = torch.autograd.grad(gated_residual_triton(x, y, gate), [x], dout)
    assert torch.equal(dx, dout)


def test_dispatcher_and_errors(device):
    from lumos_kernels import gated_residual, gated_residual_reference

    g = torch.Generator().manual_seed(2)
    x, y = (
        torch.randn(S, B, D, generator=g).to(device),
        torch.randn(S, B, D, generator=g).to(device),
    )
    gate, bias = (
        torch.randn(1, B, D, generator=g).to(device),
        torch.randn(D, generator=g).to(device),
    )
    assert (
        rel_err(gated_residual(x, y, gate, bias), gated_residual_reference(x, y, gate, bias)) < 1e-6
    )
    with pytest.raises(ValueError, match="bias"):
        gated_residual(x, y, gate, torch.zeros(D + 1, device=device))
    with pytest.raises(ValueError, match="gate"):
        gated_residual(x, y, torch.zeros(2, B, D, device=device))

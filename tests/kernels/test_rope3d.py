"""3-D RoPE: layout helpers, reference vs megatron / complex math, Triton vs float64."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.kernels.conftest import TOL, rel_err

pytest.importorskip("triton", reason="triton is not installed (requirements.txt)")


def test_default_split_and_errors():
    from lumos_kernels import default_rope3d_split, rope3d_freqs

    assert default_rope3d_split(72) == (24, 24, 24)  # Lumos-XL head dim: equal thirds
    assert default_rope3d_split(64) == (24, 20, 20)
    assert default_rope3d_split(128) == (44, 42, 42)
    with pytest.raises(ValueError, match="head_dim=71"):
        default_rope3d_split(71)
    with pytest.raises(ValueError, match="split="):
        rope3d_freqs(torch.zeros(4, 3), 72, split=(24, 24, 26))


def test_positions_are_frame_major():
    from lumos_kernels import rope3d_positions

    t, h, w = 2, 3, 4
    pos = rope3d_positions(t, h, w)
    assert pos.shape == (t * h * w, 3)
    for f in range(t):
        for i in range(h):
            for j in range(w):
                assert pos[(f * h + i) * w + j].tolist() == [f, i, j]


def test_freqs_bands():
    """Pair k of axis a's band turns by pos_a * theta ** (-2k / d_a)."""
    from lumos_kernels import rope3d_freqs

    pos = torch.tensor([[3.0, 5.0, 7.0]])
    split, theta = (24, 20, 20), 10000.0
    f = rope3d_freqs(pos, 64, split=split, theta=theta)[0]
    assert f.shape == (32,)
    start = 0
    for axis, d in enumerate(split):
        for k in range(d // 2):
            want = pos[0, axis].item() * theta ** (-2 * k / d)
            assert math.isclose(f[start + k].item(), want, rel_tol=1e-6)
        start += d // 2
    # per-axis bases (NTK-style stretch of one axis)
    f2 = rope3d_freqs(pos, 64, split=split, theta=(1e5, theta, theta))[0]
    assert torch.equal(f2[12:], f[12:]) and not torch.equal(f2[:12], f[:12])


def test_reference_matches_megatron_interleaved_rope():
    """Same result as megatron's apply_rotary_pos_emb with rotary_interleaved=True."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from lumos_kernels import (
        apply_rope3d_reference,
        megatron_rotary_pos_emb,
        rope3d_freqs,
        rope3d_positions,
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * 3 * 4, 2, 3, 72, generator=g, dtype=torch.float64)
    freqs = rope3d_freqs(rope3d_positions(2, 3, 4), 72).double()
    cfg = SimpleNamespace(
        apply_rope_fusion=False, rotary_interleaved=True, multi_latent_attention=False
    )
    want = apply_rotary_pos_emb(
        x, megatron_rotary_pos_emb(freqs), config=cfg, cp_group=SimpleNamespace()
    )
    assert rel_err(apply_rope3d_reference(x, freqs), want) < 1e-6  # angles are float32


def test_freqs_match_the_model_rope_and_megatron_layout_roundtrips():
    """The model's 3-D RoPE table (models.common.rope) is this module's, in megatron layout."""
    from lumos_kernels import (
        freqs_from_megatron,
        megatron_rotary_pos_emb,
        rope3d_freqs,
        rope3d_positions,
    )
    from lumos_mcore.models.common.rope import rope_freqs

    pos = rope3d_positions(3, 4, 5)
    for hd in (72, 64):
        ours = rope3d_freqs(pos, hd)
        torch.testing.assert_close(freqs_from_megatron(rope_freqs(pos, hd)), ours)
        torch.testing.assert_close(freqs_from_megatron(megatron_rotary_pos_emb(ours)), ours)


def test_reference_is_complex_rotation_and_relative():
    from lumos_kernels import apply_rope3d_reference, rope3d_freqs

    g = torch.Generator().manual_seed(1)
    pos = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, 3.5], [2.0, 3.0, 4.0], [5.0, 7.0, 4.5]])
    freqs = rope3d_freqs(pos, 72, split=(24, 24, 20)).double()  # last 4 channels unrotated
    x = torch.randn(4, 1, 2, 72, generator=g, dtype=torch.float64)
    out = apply_rope3d_reference(x, freqs)
    z = torch.view_as_complex(x[..., :68].reshape(4, 1, 2, 34, 2).contiguous())
    rot = torch.view_as_real(z * torch.polar(torch.ones_like(freqs), freqs)[:, None, None]).flatten(
        -2
    )
    torch.testing.assert_close(out[..., :68], rot)
    torch.testing.assert_close(out[..., 68:], x[..., 68:])
    # q.k depends on position differences only: tokens 2,3 are tokens 0,1 shifted by (1, 1, 1)
    q, k = (
        torch.randn(72, generator=g, dtype=torch.float64),
        torch.randn(72, generator=g, dtype=torch.float64),
    )
    qk = torch.stack([q, k, q, k])[:, None, None, :]
    r = apply_rope3d_reference(qk, freqs)[:, 0, 0]
    assert math.isclose(float(r[0] @ r[1]), float(r[2] @ r[3]), rel_tol=1e-6)  # float32 angles


CASES = [
    ("4d", torch.float32, None, 72),
    ("3d", torch.float32, None, 72),
    ("qkv_view", torch.float32, None, 72),
    ("4d", torch.float32, (24, 24, 16), 72),  # partial rotation: 8 channels pass through
    ("4d", torch.bfloat16, None, 72),
    ("qkv_view", torch.bfloat16, None, 72),  # strides in 8-element (16-byte) units
    ("key_view", torch.bfloat16, None, 72),  # starts 72 elements into each fused row
    ("4d", torch.bfloat16, None, 70),  # 2-element units
    ("qkv_view", torch.float32, None, 66),  # 2-element units, fp32
    ("4d", torch.bfloat16, (12, 10, 10), 65),  # odd head dim: 1-element units, 1 passes
]


def test_vector_width_is_the_16_byte_unit_that_divides_every_stride():
    from lumos_kernels.rope3d import _vector_width

    qkv = torch.empty(4, 2, 3, 3 * 72, dtype=torch.bfloat16)
    assert _vector_width(qkv[..., :72]) == 8
    assert _vector_width(qkv[..., :72].float()) == 4  # contiguous fp32 copy: 16 B = 4
    assert _vector_width(torch.empty(4, 2, 3, 70, dtype=torch.bfloat16)) == 2
    assert _vector_width(torch.empty(4, 2, 3, 65, dtype=torch.bfloat16)) == 1


@pytest.mark.parametrize("layout,dtype,split,hd", CASES)
def test_triton_forward_backward_match_float64(device, layout, dtype, split, hd):
    from lumos_kernels import (
        apply_rope3d_reference,
        apply_rope3d_triton,
        rope3d_freqs,
        rope3d_positions,
    )

    g = torch.Generator().manual_seed(hash((layout, str(dtype), split, hd)) % 2**31)
    t, h, w, b, nh = 2, 2, 3, 2, 3
    s = t * h * w
    freqs = rope3d_freqs(rope3d_positions(t, h, w), hd, split=split).to(device)
    if layout == "3d":  # THD: [t, np, hn]
        leaf = torch.randn(s, nh, hd, generator=g).to(device, dtype).requires_grad_()
        x = leaf
    elif layout in ("qkv_view", "key_view"):  # q or k of a fused QKV projection: strided views
        leaf = torch.randn(s, b, nh, 3 * hd, generator=g).to(device, dtype).requires_grad_()
        x = leaf[..., :hd] if layout == "qkv_view" else leaf[..., hd : 2 * hd]
    else:
        leaf = torch.randn(s, b, nh, hd, generator=g).to(device, dtype).requires_grad_()
        x = leaf
    out = apply_rope3d_triton(x, freqs)
    assert out.shape == x.shape and out.dtype == dtype
    dout = torch.randn(out.shape, generator=g).to(device, dtype)
    (grad,) = torch.autograd.grad(out, [leaf], dout)

    leaf64 = leaf.detach().double().requires_grad_()
    x64 = {"qkv_view": leaf64[..., :hd], "key_view": leaf64[..., hd : 2 * hd]}.get(layout, leaf64)
    ref = apply_rope3d_reference(x64, freqs.double())
    (ref_grad,) = torch.autograd.grad(ref, [leaf64], dout.double())
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(grad, ref_grad) < TOL[dtype]


def test_dispatcher_and_errors(device):
    from lumos_kernels import apply_rope3d, apply_rope3d_reference, rope3d_freqs, rope3d_positions

    freqs = rope3d_freqs(rope3d_positions(1, 2, 2), 8, split=(4, 2, 2)).to(device)
    x = torch.randn(4, 1, 2, 8, device=device)
    assert rel_err(apply_rope3d(x, freqs), apply_rope3d_reference(x, freqs)) < 1e-6
    with pytest.raises(ValueError, match="freqs"):
        apply_rope3d(x, freqs[:3])

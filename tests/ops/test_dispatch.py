"""Backend choice of lumos_mcore.ops: modes, measured selection, collective agreement."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.dist_utils import run_distributed

pytest.importorskip("triton", reason="triton is not installed (requirements.txt)")

S, B, D = 6, 2, 24


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    from lumos_mcore import ops

    monkeypatch.delenv("LUMOS_KERNELS", raising=False)
    ops.reset_kernel_choices()
    yield
    ops.reset_kernel_choices()


def inputs(g):
    x = torch.randn(S, B, D, generator=g, requires_grad=True)
    shift = torch.randn(1, B, D, generator=g, requires_grad=True)
    scale = torch.randn(1, B, D, generator=g, requires_grad=True)
    return x, shift, scale


def test_mode_validation(monkeypatch):
    from lumos_mcore import ops

    monkeypatch.setenv("LUMOS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LUMOS_KERNELS='cuda'"):
        ops.kernel_mode()


def test_auto_on_cpu_is_the_reference_and_logged_once(caplog):
    from lumos_kernels import norm_modulate_reference
    from lumos_mcore import ops

    x, shift, scale = inputs(torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="lumos_mcore.ops.dispatch"):
        for _ in range(3):
            out = ops.norm_modulate(x, shift, scale, 1e-6, "layernorm")
    assert torch.equal(out, norm_modulate_reference(x, shift, scale, 1e-6, "layernorm"))
    lines = [r.getMessage() for r in caplog.records if "norm_modulate" in r.getMessage()]
    assert lines == ["kernel norm_modulate: torch (CPU tensors)"]
    assert ops.kernel_choices() == {}  # nothing measured for CPU tensors


def test_forced_modes(monkeypatch):
    """LUMOS_KERNELS=triton runs the kernel (CPU: in the interpreter), =torch the reference."""
    import lumos_kernels
    from lumos_mcore import ops

    if not lumos_kernels.interpret_mode() and not torch.cuda.is_available():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on GPU, else interpreted
    g = torch.Generator().manual_seed(1)
    x, shift, scale = (t.detach().to(dev).requires_grad_() for t in inputs(g))
    y = torch.randn(S, B, D, generator=g).to(dev)
    gate, bias = torch.randn(B, D, generator=g).to(dev), torch.randn(D, generator=g).to(dev)
    freqs = lumos_kernels.rope3d_freqs(
        lumos_kernels.rope3d_positions(1, 2, 3), 8, split=(4, 2, 2)
    ).to(dev)
    q = torch.randn(S, B, 3, 8, generator=g).to(dev)

    monkeypatch.setenv("LUMOS_KERNELS", "triton")
    got = [
        ops.norm_modulate(x, shift, scale, 1e-6, "rmsnorm"),
        ops.gated_residual(x, y, gate, bias),
        ops.apply_rope3d(q, freqs),
    ]
    want = [
        lumos_kernels.norm_modulate_triton(x, shift, scale, 1e-6, "rmsnorm"),
        lumos_kernels.gated_residual_triton(x, y, gate, bias),
        lumos_kernels.apply_rope3d_triton(q, freqs),
    ]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[0].grad_fn is not None and "NormModulate" in type(got[0].grad_fn).__name__

    monkeypatch.setenv("LUMOS_KERNELS", "torch")
    ref = ops.norm_modulate(x, shift, scale, 1e-6, "rmsnorm")
    assert torch.equal(ref, lumos_kernels.norm_modulate_reference(x, shift, scale, 1e-6, "rmsnorm"))
    torch.testing.assert_close(ref, want[0], rtol=1e-5, atol=1e-5)


def test_autoselect_single_process_picks_the_faster():
    import lumos_kernels
    from lumos_mcore import ops

    if not lumos_kernels.can_launch(torch.empty(0)):
        pytest.skip("needs the triton interpreter for CPU timing")
    choices = ops.autoselect(
        seq_len=8, batch=1, hidden_size=16, num_heads=2, dtype=torch.float32, device="cpu"
    )
    assert set(choices) == set(ops.OPS)
    for op, c in choices.items():
        assert c.op == op and c.triton_ms > 0 and c.torch_ms > 0
        assert c.backend == ("triton" if c.triton_ms < ops.MARGIN * c.torch_ms else "torch")
    assert ops.kernel_choices() == choices


def test_decision_needs_the_margin_and_names_it():
    from lumos_mcore.ops import dispatch

    assert dispatch._decide("rope3d", 0.9, 1.0, "t").backend == "triton"
    tie = dispatch._decide("rope3d", 0.99, 1.0, "t")  # within timing noise: keep the reference
    assert tie.backend == "torch" and "within 3%" in tie.reason


def test_timing_queues_the_calls_of_a_block_and_reports_one_call():
    from lumos_mcore.ops import dispatch

    calls = []
    ms = dispatch._time_ms(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=5)
    assert len(calls) == 2 + 3 * 5  # warm-up, then 3 blocks of 5 back-to-back calls
    assert 0 < ms < 1.0  # per call, not per block


def test_measurement_is_forward_and_backward_even_from_a_no_grad_forward():
    """The first call may come from full recompute's no-grad forward: the timed closure still
    differentiates the op's activation arguments (not RoPE's angles)."""
    from lumos_mcore.ops import dispatch

    seen = []

    def impl(x, freqs):
        seen.append((torch.is_grad_enabled(), x.requires_grad, freqs.requires_grad))
        out = x * freqs.sum()
        out.register_hook(lambda g: seen.append("backward"))
        return out

    x, freqs = torch.randn(3, 2), torch.randn(4)
    with torch.no_grad():
        dispatch._fwd_bwd(impl, (x, freqs), {}, dispatch._GRAD_ARGS["rope3d"])()
    assert seen == [(True, True, False), "backward"]
    seen.clear()
    with torch.inference_mode():  # sampling: the arguments are inference tensors
        x, freqs = torch.randn(3, 2), torch.randn(4)
        dispatch._fwd_bwd(impl, (x, freqs), {}, dispatch._GRAD_ARGS["rope3d"])()
    assert seen == [(True, True, False), "backward"]


def test_a_failing_kernel_times_infinite_and_keeps_the_reference(caplog):
    from lumos_kernels import norm_modulate_reference
    from lumos_mcore.ops import dispatch

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    args = inputs(torch.Generator().manual_seed(3))
    kw = {"eps": 1e-6, "norm": "layernorm"}
    with caplog.at_level(logging.WARNING, logger="lumos_mcore.ops.dispatch"):
        t_triton, t_torch = dispatch._measure(
            "norm_modulate", broken, norm_modulate_reference, args, kw
        )
    assert t_triton == float("inf") and 0 < t_torch < float("inf")
    assert "out of resources" in caplog.text
    assert dispatch._decide("norm_modulate", t_triton, t_torch, "t").backend == "torch"


def test_autoselect_refuses_an_unknown_norm():
    from lumos_mcore import ops

    with pytest.raises(ValueError, match="norm='batchnorm'"):
        ops.autoselect(seq_len=4, batch=1, hidden_size=8, num_heads=2, norm="batchnorm")


FAKE_TIMES = {  # (triton ms, torch ms) per rank: the group average decides
    "norm_modulate": [(1.0, 2.0), (5.0, 2.0)],  # rank 0 alone would pick triton; mean -> torch
    "gated_residual": [(1.0, 2.0), (1.5, 2.0)],  # both faster with triton -> triton
    "rope3d": [(3.0, 2.0), (1.0, 2.0)],  # mean 2.0 vs 2.0 -> torch (triton must be faster)
}


def _autoselect_rank(rank, world):
    import torch.distributed as dist

    from lumos_mcore import ops
    from lumos_mcore.ops import dispatch

    dist.init_process_group("gloo")  # rendezvous from run_distributed's environment
    dispatch._measure = lambda op, *a, **k: FAKE_TIMES[op][rank]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: kernels interpreted
    choices = ops.autoselect(
        seq_len=4, batch=1, hidden_size=8, num_heads=2, dtype=torch.float32, device=device
    )
    return {op: c.backend for op, c in choices.items()}


def test_autoselect_ranks_agree():
    results = run_distributed(_autoselect_rank, 2, timeout=120)
    want = {"norm_modulate": "torch", "gated_residual": "triton", "rope3d": "torch"}
    assert results == [want, want]


def _model_on_kernels(rank, world, mode):
    """A RoPE I2V model's output and gradients with every fused op on ``mode``; counts the
    Triton RoPE launches (the attention's q and k of every self-attention)."""
    import os

    import lumos_kernels.rope3d
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.models.dit.model import LumosDiT, build_transformer_config
    from lumos_mcore.parallel.state import initialize_parallel

    os.environ["LUMOS_KERNELS"] = mode
    calls = []
    real = lumos_kernels.rope3d.apply_rope3d_triton
    lumos_kernels.rope3d.apply_rope3d_triton = lambda *a: calls.append(1) or real(*a)
    cfg = ModelConfig(
        name="Lumos-Tiny/2", latent_size=4, cond_tokens=1, cond_channels=16, variant="i2v",
        num_frames=2, pos_embed="rope", video_attention="spatial_temporal",
    )  # fmt: skip
    initialize_parallel(ParallelConfig(), num_attention_heads=cfg.num_heads_, num_layers=cfg.depth_)
    model = LumosDiT(build_transformer_config(cfg), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    video = torch.randn(1, 4, 2, 4, 4, generator=g)
    out = model(video, torch.tensor([[0.0, 500.0]]), torch.randn(1, 1, 16, generator=g))
    out.square().sum().backward()
    qkv = model.decoder.layers[0].temporal_attention.linear_qkv.weight.grad
    return out.detach(), qkv.clone(), len(calls), cfg.depth_


def test_model_rope_runs_the_kernel_and_matches_the_reference():
    """LUMOS_KERNELS=triton puts the DiT's RoPE (and norm/residual ops) on the Triton kernels
    (interpreted on CPU) with the reference model's outputs and gradients."""
    import lumos_kernels

    if not lumos_kernels.can_launch(torch.empty(0)) and not torch.cuda.is_available():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")
    ((out, grad, n_kernel, depth),) = run_distributed(_model_on_kernels, 1, "triton", timeout=300)
    ((ref, ref_grad, n_ref, _),) = run_distributed(_model_on_kernels, 1, "torch", timeout=300)
    assert n_kernel == depth * 2 * 2  # q and k of the spatial and the temporal attention
    assert n_ref == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)

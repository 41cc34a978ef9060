"""CPU checks of tools/benchmark_gpu.py: the FLOP count, the kernel mode of its rows and the
report it writes."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "benchmark_gpu", ROOT / "tools" / "benchmark_gpu.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_gpu"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_flops_follow_design_section_4(bench):
    """At D = 1152 self-attention FLOPs equal the token-linear FLOPs near L = 7 D (~8K)."""
    d = 1152
    total = bench.flops_fwd_per_layer(7 * d, d, 0)
    attention = 4 * (7 * d) ** 2 * d
    assert total == pytest.approx(2 * attention + 12 * d * d)  # linear 28 L D^2 == 4 L^2 D
    # cross-attention with Lc condition tokens and adaLN add exactly their terms
    assert bench.flops_fwd_per_layer(100, 64, 3) - bench.flops_fwd_per_layer(100, 64, 0) == (
        4 * 100 * 3 * 64 + 4 * 3 * 64 * 64
    )
    # one condition token: the executed proj(V(cond)) path, as lumos_mcore.perf.flops counts it
    from lumos_mcore.perf.flops import DiTShape, count_flops

    shape = DiTShape(depth=1, hidden_size=64, num_heads=4, cond_tokens=1)
    want = count_flops(shape, 100, single_token_cross=True)
    cross = want.cross_attention_proj + want.cross_attention_core
    assert bench.flops_fwd_per_layer(100, 64, 1) - bench.flops_fwd_per_layer(100, 64, 0) == (
        cross - 4 * 100 * 64 * 64
    )


def test_fused_rows_force_the_kernels_and_plain_rows_the_references(bench, monkeypatch):
    """The DiT layer calls lumos_mcore.ops itself; a row's kernel mode is all that differs."""
    from lumos_mcore import ops

    monkeypatch.setenv("LUMOS_KERNELS", "auto")
    with bench.kernel_mode(bench.Variant("local", "sdpa", fused=True)):
        assert ops.kernel_mode() == "triton"
    with bench.kernel_mode(bench.Variant("te", "te")):
        assert ops.kernel_mode() == "torch"
    assert ops.kernel_mode() == "auto"  # restored
    monkeypatch.delenv("LUMOS_KERNELS")
    with pytest.raises(RuntimeError), bench.kernel_mode(bench.Variant("te", "te")):
        raise RuntimeError("a failing row")
    assert "LUMOS_KERNELS" not in os.environ
    fused = bench.build_spec(bench.Variant("local", "sdpa", fused=True))
    plain = bench.build_spec(bench.Variant("local", "sdpa"))
    assert fused.module is plain.module  # the same DiTLayer


def test_report_has_table_targets_and_skips(bench, tmp_path):
    v_bf16, v_fp8 = bench.Variant("te", "te"), bench.Variant("te", "te", "fp8-tensorwise")
    rows = [
        bench.Row(
            "XL", 16384, v_bf16, False, 28, 28, ms=300.0, tokens_per_s=5.5e4, tflops=520.0, mfu=0.53
        ),
        bench.Row(
            "2B", 16384, v_bf16, False, 22, 22, ms=500.0, tokens_per_s=3.0e4, tflops=400.0, mfu=0.40
        ),
        bench.Row(
            "2B", 16384, v_fp8, False, 22, 22, ms=350.0, tokens_per_s=4.2e4, tflops=570.0, mfu=0.29
        ),
        bench.Row("XL", 65536, v_bf16, True, 28, 28, status="out of memory"),
    ]
    summary = tmp_path / "summary.txt"
    summary.write_text("== 40 passed, 3 skipped ==\n")
    args = SimpleNamespace(iters=6, warmup=2, tests_summary=str(summary))
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x"}
    text = bench.report(
        rows,
        ["local / flash / bf16: skipped (missing package: flash-attn)"],
        env,
        bench.PEAKS,
        [],
        args,
    )
    assert text.startswith("# GPU benchmark -- NVIDIA H100 80GB HBM3")
    assert "| XL (28x1152, 16x72) | 16384 | te / te / bf16 | none | 300.0 |" in text
    assert ">= 50% MFU: **met** -- best 53.0%" in text
    assert (
        "FP8 >= 1.3x bf16 tokens/s on the 2B configuration (16384 tokens): **met** -- 1.40x" in text
    )
    assert "64K tokens per sample on one GPU with recompute: **NOT met**" in text
    assert "out of memory" in text and "missing package: flash-attn" in text and "40 passed" in text


def test_memory_estimate_column_follows_recompute_kernels_and_fp8(bench):
    def est(tokens, recompute=False, **variant):
        v = bench.Variant(variant.pop("spec", "local"), variant.pop("attention", "sdpa"), **variant)
        row = bench.Row("XL", tokens, v, recompute, layers_timed=28, depth=28)
        return bench.estimate_block_gib(row)

    plain, full = est(16384), est(16384, recompute=True)
    assert full < plain / 3  # one [s, b, h] input per layer + one re-run layer, + weights
    assert est(16384, fused=True) < plain  # the Triton norm keeps the input only
    assert est(16384, spec="te", attention="te", precision="fp8-tensorwise") < est(
        16384, spec="te", attention="te"
    )
    assert est(65536, recompute=True) < 80  # the 64K-token target fits an 80 GB GPU
    assert est(65536) > 80  # ... only with recompute
    # linear in tokens (fused attention keeps no L x L scores)
    assert est(32768) - plain == pytest.approx(2 * (plain - est(8192)), rel=0.01)


def test_plan_runs_the_target_rows_first(bench):
    """A --budget-s cut drops rows from the end: the rows the targets are read from lead."""
    args = SimpleNamespace(tokens="4096,16384,65536", sizes="XL,2B", layers=0)
    rows, skipped = bench.plan(args, dict.fromkeys(["te", "flash", "triton", "fp8"]))
    assert not skipped
    flags = [bench.is_target_row(r) for r in rows]
    assert flags == sorted(flags, reverse=True) and any(flags) and not all(flags)
    leading = {
        (r.size, r.tokens, r.variant.label, r.recompute) for r in rows if bench.is_target_row(r)
    }
    assert ("XL", 16384, "local / sdpa / bf16", False) in leading
    assert ("XL", 65536, "te / te / bf16", True) in leading
    assert ("2B", 16384, "te / te / fp8-tensorwise", False) in leading
    assert all(r.recompute == (r.tokens >= 65536) for r in rows)

    # a CUDA machine without TransformerEngine / flash-attn: SDPA rows only, and the 2B
    # configuration keeps its bf16 baseline
    missing = {"te": "missing package", "flash": "missing package", "triton": None}
    missing["fp8"] = missing["te"]
    rows, skipped = bench.plan(args, missing)
    assert {r.variant.attention for r in rows} == {"sdpa"}
    assert [r.variant.label for r in rows if r.size == "2B"] == ["local / sdpa / bf16"]
    assert any("te / te / fp8-tensorwise: skipped (missing package)" in s for s in skipped)

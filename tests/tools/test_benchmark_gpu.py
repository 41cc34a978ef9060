"""CPU checks of tools/benchmark_gpu.py: the FLOP count, the kernel mode and attention layout of
its rows, the run order and time budget, the verdicts and the report it rewrites as it goes."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[2]
NO_TE = "missing package: transformer-engine[pytorch]"


def _load():
    spec = importlib.util.spec_from_file_location(
        "benchmark_gpu", ROOT / "tools" / "benchmark_gpu.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_gpu"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


def _ok(bench, size, tokens, variant, *, layout="full_3d", layers=None, **numbers):
    depth = bench.SIZES[size][0]
    recompute = tokens >= 65536
    row = bench.Row(size, tokens, variant, recompute, layers or depth, depth, layout)
    row.status = "ok"
    for k, v in numbers.items():
        setattr(row, k, v)
    return row


def _args(**kw):
    base = dict(iters=6, warmup=2, tests_summary=None, budget_s=0.0)
    return SimpleNamespace(**{**base, **kw})


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


def test_row_flops_count_the_rows_attention_layout(bench):
    """The rows' FLOPs come from perf.flops: full 3-D as the section-4 formula, spatial +
    temporal with per-frame attention (S = 1024 tokens, T = 16 frames) and the temporal
    projections; full recompute adds one forward to the hardware count."""
    v = bench.Variant("local", "sdpa")
    L, D, depth = 16384, 1152, 28
    full = bench.Row("XL", L, v, False, depth, depth)
    model, hw = bench.row_flops(full)
    assert model == hw == pytest.approx(3 * depth * bench.flops_fwd_per_layer(L, D, 1))
    st = bench.Row("XL", L, v, False, depth, depth, "spatial_temporal")
    st_model, _ = bench.row_flops(st)
    per_layer = bench.flops_fwd_per_layer(L, D, 1) - 4 * L * L * D
    per_layer += 4 * L * 1024 * D + 4 * L * 16 * D + 8 * L * D * D
    assert st_model == pytest.approx(3 * depth * per_layer)
    assert st_model < model / 2  # 16 frames: the L^2 term is mostly gone
    long = bench.Row("XL", 65536, v, True, depth, depth)
    model, hw = bench.row_flops(long)
    assert hw == pytest.approx(model * 4 / 3)
    assert bench.frame_grid(16384, 16) == (32, 32) and bench.frame_grid(96, 16) == (1, 6)


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


def test_spatial_temporal_rows_build_the_recipes_video_spec(bench):
    """The I2V recipe's layout: per-frame self-attention plus a temporal attention, exactly as
    get_lumos_layer_spec builds it for video_attention=spatial_temporal."""
    from lumos_mcore.models.dit.layer_spec import get_lumos_layer_spec

    v = bench.Variant("local", "sdpa")
    full = bench.build_spec(v).submodules
    st = bench.build_spec(v, "spatial_temporal").submodules
    assert full.temporal_attention is None
    assert st.self_attention.submodules.core_attention.keywords == {"pattern": "spatial"}
    assert st.temporal_attention.submodules.core_attention.keywords == {"pattern": "temporal"}
    row = bench.Row("XL", 16384, v, False, 28, 28, "spatial_temporal")
    trainer = get_lumos_layer_spec(bench.model_config(row, 28)).submodules
    assert trainer.self_attention.submodules.core_attention.keywords == {"pattern": "spatial"}
    assert trainer.temporal_attention is not None
    with pytest.raises(ValueError, match="no spatial / temporal"):
        bench.build_spec(bench.Variant("local", "flash"), "spatial_temporal")


def _run_tiny_blocks(rank, world):
    """Forward + backward of a 2-layer, 64-wide stack on CPU with the benchmark's own inputs."""
    import torch

    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel.state import initialize_parallel

    bench = _load()
    bench.SIZES["T"] = (2, 64, 4)
    initialize_parallel(ParallelConfig(), num_attention_heads=4, num_layers=2)
    out = {}
    v = bench.Variant("local", "sdpa")
    for layout, recompute in (("full_3d", False), ("spatial_temporal", False), ("spatial_temporal", True)):  # fmt: skip
        row = bench.Row("T", 64, v, recompute, 2, 2, layout)
        with bench.kernel_mode(v):
            block, _ = bench.build_block(row, device="cpu")
            kwargs, grad = bench.block_inputs(row, "cpu")
            y = block(**kwargs)
            y.backward(grad)
        temporal = [p.grad for n, p in block.named_parameters() if "temporal_attention" in n]
        out[(layout, recompute)] = (
            tuple(y.shape),
            len(temporal),
            all(g is not None and bool(torch.isfinite(g).all()) for g in temporal),
            "packed_seq_params" in kwargs,
            bool(torch.isfinite(kwargs["hidden_states"].grad).all()),
        )
    return out


def test_block_rows_run_with_their_layout_on_cpu():
    """The spatial + temporal rows hand the block a SequenceLayout of 16 frames (here 2 x 2
    tokens each), also through full recompute; the full-3-D rows take none."""
    (out,) = run_distributed(_run_tiny_blocks, 1)
    assert out[("full_3d", False)] == ((64, 1, 64), 0, True, False, True)
    for recompute in (False, True):
        shape, n_temporal, finite, has_layout, x_finite = out[("spatial_temporal", recompute)]
        assert shape == (64, 1, 64) and n_temporal > 0 and finite and has_layout and x_finite


def test_report_has_table_targets_and_skips(bench, tmp_path):
    v_bf16, v_fp8 = bench.Variant("te", "te"), bench.Variant("te", "te", "fp8-tensorwise")
    rows = [
        _ok(bench, "XL", 16384, v_bf16, ms=300.0, tokens_per_s=5.5e4, tflops=520.0, mfu=0.53),
        _ok(bench, "XL", 16384, v_bf16, layout="spatial_temporal", tokens_per_s=6e4, mfu=0.41),
        _ok(bench, "2B", 16384, v_bf16, ms=500.0, tokens_per_s=3.0e4, tflops=400.0, mfu=0.40),
        _ok(bench, "2B", 16384, v_fp8, ms=350.0, tokens_per_s=4.2e4, tflops=570.0, mfu=0.29),
        _ok(bench, "2B", 4096, v_bf16, tokens_per_s=5.0e4, mfu=0.30),
        _ok(bench, "2B", 4096, v_fp8, tokens_per_s=6.0e4, mfu=0.18),
        bench.Row("XL", 65536, v_bf16, True, 28, 28, status="out of memory (Tried ...)"),
    ]
    rows[-1].peak_mem_gb, rows[-1].peak_reserved_gb = 77.5, 79.0
    summary = tmp_path / "summary.txt"
    summary.write_text("== 40 passed, 3 skipped ==\n")
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x"}
    peaks = bench.resolve_peaks(env["gpu"])
    text = bench.report(
        rows,
        ["local / flash / bf16: skipped (missing package: flash-attn)"],
        env,
        peaks,
        [],
        _args(tests_summary=str(summary)),
    )
    assert text.startswith("# GPU benchmark -- NVIDIA H100 80GB HBM3")
    assert "bf16: 989 TFLOP/s (spec: H100 80GB HBM3 bf16 dense)" in text
    assert "FP8: 1979 TFLOP/s (spec: H100 80GB HBM3 fp8 dense)" in text
    assert "| XL (28x1152, 16x72) | 16384 | full_3d | te / te / bf16 | none | 6 | 300.0 |" in text
    assert "| 16384 | spatial_temporal | te / te / bf16 |" in text
    assert "optimizer step is not timed" in text and "plain `.grad`" in text
    assert "(column `steps`: 6, and 3 for the 64K rows)" in text
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    (recipe,) = [t for t in lines if "the verdict: the I2V recipe's layout" in t]
    assert (
        "**NOT met** -- best 41.0% (row: XL 16384 tokens spatial_temporal te / te / bf16)" in recipe
    )
    (full,) = [t for t in lines if "full 3-D attention over all 16384 tokens" in t]
    assert "**met** -- best 53.0% (row: XL 16384 tokens full_3d te / te / bf16)" in full
    assert (
        "- FP8 ≥ 1.3× bf16 on 2B: **met** -- 1.40× tokens/s at 16384 tokens, the verdict "
        "(te / te / fp8-tensorwise vs te / te / bf16)" in text
    )
    assert (
        "- FP8 ≥ 1.3× bf16 on 2B: **NOT met** -- 1.20× tokens/s at 4096 tokens, also reported"
        in text
    )
    assert (
        "64K tokens per sample on one GPU with recompute: **NOT met** -- te / te / bf16: out of memory"
        in text
    )
    # an OOM row keeps the peak it reached
    assert "| 77.5 | 79.0 |" in text
    assert "missing package: flash-attn" in text and "40 passed" in text


def test_targets_without_te_and_for_quick_rows(bench):
    """Without TransformerEngine the FP8 line stays, with the reason; rows that timed fewer
    layers than the model has cannot meet the 64K target and say so on every verdict."""
    sdpa = bench.Variant("local", "sdpa")
    have = {"te": NO_TE, "flash": None, "triton": None, "fp8": NO_TE}
    quick = dict(layers=4)
    rows = [
        _ok(bench, "XL", 16384, sdpa, tokens_per_s=5e4, mfu=0.55, **quick),
        _ok(bench, "2B", 16384, sdpa, tokens_per_s=3e4, mfu=0.4, **quick),
        _ok(bench, "XL", 65536, sdpa, peak_mem_gb=9.0, **quick),
    ]
    out = bench.targets(rows, have, {"memory_gb": 139.8})
    assert f"FP8 ≥ 1.3× bf16 on 2B: not measured ({NO_TE}) -- 16384 tokens, the verdict" in out
    assert f"FP8 ≥ 1.3× bf16 on 2B: not measured ({NO_TE}) -- 4096 tokens, also reported" in out
    (full,) = [t for t in out if "full 3-D" in t]
    assert (
        "**met (quick run)**" in full and "4 of 28 layers timed and scaled -- not a verdict" in full
    )
    (recipe,) = [t for t in out if "recipe's layout" in t]
    assert "not measured (not in this run's plan" in recipe
    (long,) = [t for t in out if "64K tokens" in t]
    assert "not shown (quick run: 4 of 28 layers timed" in long and "**met**" not in long

    # every layer timed: met, with the measured peak and the optimizer left out of it said
    rows[2] = _ok(bench, "XL", 65536, sdpa, peak_mem_gb=61.2, peak_reserved_gb=64.0)
    rows[2].est_train_gb = 75.3
    (long,) = [t for t in bench.targets(rows, have, {"memory_gb": 139.8}) if "64K" in t]
    assert long.startswith("≥ 64K tokens per sample on one GPU with recompute: **met**")
    assert "peak 61.2 GB allocated / 64.0 GB reserved of 139.8 GB" in long
    assert "optimizer state is not in the measured peak" in long and "at 75.3 GB" in long

    # not run at all (time budget): not measured, not NOT met
    rows[2] = bench.Row("XL", 65536, sdpa, True, 28, 28, status="not run (time budget: ...)")
    (long,) = [t for t in bench.targets(rows, have) if "64K" in t]
    assert "not measured (local / sdpa / bf16: not run (time budget" in long


def test_unknown_gpu_gives_mfu_na_unless_a_peak_is_given(bench):
    peaks = bench.resolve_peaks("NVIDIA RTX 6000 Ada Generation")
    assert peaks == {"bf16": None, "fp8": None}
    row = _ok(bench, "XL", 16384, bench.Variant("local", "sdpa"), tokens_per_s=5e4, ms=300.0)
    text = bench.report([row], [], {"gpu": "RTX"}, peaks, [], _args())
    assert "bf16: not known for this GPU (MFU n/a; pass --peak-bf16)" in text
    assert "| n/a | n/a |" in text  # MFU, HFU of an ok row
    assert "not measured (no peak FLOP/s known for this GPU: pass --peak-bf16)" in text
    given = bench.resolve_peaks("NVIDIA RTX 6000 Ada Generation", bf16=364.0)
    assert (given["bf16"].tflops, given["bf16"].source) == (364.0, "given: --peak-bf16")
    assert given["fp8"] is None
    # a given peak wins over the table
    assert bench.resolve_peaks("NVIDIA H200", bf16=900.0)["bf16"].tflops == 900.0
    assert bench.resolve_peaks("NVIDIA H200 NVL")["bf16"].tflops == 835.0


def test_memory_estimate_column_follows_recompute_kernels_and_fp8(bench):
    def est(tokens, recompute=False, layout="full_3d", **variant):
        v = bench.Variant(variant.pop("spec", "local"), variant.pop("attention", "sdpa"), **variant)
        row = bench.Row("XL", tokens, v, recompute, 28, 28, layout)
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
    assert est(16384, layout="spatial_temporal") > plain  # + temporal attention per layer

    # the whole train step adds what the timed step lacks: optimizer, fp32 grads, EMA
    row = bench.Row("XL", 65536, bench.Variant("local", "sdpa"), True, 28, 28)
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.perf.memory import param_count

    n = param_count(bench.model_config(row, 28), ParallelConfig()).total
    extra = bench.estimate_train_gib(row) - bench.estimate_block_gib(row)
    assert extra > n * (4 + 12 + 4) / 2**30 * 0.9  # fp32 grads + Adam / master + EMA


def test_plan_runs_the_target_rows_first(bench):
    """A --budget-s cut drops rows from the end: XL 16K bf16 in both layouts, one 64K recompute
    row, the 2B bf16 / FP8 rows at 16K and 4K, then the rest."""
    args = SimpleNamespace(tokens="4096,16384,65536", sizes="XL,2B", layers=0, iters=6, warmup=2)
    rows, skipped = bench.plan(args, dict.fromkeys(["te", "flash", "triton", "fp8"]))
    assert not skipped
    key = [(r.size, r.tokens, r.layout, r.variant.label) for r in rows]
    assert key[:5] == [
        ("XL", 16384, "full_3d", "te / te / bf16"),
        ("XL", 16384, "spatial_temporal", "te / te / bf16"),
        ("XL", 16384, "full_3d", "local / flash / bf16"),
        ("XL", 16384, "full_3d", "local / sdpa / bf16"),
        ("XL", 16384, "spatial_temporal", "local / sdpa / bf16"),
    ]
    assert key[5] == ("XL", 65536, "full_3d", "te / te / bf16") and rows[5].recompute
    assert key[6:16] == [
        ("2B", 16384, "full_3d", "te / te / bf16"),
        ("2B", 16384, "full_3d", "te / te / fp8-tensorwise"),
        ("2B", 16384, "full_3d", "te / te / fp8-delayed"),
        ("2B", 16384, "full_3d", "local / sdpa / bf16"),
        ("2B", 16384, "full_3d", "local / flash / bf16"),
        ("2B", 4096, "full_3d", "te / te / bf16"),
        ("2B", 4096, "full_3d", "te / te / fp8-tensorwise"),
        ("2B", 4096, "full_3d", "te / te / fp8-delayed"),
        ("2B", 4096, "full_3d", "local / sdpa / bf16"),
        ("2B", 4096, "full_3d", "local / flash / bf16"),
    ]
    assert all(r.size == "XL" for r in rows[16:])
    assert ("XL", 65536, "full_3d", "local / sdpa / bf16") in key[16:]
    assert all(r.recompute == (r.tokens >= 65536) for r in rows)
    assert {r.steps for r in rows if r.tokens >= 65536} == {3}
    assert {r.steps for r in rows if r.tokens < 65536} == {6}
    assert all(r.status == "pending" for r in rows)
    assert sum(r.layout == "spatial_temporal" for r in rows) == 2

    # a CUDA machine without TransformerEngine / flash-attn (the lent H200): SDPA rows only
    missing = {"te": NO_TE, "flash": "missing package: flash-attn", "triton": None}
    missing["fp8"] = missing["te"]
    rows, skipped = bench.plan(args, missing)
    key = [(r.size, r.tokens, r.layout, r.variant.label) for r in rows]
    assert key[:5] == [
        ("XL", 16384, "full_3d", "local / sdpa / bf16"),
        ("XL", 16384, "spatial_temporal", "local / sdpa / bf16"),
        ("XL", 65536, "full_3d", "local / sdpa / bf16"),
        ("2B", 16384, "full_3d", "local / sdpa / bf16"),
        ("2B", 4096, "full_3d", "local / sdpa / bf16"),
    ]
    assert {r.variant.attention for r in rows} == {"sdpa"}
    assert any(f"te / te / fp8-tensorwise: skipped ({NO_TE})" in s for s in skipped)


def test_budget_skips_rows_expected_to_overrun(bench):
    """--budget-s counts from the script's start; a row's expected time is scaled from the
    largest finished row by FLOPs, with a fixed allowance before any row finished."""
    v = bench.Variant("local", "sdpa")
    first = bench.Row("XL", 16384, v, False, 28, 28, steps=6, warmup=2)
    assert bench.expected_row_s(first, []) == bench.FIRST_ROW_S
    first.status, first.build_s, first.wall_s = "ok", 4.0, 14.0
    failed = bench.Row("XL", 4096, v, False, 28, 28, status="out of memory", build_s=99, wall_s=99)
    long = bench.Row("XL", 65536, v, True, 28, 28, steps=3, warmup=2)
    ratio = bench.row_work(long) / bench.row_work(first)
    assert ratio > 5  # L^2 attention, recompute
    want = bench.ROW_RESERVE_S + 2 * 4.0 + bench.ROW_SAFETY * 10.0 * ratio
    assert bench.expected_row_s(long, [first, failed]) == pytest.approx(want)
    # the same row with 4 of 28 layers timed is expected to take 1/7 of the step time
    quick = bench.Row("XL", 65536, v, True, 4, 28, steps=3, warmup=2)
    assert bench.expected_row_s(quick, [first]) == pytest.approx(
        bench.ROW_RESERVE_S + 8.0 + bench.ROW_SAFETY * 10.0 * ratio / 7
    )
    assert bench.budget_left(0) is None
    assert bench.budget_left(100, now=bench.T_START + 30) == pytest.approx(70)


def test_report_is_rewritten_atomically_as_rows_finish(bench, tmp_path, monkeypatch):
    """Every write replaces the whole report and JSON; a write that fails midway leaves the
    previous complete files."""
    out, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    args = _args(out=str(out), json=str(js), budget_s=500.0)
    v = bench.Variant("local", "sdpa")
    rows = [bench.Row("XL", 16384, v, False, 28, 28), bench.Row("XL", 4096, v, False, 28, 28)]
    env = {"gpu": "NVIDIA H200"}
    progress = bench.Progress(args, env, bench.resolve_peaks(env["gpu"]), {}, rows, [])
    progress.write()
    first = out.read_text()
    assert "Run: running" in first and "(--budget-s 500)" in first
    assert first.count("| pending |") == 2
    data = json.loads(js.read_text())
    assert data["state"] == "running" and [r["status"] for r in data["rows"]] == ["pending"] * 2
    assert data["peaks"]["bf16"] == {"tflops": 989.0, "source": "spec: H200 bf16 dense"}

    rows[0].status, rows[0].ms, rows[0].mfu, rows[0].tokens_per_s = "ok", 250.0, 0.52, 6.5e4
    rows[1].status = "not run (time budget: needs ~70 s, 20 s left of --budget-s 500)"
    progress.state = "finished"
    progress.write()
    second = out.read_text()
    assert "Run: finished" in second and "| 250.0 |" in second and "| pending |" not in second
    assert json.loads(js.read_text())["rows"][0]["mfu"] == 0.52
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.md"]  # no temp files

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(bench.os, "replace", broken)
    rows[0].ms = 1.0
    with pytest.raises(OSError):
        progress.write()
    assert out.read_text() == second


def test_row_log_line_carries_every_number(bench):
    row = _ok(
        bench, "XL", 16384, bench.Variant("local", "sdpa"), ms=300.0, ms_spread=2.0,
        tokens_per_s=54613.0, tflops=520.0, mfu=0.526, hfu=0.526, peak_mem_gb=20.5,
        peak_reserved_gb=22.0, est_mem_gb=19.9, est_train_gb=31.0, wall_s=12.0,
    )  # fmt: skip
    line = bench.row_line(row)
    for part in (
        "ok:",
        "300.0 ms/step",
        "6 steps",
        "54,613 tokens/s",
        "520.0 TFLOP/s",
        "MFU 52.6%",
        "HFU 52.6%",
        "20.50 GB allocated / 22.00 GB reserved",
        "est. 19.90 GB",
        "train step 31.00 GB",
        "12 s",
    ):
        assert part in line, part


def _progress(bench, tmp_path, n=3, budget_s=0.0):
    v = bench.Variant("local", "sdpa")
    rows = [bench.Row("XL", 16384, v, False, 28, 28) for _ in range(n)]
    args = _args(out=str(tmp_path / "gpu.md"), json=str(tmp_path / "gpu.json"), budget_s=budget_s)
    return bench.Progress(args, {"gpu": "NVIDIA H200"}, {"bf16": None, "fp8": None}, {}, rows, [])


def _fake_row(status="ok"):
    def run(row, peaks):
        row.status, row.ms, row.build_s, row.wall_s = status, 100.0, 1.0, 2.0
        return row

    return run


def test_run_plan_writes_after_every_row_and_runs_the_kernel_timings_last(bench, tmp_path):
    progress = _progress(bench, tmp_path)
    seen = []

    def run(row, peaks):
        # the report on disk already holds the rows finished before this one
        seen.append(Path(progress.args.out).read_text().count("| ok |"))
        return _fake_row()(row, peaks)

    def kernels(p):
        assert all(r.status == "ok" for r in p.rows)  # after every row
        p.skipped.append("Triton kernel timings: skipped (error: RuntimeError: boom)")

    assert bench.run_plan(progress, run=run, kernels=kernels) == 0
    assert seen == [0, 1, 2]
    text = (tmp_path / "gpu.md").read_text()
    assert (
        "Run: finished" in text
        and "Triton kernel timings: skipped (error: RuntimeError: boom)" in text
    )
    assert json.loads((tmp_path / "gpu.json").read_text())["state"] == "finished"


def test_run_plan_stops_at_a_lost_cuda_context_and_still_reports(bench, tmp_path):
    progress = _progress(bench, tmp_path)
    calls = []

    def run(row, peaks):
        calls.append(row)
        if len(calls) == 2:
            row.status = "error: AcceleratorError: CUDA error: an illegal memory access"
            raise bench.ContextLostError("AcceleratorError: CUDA error: an illegal memory access")
        return _fake_row()(row, peaks)

    def kernels(p):
        raise AssertionError("no CUDA call after a lost context")

    assert bench.run_plan(progress, run=run, kernels=kernels) == 1
    assert len(calls) == 2
    statuses = [r.status for r in progress.rows]
    assert statuses[0] == "ok" and statuses[1].startswith("error: AcceleratorError")
    assert (
        statuses[2]
        == "not run (CUDA context lost: AcceleratorError: CUDA error: an illegal memory access)"
    )
    text = (tmp_path / "gpu.md").read_text()
    assert "Run: stopped early: CUDA context lost" in text
    assert "Triton kernel timings: not run (CUDA context lost" in text


def test_run_plan_on_sigterm_writes_the_partial_report(bench, tmp_path):
    import signal

    progress = _progress(bench, tmp_path)
    before = signal.getsignal(signal.SIGTERM)

    def run(row, peaks):
        if row is progress.rows[1]:
            os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` sends it, mid-row
            import time

            time.sleep(5)  # the handler interrupts this
        return _fake_row()(row, peaks)

    assert bench.run_plan(progress, run=run, kernels=lambda p: None) == 143
    assert [r.status for r in progress.rows] == [
        "ok",
        "interrupted (SIGTERM) while running",
        "not run (interrupted: SIGTERM)",
    ]
    assert "Run: interrupted by SIGTERM: partial" in (tmp_path / "gpu.md").read_text()
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_run_plan_cuts_rows_that_would_overrun_the_budget(bench, tmp_path, monkeypatch):
    """The first row needs FIRST_ROW_S; with less left nothing starts, yet a report is written."""
    progress = _progress(bench, tmp_path, n=2, budget_s=bench.FIRST_ROW_S - 1)
    monkeypatch.setattr(bench, "T_START", __import__("time").monotonic())
    ran = []
    assert bench.run_plan(progress, run=lambda r, p: ran.append(r), kernels=lambda p: None) == 0
    assert not ran
    assert all(
        r.status.startswith(f"not run (time budget: needs ~{bench.FIRST_ROW_S:.0f} s")
        for r in progress.rows
    )
    assert len(progress.skipped) == 2
    assert "not run (time budget" in (tmp_path / "gpu.md").read_text()


def test_sdpa_rows_turn_flash_attn_off_and_restore_the_environment(bench, monkeypatch):
    """On CUDA the local spec's SDPA routes through ops.flash_attention; an sdpa row must not
    time flash-attn where it is installed."""
    from lumos_mcore.ops import flash_attention

    monkeypatch.setenv("LUMOS_KERNELS", "auto")
    monkeypatch.delenv(flash_attention.ENV, raising=False)
    with bench.kernel_mode(bench.Variant("local", "sdpa")):
        assert os.environ[flash_attention.ENV] == "sdpa"
        assert os.environ["LUMOS_KERNELS"] == "torch"
        assert flash_attention.flash_attn_backend(72) is None
    assert flash_attention.ENV not in os.environ and os.environ["LUMOS_KERNELS"] == "auto"
    with bench.kernel_mode(bench.Variant("local", "flash", fused=True)):
        assert flash_attention.ENV not in os.environ
        assert os.environ["LUMOS_KERNELS"] == "triton"

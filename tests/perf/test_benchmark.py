"""tools/benchmark_throughput.py: real train steps of a tiny model, JSON / CSV / PNG outputs.

Throughput numbers of a tiny model on a shared CPU mean nothing; what is checked is that the
reported quantities are consistent with each other and with an independent FLOP count, that
multi-rank layouts run on spawned gloo ranks and see communication, and that the files are
well-formed.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest
from PIL import Image

from lumos_mcore.perf.flops import DiTShape, count_flops
from lumos_mcore.perf.runner import BenchmarkSpec, UnsupportedVariantError, model_config_for
from lumos_mcore.perf.sweep import CSV_FIELDS, parse_layout

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import benchmark_throughput  # noqa: E402

TINY = [
    *("--model", "Lumos-Micro/2", "--steps", "2", "--warmup", "1"),
    *("--probe-seconds", "0.02", "--probe-size", "256"),
]


def test_single_layout_run_reports_consistent_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [*TINY, "--resolution", "32", "--micro-batch-size", "3", "--compare", "diffusers"]
    assert benchmark_throughput.main([*argv, "--json", str(out)]) == 0
    assert "MFU" in capsys.readouterr().out
    payload = json.loads(out.read_text())  # strict JSON (no NaN)
    r = payload["result"]
    assert payload["spec"]["micro_batch_size"] == 3
    assert (r["layout"], r["world_size"], r["global_batch"]) == ("tp1-pp1-cp1-dp1", 1, 3)
    assert r["tokens_per_sample"] == (32 // 8 // 2) ** 2
    mcfg = model_config_for(BenchmarkSpec(model="Lumos-Micro/2", resolution=32))
    flops = count_flops(
        DiTShape.from_model_config(mcfg), r["tokens_per_sample"], single_token_cross=True
    )
    assert r["model_tflop_per_step"] == pytest.approx(3 * flops.model_train / 1e12)
    assert r["flops_per_sample"]["forward"] == pytest.approx(flops.forward)
    t = r["step_time_s"]
    assert len(r["step_time_s_all"]) == 2 and t == pytest.approx(
        statistics.median(r["step_time_s_all"])
    )
    assert t == pytest.approx(r["fwd_bwd_time_s"] + r["optimizer_time_s"], rel=0.5)
    assert r["samples_per_s"] == pytest.approx(3 / t)
    assert r["tokens_per_s"] == pytest.approx(3 * r["tokens_per_sample"] / t)
    assert r["achieved_tflops"] == pytest.approx(r["model_tflop_per_step"] / t)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / r["peak_tflops_total"])
    assert r["peak_source"] == "measured fp32 matmul" and r["peak_tflops_total"] > 0
    assert r["comm_fraction"] == 0.0 and len(r["peak_memory_gib_per_rank"]) == 1
    assert r["peak_memory_gib_per_rank"][0] > 0.05  # a Python process with torch loaded
    c = r["compare"]
    assert c["interleaved"] and c["batch"] == 3
    pairs = [a / b for a, b in zip(c["ours_step_s_all"], c["diffusers_step_s_all"])]
    assert len(pairs) == 2 and c["ratio_step"] == pytest.approx(statistics.median(pairs))
    assert c["ratio_fwd_bwd"] > 0 and c["ratio_step_cpu"] > 0
    assert r["step_cpu_s"] > 0


def test_sweep_over_lengths_and_layouts_writes_csv_json_png(tmp_path):
    argv = [*TINY, "--sweep", "--resolutions", "16,32", "--layouts", "single,tp2"]
    assert benchmark_throughput.main([*argv, "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["layout"], int(r["tokens_per_sample"])) for r in rows] == [
        ("single", 1),
        ("single", 4),
        ("tp2", 1),
        ("tp2", 4),
    ]
    assert list(rows[0]) == list(CSV_FIELDS)
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert len(data) == 4
    for r in data:
        tp2 = r["layout_name"] == "tp2"
        assert r["world_size"] == (2 if tp2 else 1)
        assert len(r["peak_memory_gib_per_rank"]) == r["world_size"]
        assert r["tokens_per_s"] == pytest.approx(
            r["global_batch"] * r["tokens_per_sample"] / r["step_time_s"]
        )
        # Tensor parallelism all-reduces activations inside every layer.
        assert (r["comm_fraction"] > 0) == tp2
        assert r["threads_per_rank"] >= 1
    with Image.open(tmp_path / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 400


def test_layout_names():
    assert parse_layout("single") == dict(tp=1, pp=1, cp=1, sequence_parallel=False, nproc=1)
    assert parse_layout("tp2-sp") == dict(tp=2, pp=1, cp=1, sequence_parallel=True, nproc=2)
    assert parse_layout("tp2pp2dp2") == dict(tp=2, pp=2, cp=1, sequence_parallel=False, nproc=8)
    with pytest.raises(ValueError, match="layout 'tp2x'"):
        parse_layout("tp2x")


def test_missing_model_variant_is_refused_by_name(monkeypatch, capsys):
    """A build whose ModelConfig lacks a variant says which one, instead of failing later."""
    import lumos_mcore.config.model as model_config

    monkeypatch.setattr(model_config, "VARIANTS", ("i2i", "t2i"))
    with pytest.raises(UnsupportedVariantError, match="model variant 'i2v' is not available"):
        model_config_for(BenchmarkSpec(variant="i2v", frames=4))
    with pytest.raises(SystemExit) as exc:
        benchmark_throughput.main([*TINY, "--variant", "nvs"])
    assert exc.value.code == 2
    assert "model variant 'nvs' is not available" in capsys.readouterr().err


def test_spec_validation_names_the_flag():
    with pytest.raises(ValueError, match="--nproc=3"):
        BenchmarkSpec(tp=2, nproc=3)
    with pytest.raises(ValueError, match="--resolution=250"):
        BenchmarkSpec(resolution=250)
    with pytest.raises(ValueError, match="image model"):
        BenchmarkSpec(variant="i2v", compare_diffusers=True)

"""tools/benchmark_sampling.py: layouts parsed strictly (megatron, HF class, TP / CP), each
timed in its own ranks, one report."""

from __future__ import annotations

import pytest

from tools.benchmark_sampling import main, parse_layout


def test_layout_names():
    assert parse_layout("1") == (1, 1)
    assert parse_layout("cp4") == (1, 4)
    assert parse_layout("tp2") == (2, 1)
    assert parse_layout("tp2cp4") == (2, 4)
    assert parse_layout("hf") == (1, 1)
    for bad in ("", "cp", "pp2", "cp2tp2", "2"):
        with pytest.raises(SystemExit, match="--layouts"):
            parse_layout(bad)


def test_one_process_and_cp2_timed_side_by_side(tmp_path):
    out = tmp_path / "report.md"
    rows = main(
        ["--model", "Lumos-Micro/2", "--frames", "2", "--latent-size", "8", "--layouts",
         "1,hf,cp2", "--warmup", "0", "--repeat", "1", "--out", str(out)]
    )  # fmt: skip
    assert [name for name, _ in rows] == ["1", "hf", "cp2"]
    assert all(r["seconds"] > 0 for _, r in rows)
    text = out.read_text()
    assert "Lumos-Micro/2 I2V, 32 tokens per clip" in text
    assert "| cp2 | 2 |" in text and "| 1 | 1 |" in text and "| hf | 1 |" in text
    assert "1.00x" in text


def test_baseline_first():
    with pytest.raises(SystemExit, match="start with 1"):
        main(["--layouts", "cp2,1"])

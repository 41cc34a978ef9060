"""``tools/benchmark_encode.py`` runs both encoding modes in one replica and checks them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_encode_compares_both_modes(tmp_path: Path) -> None:
    from lumos_mcore.encoders.tiny import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae")
    out = tmp_path / "encode.json"
    cmd = [
        sys.executable, str(REPO / "tools" / "benchmark_encode.py"), "--vae", str(vae),
        "--frames", "3", "--size", "32", "--passes", "1", "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_latents"] is True and result["ranks"] == 2
    assert set(result["seconds"]) == {"first rank only", "shard_vae"}
    assert all(v > 0 for v in result["seconds"].values()) and result["speedup"] > 0
    assert "speed-up" in proc.stdout

"""tools/gpu_proof.sh before any GPU work: the offline wheel install, the engine check and the
report of what would be skipped (``--check-only``), as on a CUDA image without network."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_proof.sh"


def _proof(tmp_path: Path, python: Path | str, wheels: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": str(python),
        "LUMOS_PROOF_DIR": str(tmp_path / "logs"),
        "LUMOS_PROOF_SITE": str(tmp_path / "site"),
        "LUMOS_WHEELS": str(wheels),
    }
    return subprocess.run(
        ["bash", str(SCRIPT), "--check-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _wheel(folder: Path, requires: str) -> Path:
    """A one-module wheel whose dependency is on no index: pip cannot resolve it offline."""
    name, version = "lumos_probe", "0.1"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{name}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nRequires-Dist: {requires}\n"
        ),
        f"{name}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return out


def test_unresolvable_wheels_go_in_without_dependencies_and_the_check_reports(tmp_path):
    _wheel(tmp_path / "wheels", requires="lumos-absent-dependency>=1")
    r = _proof(tmp_path, sys.executable, tmp_path / "wheels")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # the interpreter's environment is untouched; the wheel went to the proof's own site
    assert "installing each without its dependencies" in out
    assert "installed  lumos_probe-0.1-py3-none-any.whl" in out
    assert (tmp_path / "site" / "lumos_probe" / "__init__.py").is_file()
    import megatron.core

    assert f"megatron-core {megatron.core.__version__}" in out
    skipped = (tmp_path / "logs" / "skipped.txt").read_text()
    if not torch.cuda.is_available():
        assert "everything on GPU: no CUDA device" in skipped
    assert "GPU proof summary" in out
    assert not (tmp_path / "logs" / "gpu_tests.log").exists()  # --check-only runs no test


def test_missing_engine_requirements_stop_the_proof_by_name(tmp_path):
    bare = tmp_path / "python-bare"  # the same interpreter without its site-packages
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    r = _proof(tmp_path, bare, tmp_path / "no_wheels")
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    assert "the engine's requirements are missing: torch" in out
    version = ".".join(map(str, sys.version_info[:2]))
    assert f"tools/fetch_gpu_wheels.sh --python-version {version}" in out

"""tools/gpu_proof.sh before any GPU work: the offline wheel install, the engine check and the
report of what would be skipped (``--check-only``), as on a CUDA image without network; its
options, and how ``--deadline-s`` splits the time between pytest and the benchmark (with a
stand-in interpreter that records what it was asked to run)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_proof.sh"


def _proof(
    tmp_path: Path, python: Path | str, wheels: Path, *args: str, **env_extra: str
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": str(python),
        "LUMOS_PROOF_DIR": str(tmp_path / "logs"),
        "LUMOS_PROOF_SITE": str(tmp_path / "site"),
        "LUMOS_WHEELS": str(wheels),
        **env_extra,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *(args or ("--check-only",))],
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
    r = _proof(tmp_path, sys.executable, tmp_path / "wheels", "--check-only", "--deadline-s", "300")
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
    # the pip log is numbered by folder (wheels/ and ../wheels share a name)
    assert (tmp_path / "logs" / "pip_3_wheels.log").is_file()
    # how --deadline-s 300 would split: 40 % of what is left for pytest, the rest less 20 s
    m = re.search(
        r"deadline 300 s, (\d+) s left: pytest <= (\d+) s, benchmark --budget-s >= (-?\d+) s", out
    )
    assert m, out
    left, tests, bench = map(int, m.groups())
    assert 150 < left <= 300
    assert tests == left * 40 // 100 and bench == left - tests - 20


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


def test_help_exits_0_and_bad_options_exit_2():
    for flag in ("--help", "-h"):
        r = subprocess.run(["bash", str(SCRIPT), flag], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "Usage: tools/gpu_proof.sh" in r.stdout and "--deadline-s N" in r.stdout
        assert "set -uo" not in r.stdout and not r.stdout.startswith("#")
    for bad in (["--deadline-s"], ["--deadline-s", "9m"], ["--bogus"]):
        r = subprocess.run(["bash", str(SCRIPT), *bad], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (bad, r.stdout, r.stderr)


def _stand_in(tmp_path: Path) -> Path:
    """An interpreter that passes the package check, records the pytest / benchmark command
    lines, sleeps as pytest (to be cut) and, with FAKE_WRITE, writes the benchmark's --out."""
    log = tmp_path / "calls"
    fake = tmp_path / "python-stand-in"
    fake.write_text(
        f"""#!/bin/bash
case "$1" in
  -) cat > /dev/null; exit 0 ;;
  -m) if [ "$2" = pytest ]; then printf '%s\\n' "$@" > "{log}.pytest"; exec sleep 60; fi ;;
  tools/benchmark_gpu.py)
    printf '%s\\n' "$@" > "{log}.bench"
    out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done
    [ -n "${{FAKE_WRITE:-}}" ] && echo "# this run" > "$out"
    exit "${{FAKE_RC:-0}}" ;;
esac
exec "{sys.executable}" "$@"
"""
    )
    fake.chmod(0o755)
    return fake


def test_benchmark_gets_the_rest_of_the_deadline_and_a_stale_report_is_not_this_runs(tmp_path):
    fake = _stand_in(tmp_path)
    report = tmp_path / "reports" / "gpu_today.md"
    report.parent.mkdir()
    report.write_text("# an earlier run\n")
    os.utime(report, (1e9, 1e9))
    env = {"LUMOS_PROOF_REPORT": str(report), "FAKE_RC": "1"}
    r = _proof(tmp_path, fake, tmp_path / "none", "--bench-only", "--deadline-s", "120", **env)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    args = (tmp_path / "calls.bench").read_text().split("\n")
    budget = int(args[args.index("--budget-s") + 1])
    assert 120 - 20 - 10 <= budget <= 120 - 20  # what is left at that point, less 20 s
    assert f"wrote no report ({report} is from an earlier run" in out
    assert f"report {report}" not in out
    assert not (tmp_path / "logs" / report.name).exists()  # not copied as this run's

    # a report written by this run is announced and copied; --budget-s after -- wins
    env = {"LUMOS_PROOF_REPORT": str(report), "FAKE_WRITE": "1"}
    r = _proof(tmp_path, fake, tmp_path / "none", "--bench-only", "--", "--budget-s", "7", **env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    args = (tmp_path / "calls.bench").read_text().split("\n")
    assert args.count("--budget-s") == 1 and args[args.index("--budget-s") + 1] == "7"
    assert f"benchmark: exit 0; report {report}" in out
    assert (tmp_path / "logs" / report.name).read_text() == "# this run\n"


def test_pytest_is_cut_at_its_share_of_the_deadline(tmp_path):
    """--tests-only: pytest gets what is left less 20 s, under timeout (SIGINT first, so that
    pytest can still write its summary), with -rfEs for FAILED / ERROR / SKIPPED lines."""
    fake = _stand_in(tmp_path)
    r = _proof(tmp_path, fake, tmp_path / "none", "--tests-only", "--deadline-s", "24")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    args = (tmp_path / "calls.pytest").read_text().split("\n")
    assert "-rfEs" in args and "-rs" not in args
    summary = (tmp_path / "logs" / "test_summary.txt").read_text()
    assert re.search(r"pytest stopped at its share of --deadline-s 24: \d+ s \(exit 124\)", summary)

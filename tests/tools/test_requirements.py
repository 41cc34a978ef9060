"""The dependency files agree: every CPU requirement is locked to a version inside its range, and
the GPU-build packages stay out of the CPU install (tools/setup_env.sh installs with the lock)."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
GPU_ONLY = {"transformer-engine", "flash-attn", "apex"}


def _requirements(name: str) -> list[Requirement]:
    out = []
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(Requirement(line))
    return out


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements-lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"requirements-lock.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def test_every_cpu_requirement_is_locked_inside_its_range() -> None:
    pins = _lock()
    for req in _requirements("requirements.txt") + _requirements("requirements-dev.txt"):
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned exactly in requirements.txt (the wheel on local disk)
            assert str(req.specifier).startswith("=="), req
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is required but not in requirements-lock.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements-lock.txt pins {req.name}=={pins[name]}, outside {req}"
        )


def test_gpu_build_packages_stay_out_of_the_cpu_install() -> None:
    cpu = {canonicalize_name(r.name) for r in _requirements("requirements.txt")} | set(_lock())
    assert not cpu & GPU_ONLY
    gpu = {canonicalize_name(r.name) for r in _requirements("requirements-gpu.txt")}
    assert GPU_ONLY - {"apex"} <= gpu, gpu


def test_setup_installs_with_the_lock() -> None:
    setup = (REPO / "tools" / "setup_env.sh").read_text()
    assert '-c "$ROOT/requirements-lock.txt"' in setup
    assert '"$ROOT/requirements-lock.txt"' in setup.split("REQ_HASH=", 1)[1].splitlines()[0]

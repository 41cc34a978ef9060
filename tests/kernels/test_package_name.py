"""The kernels import as ``lumos_kernels``; nothing of the project claims the name ``kernels``.

transformers >= 5.25 depends on PyPI's ``kernels`` package and imports it with every model class.
A ``kernels/__init__.py`` at the repository root shadowed it whenever the root was on
``sys.path`` (``python -m pytest``, ``python -m torch.distributed.run`` from a checkout) and
``from diffusers import PixArtTransformer2DModel`` failed to import.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, *flags: str) -> str:
    out = subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_repository_root_does_not_shadow_a_kernels_package() -> None:
    # `-c` puts the working directory (the repository root) first on sys.path, as `-m` does.
    origin = _run(
        "import importlib.util as u; s = u.find_spec('kernels'); "
        "print('' if s is None or s.origin is None else s.origin)"
    )
    # absent or a namespace portion (origin None) is fine; a regular package must not be ours
    assert not origin or not Path(origin).resolve().is_relative_to(REPO / "kernels"), origin
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_a_checkout_that_was_not_installed_still_finds_the_kernels() -> None:
    # -S: no site-packages, so neither the editable install nor any other lumos_kernels is seen
    origin = _run(
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import lumos_mcore, importlib.util as u; "
        "print(u.find_spec('lumos_kernels').origin)",
        "-S",
    )
    assert Path(origin) == REPO / "kernels" / "lumos_kernels" / "__init__.py"


def test_the_installed_package_is_the_checkouts() -> None:
    import lumos_kernels

    assert (
        Path(lumos_kernels.__file__).resolve() == REPO / "kernels" / "lumos_kernels" / "__init__.py"
    )

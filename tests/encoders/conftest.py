"""Tiny randomly-initialised encoders saved once per session (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lumos_mcore.encoders.tiny import save_tiny_dino, save_tiny_encoders

    root = tmp_path_factory.mktemp("encoders")
    paths = save_tiny_encoders(root, seed=0)
    paths["vit"] = save_tiny_dino(root / "vit", kind="vit", seed=4)
    return paths


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine the
    OpenMP pool makes them 10-40x slower; restore the setting for other tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

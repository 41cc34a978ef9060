"""lumos_mcore.durable: a failed replace keeps the previous file and leaves no temporary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lumos_mcore import durable


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "latest_checkpointed_iteration.txt"
    durable.atomic_write_text(target, "iter_0000010\n")
    durable.atomic_write_text(target, "iter_0000020\n")
    assert target.read_text() == "iter_0000020\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_a_failed_rename_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "index.json"
    durable.atomic_write_bytes(target, b'{"old": 1}')

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        durable.atomic_write_bytes(target, b'{"new": 2}')
    assert target.read_bytes() == b'{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_fsync_helpers_accept_files_and_folders(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    durable.write_durably(f, "{}\n")
    durable.fsync_file(f)
    durable.fsync_dir(tmp_path)
    durable.fsync_dir(tmp_path / "missing")  # no folder: nothing to make durable, no error
    assert f.read_text() == "{}\n"

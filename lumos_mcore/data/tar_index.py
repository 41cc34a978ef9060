"""Plumbing shared by the two indexed webdataset shard formats.

Feature shards (``lumos_mcore.data.shards``, index format ``lumos-features``) and media shards
(``lumos_mcore.data.media.shards``, ``lumos-media``) are the same kind of dataset: uncompressed
webdataset tars whose members are grouped by key, plus an ``index.json`` recording each member's
byte offset and size so a reader can ``pread`` a sample. They differ only in which members a
sample has and which per-sample facts the index keeps. Everything that does not depend on that —
tar member writing, atomic file replacement, key checks, the offset/size columns, the index
envelope (format tag, version, sample count), the shard writer's lifecycle and scanning foreign
tars — lives here once, so the two formats cannot drift apart.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from lumos_mcore.durable import atomic_write_bytes, fsync_dir

INDEX_NAME = "index.json"

logger = logging.getLogger(__name__)

_Index = TypeVar("_Index", bound="TarIndex")
_Writer = TypeVar("_Writer", bound="TarShardWriter")


def check_key(key: str) -> None:
    """Reject sample keys that would not survive webdataset's grouping of members by key."""
    # webdataset splits the member name at the first dot of the basename; "/" would create
    # directories inside the tar and change the grouping.
    if not key or "." in key or "/" in key or "\\" in key:
        raise ValueError(f"sample key {key!r}: must be non-empty and contain no '.', '/' or '\\'")


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Append a regular-file member; returns ``(offset, size)`` of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-reproducible shards
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    block = tarfile.BLOCKSIZE
    return tar.offset - (len(data) + block - 1) // block * block, len(data)


def members_to_json(
    offsets: np.ndarray, sizes: np.ndarray, member_column: dict[str, int]
) -> dict[str, dict[str, list[int]]]:
    """The ``members`` entry of a shard in ``index.json``: per member, columnar offsets/sizes."""
    return {
        m: {"offset": offsets[:, c].tolist(), "size": sizes[:, c].tolist()}
        for m, c in member_column.items()
    }


def members_from_json(
    d: dict[str, Any], member_column: dict[str, int], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``members_to_json`` for shard entry ``d``: ``[n, M]`` int64 offsets and sizes,
    -1 for members the entry does not list."""
    offsets = np.full((n, len(member_column)), -1, dtype=np.int64)
    sizes = np.full((n, len(member_column)), -1, dtype=np.int64)
    for m, c in member_column.items():
        if m in d["members"]:
            offsets[:, c] = d["members"][m]["offset"]
            sizes[:, c] = d["members"][m]["size"]
    return offsets, sizes


class TarShard:
    """Mixed into the shard entries of both index formats: every entry keeps its samples' keys
    and its file size, and its ``index.json`` form starts with the same four fields."""

    name: str
    keys: list[str]
    size_bytes: int

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def _head_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "size_bytes": self.size_bytes,
            "keys": list(self.keys),
        }


class TarIndex:
    """Envelope of an ``index.json`` (format tag, version, sample count), mixed into the index
    dataclasses of both shard formats; the subclass supplies the format-specific parts.

    Subclasses define ``FORMAT``, ``VERSION``, ``WRONG_FORMAT`` (the end of the error message
    for a foreign file, formatted with its ``format`` and ``version``), the fields ``shards`` and
    ``extra``, ``_fields_json`` (their top-level entries between ``num_samples`` and ``extra``,
    in file order) and ``_from_json``.
    """

    FORMAT: str
    VERSION: int
    WRONG_FORMAT: str
    shards: list
    extra: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def _fields_json(self) -> dict[str, Any]:
        return {}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": self.VERSION,
            "num_samples": self.num_samples,
            **self._fields_json(),
            "extra": self.extra,
            "shards": [s.to_json() for s in self.shards],
        }

    def save(self, root: str | os.PathLike) -> Path:
        path = Path(root) / INDEX_NAME
        atomic_write_bytes(path, json.dumps(self.to_json(), separators=(",", ":")).encode())
        return path

    @classmethod
    def _from_json(cls, d: dict[str, Any]) -> Any:
        raise NotImplementedError

    @classmethod
    def load(cls: type[_Index], root: str | os.PathLike) -> _Index:
        path = Path(root) / INDEX_NAME
        with open(path, "rb") as f:
            d = json.load(f)
        if d.get("format") != cls.FORMAT or d.get("version") != cls.VERSION:
            raise ValueError(
                f"{path}: not a {cls.FORMAT} v{cls.VERSION} index "
                + cls.WRONG_FORMAT.format(format=d.get("format"), version=d.get("version"))
            )
        index = cls._from_json(d)
        if index.num_samples != d["num_samples"]:
            raise ValueError(
                f"{path}: num_samples={d['num_samples']} but shards hold {index.num_samples}"
            )
        return index


class TarShardWriter:
    """Lifecycle of an indexed shard writer: ``{prefix}-{i:06d}.tar`` shards + ``index.json``.

    Shards are written under a temporary name and renamed when full or at ``close``, which also
    writes the index; ``abort`` (also on an exception inside ``with``) deletes the shard in
    progress and writes no index, so a directory is a dataset exactly when its index exists.
    With ``overwrite=True`` the old ``index.json`` is deleted before the first old shard is
    replaced, so an interrupted rewrite leaves no dataset rather than an old index over new
    bytes; a successful ``close`` deletes the writer's own ``{prefix}-NNNNNN.tar`` shards that
    the new index does not list (left over from a larger old dataset or an interrupted run).
    Subclasses define ``_NAME`` (for error messages), ``_MEMBERS``, ``_COLUMNS`` (their own
    per-sample lists in ``self._cur``), ``_shard_info`` and ``_index``, and implement ``write``
    with ``_check_open``, ``_sample_key``, ``_write_members`` and ``_append``.
    """

    _NAME = "TarShardWriter"
    _MEMBERS: tuple[str, ...] = ()
    _COLUMNS: tuple[str, ...] = ()

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        samples_per_shard: int,
        prefix: str,
        overwrite: bool,
        extra: dict[str, Any] | None,
        check_options: Callable[[], None] | None = None,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
        if check_options is not None:
            check_options()  # the subclass's own argument checks, before the disk is touched
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix={prefix!r}: must be a non-empty file-name prefix")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / INDEX_NAME).exists() and not overwrite:
            raise FileExistsError(
                f"{self.out_dir / INDEX_NAME} exists; pass overwrite=True to replace the dataset"
            )
        # The old index is removed lazily, just before the first shard rename, so a writer
        # that fails before writing anything leaves the old dataset intact.
        self._drop_old_index = overwrite
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.extra = dict(extra or {})
        self._shards: list[Any] = []
        self._keys_seen: set[str] = set()
        self._num_written = 0
        # Shard in progress.
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._cur: dict[str, Any] | None = None
        self._closed = False

    @property
    def num_samples(self) -> int:
        return self._num_written

    def _shard_name(self, i: int) -> str:
        return f"{self.prefix}-{i:06d}.tar"

    def _open_shard(self) -> None:
        name = self._shard_name(len(self._shards))
        self._tmp_path = self.out_dir / f".{name}.tmp-{os.getpid()}"
        # Both stay open across write() calls; closed in _finish_shard / abort.
        self._file = open(self._tmp_path, "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._cur = {"name": name, "keys": [], "offsets": [], "sizes": []}
        self._cur.update({c: [] for c in self._COLUMNS})

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self._NAME} is closed")

    def _sample_key(self, key: str | None) -> str:
        """The key of the next sample (default: the running sample number), checked unique."""
        key = f"{self._num_written:09d}" if key is None else str(key)
        check_key(key)
        if key in self._keys_seen:
            raise ValueError(f"sample key {key!r} written twice")
        return key

    def _write_members(self, members: Iterable[tuple[int, str, bytes]]) -> tuple[list, list]:
        """Add one sample's ``(column, member name, data)`` members to the shard in progress
        (opened if none is); returns its offset and size rows (-1 for absent members).
        ``members`` may be a generator: each member's bytes are made just before it is added."""
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        offsets = [-1] * len(self._MEMBERS)
        sizes = [-1] * len(self._MEMBERS)
        for col, name, data in members:
            offsets[col], sizes[col] = add_tar_member(self._tar, name, data)
        return offsets, sizes

    def _append(self, key: str, offsets: list, sizes: list, **columns: Any) -> None:
        """Record a written sample in the shard's columns; finishes the shard when full."""
        assert self._cur is not None
        self._cur["keys"].append(key)
        self._cur["offsets"].append(offsets)
        self._cur["sizes"].append(sizes)
        for name, value in columns.items():
            self._cur[name].append(value)
        self._keys_seen.add(key)
        self._num_written += 1
        if len(self._cur["keys"]) >= self.samples_per_shard:
            self._finish_shard()

    def _shard_info(self, name: str, cur: dict[str, Any], size_bytes: int) -> Any:
        raise NotImplementedError

    def _index(self) -> TarIndex:
        raise NotImplementedError

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._cur is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        name = self._cur["name"]
        if self._drop_old_index:
            self._remove_old_index()
        os.replace(self._tmp_path, self.out_dir / name)  # type: ignore[arg-type]
        self._shards.append(self._shard_info(name, self._cur, size))
        self._tar = self._file = self._tmp_path = self._cur = None

    def _remove_old_index(self) -> None:
        """Unlink the dataset's ``index.json`` (durably) before any of its shards changes."""
        index = self.out_dir / INDEX_NAME
        if index.exists():
            index.unlink()
            fsync_dir(self.out_dir)
        self._drop_old_index = False

    def _remove_stale_shards(self) -> list[str]:
        """Delete this writer's shard names (``{prefix}-NNNNNN.tar``) not in the new index."""
        own = re.compile(rf"{re.escape(self.prefix)}-\d{{6,}}\.tar")
        listed = {s.name for s in self._shards}
        removed = []
        for p in sorted(self.out_dir.iterdir()):
            if own.fullmatch(p.name) and p.name not in listed and p.is_file():
                p.unlink()
                removed.append(p.name)
        if removed:
            logger.info("%s: removed %d stale shard(s) %s", self.out_dir, len(removed), removed)
        return removed

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file) and write no index."""
        if self._file is not None:
            self._file.close()
        if self._tmp_path is not None and self._tmp_path.exists():
            self._tmp_path.unlink()
        self._tar = self._file = self._tmp_path = self._cur = None
        self._closed = True

    def close(self) -> Path:
        """Finalise the last shard and write ``index.json``; returns the index path."""
        self._check_open()
        if self._tar is not None:
            self._finish_shard()
        if not self._shards:
            self.abort()
            raise ValueError(f"{self.out_dir}: no samples were written; not writing an index")
        index = self._index()
        self._closed = True
        fsync_dir(self.out_dir)  # every shard rename is durable before the index names them
        path = index.save(self.out_dir)
        fsync_dir(self.out_dir)
        self._remove_stale_shards()
        return path

    def __enter__(self: _Writer) -> _Writer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def list_shards(root: Path, pattern: str) -> list[Path]:
    """The tars ``root/pattern`` to index, by name (hidden files, e.g. temporaries, skipped)."""
    tars = sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if not tars:
        raise FileNotFoundError(f"{root}: no shards matching {pattern!r}")
    return tars


def scan_tar(
    source: str | os.PathLike | BinaryIO, *, damage: dict[str, int] | None = None
) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """``(key, suffix, member)`` of each regular member with a dot in its basename, by the
    webdataset convention (key = path up to the first dot of the basename). Reads headers only.

    tarfile ends its iteration quietly at a corrupt header, which would drop every later sample
    of the shard unnoticed. So once the headers are exhausted, any non-zero bytes left after the
    last readable member (beyond the end-of-archive zero blocks / padding) are logged as a
    warning naming the shard and the byte offset, and, when ``damage`` is given, recorded in it
    as ``offset`` (where the unreadable region starts) and ``lost_bytes`` (its length) for the
    caller to report. A member whose data is cut short is not counted here: reads report it.
    """
    is_file = hasattr(source, "read")
    kwargs: dict[str, Any] = {"fileobj": source} if is_file else {"name": source}
    end = source.tell() if is_file else 0  # type: ignore[union-attr]  # tar offsets are absolute
    tar: tarfile.TarFile | None = None
    try:
        tar = tarfile.open(mode="r:", **kwargs)  # noqa: SIM115  # closed below
        for m in tar:
            if not m.isfile():
                continue
            head, _, base = m.name.rpartition("/")
            stem, dot, suffix = base.partition(".")
            if not dot:
                continue
            yield (f"{head}/{stem}" if head else stem), suffix, m
    except tarfile.ReadError:
        pass  # e.g. a bad first header or a bad pax header: the region is measured below
    finally:
        if tar is not None:
            end = tar.offset  # start of the header the scan stopped at
            tar.close()
    lost = _unzeroed_tail(source, end)
    if lost:
        name = getattr(source, "name", "<tar stream>") if is_file else os.fspath(source)  # type: ignore[arg-type]
        logger.warning(
            "%s: unreadable tar header at byte %d; the %d bytes after it (all later samples of "
            "this shard) are not indexed; rewrite or repair the shard",
            name,
            end,
            lost,
        )
        if damage is not None:
            damage.update(offset=end, lost_bytes=lost)


def _unzeroed_tail(source: str | os.PathLike | BinaryIO, end: int) -> int:
    """Bytes from ``end`` to the end of the file when any of them is non-zero, else 0 (a
    well-formed tar ends in zero blocks and zero record padding only)."""
    f: Any = source if hasattr(source, "read") else open(source, "rb")  # noqa: SIM115
    pos = f.tell()
    try:
        size = f.seek(0, os.SEEK_END)
        if end >= size:
            return 0
        f.seek(end)
        # A damaged header is non-zero, so this stops at the first chunk; a clean tail is small.
        while chunk := f.read(1 << 16):
            if chunk.count(0) != len(chunk):
                return size - end
        return 0
    finally:
        if f is source:
            f.seek(pos)
        else:
            f.close()

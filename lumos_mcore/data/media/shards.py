"""Media shards: webdataset tar files of encoded images/videos plus a seekable ``index.json``.

A sample is a group of tar members sharing a key (webdataset convention)::

    <key>.jpg | .png | .webp | .mp4 | .webm | ...   the encoded media, stored as is
    <key>.json                                       metadata: caption, camera, source facts
    <key>.txt                                        caption (optional; img2dataset layout)

``index.json`` (format ``lumos-media``) records each member's byte offset and size plus the
probed facts of every sample (kind, width, height, frame count, fps, codec) in per-shard columns,
so the reader buckets, filters and routes samples without opening them and ``pread``s a sample in
one call. The shards remain plain webdataset tars. Writes are atomic (temporary name + rename); a
dataset is complete exactly when its ``index.json`` exists.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lumos_mcore.data.media.probe import MediaInfo, ProbeError, media_kind, probe_media
from lumos_mcore.data.media.pyav_decode import looks_truncated
from lumos_mcore.data.shards import _atomic_write_bytes, _check_key

MEDIA_INDEX_FORMAT = "lumos-media"
MEDIA_INDEX_VERSION = 1
INDEX_NAME = "index.json"

# Member columns of the per-sample offset/size tables.
MEDIA, META, CAPTION = "media", "json", "txt"
MEMBERS: tuple[str, ...] = (MEDIA, META, CAPTION)
MEMBER_COLUMN = {name: i for i, name in enumerate(MEMBERS)}
_FACTS = ("kind", "width", "height", "num_frames", "fps", "codec")


@dataclass
class MediaShardInfo:
    """One shard: member offsets/sizes (-1 = absent) and probed facts per sample."""

    name: str
    keys: list[str]
    exts: list[str]  # media member extension ("" = no media member)
    offsets: np.ndarray  # [n, len(MEMBERS)] int64
    sizes: np.ndarray  # [n, len(MEMBERS)] int64
    kinds: list[str]  # "image" / "video" / "" (unknown)
    widths: np.ndarray  # [n] int32, -1 unknown
    heights: np.ndarray  # [n] int32
    num_frames: np.ndarray  # [n] int32
    fps: np.ndarray  # [n] float32
    codecs: list[str]
    size_bytes: int
    # Why probing failed when the index was built ("" = probed fine); facts are then unknown.
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.errors:
            self.errors = [""] * len(self.keys)

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "size_bytes": self.size_bytes,
            "keys": list(self.keys),
            "ext": list(self.exts),
            "members": {
                m: {"offset": self.offsets[:, c].tolist(), "size": self.sizes[:, c].tolist()}
                for m, c in MEMBER_COLUMN.items()
            },
            "kind": list(self.kinds),
            "width": self.widths.tolist(),
            "height": self.heights.tolist(),
            "num_frames": self.num_frames.tolist(),
            "fps": [round(float(f), 6) for f in self.fps],
            "codec": list(self.codecs),
            "error": list(self.errors),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MediaShardInfo:
        n = int(d["num_samples"])
        offsets = np.full((n, len(MEMBERS)), -1, dtype=np.int64)
        sizes = np.full((n, len(MEMBERS)), -1, dtype=np.int64)
        for m, c in MEMBER_COLUMN.items():
            if m in d["members"]:
                offsets[:, c] = d["members"][m]["offset"]
                sizes[:, c] = d["members"][m]["size"]
        info = cls(
            name=d["name"],
            keys=list(d["keys"]),
            exts=list(d["ext"]),
            offsets=offsets,
            sizes=sizes,
            kinds=list(d["kind"]),
            widths=np.asarray(d["width"], dtype=np.int32).reshape(n),
            heights=np.asarray(d["height"], dtype=np.int32).reshape(n),
            num_frames=np.asarray(d["num_frames"], dtype=np.int32).reshape(n),
            fps=np.asarray(d["fps"], dtype=np.float32).reshape(n),
            codecs=list(d["codec"]),
            size_bytes=int(d["size_bytes"]),
            errors=list(d.get("error") or []),
        )
        for col in ("keys", "exts", "kinds", "codecs", "errors"):
            if len(getattr(info, col)) != n:
                raise ValueError(f"index entry for shard {d['name']}: column {col} is not {n} long")
        return info


@dataclass
class MediaIndex:
    """Contents of a ``lumos-media`` ``index.json``."""

    shards: list[MediaShardInfo]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MEDIA_INDEX_FORMAT,
            "version": MEDIA_INDEX_VERSION,
            "num_samples": self.num_samples,
            "extra": self.extra,
            "shards": [s.to_json() for s in self.shards],
        }

    def save(self, root: str | os.PathLike) -> Path:
        path = Path(root) / INDEX_NAME
        _atomic_write_bytes(path, json.dumps(self.to_json(), separators=(",", ":")).encode())
        return path

    @classmethod
    def load(cls, root: str | os.PathLike) -> MediaIndex:
        path = Path(root) / INDEX_NAME
        with open(path, "rb") as f:
            d = json.load(f)
        if d.get("format") != MEDIA_INDEX_FORMAT or d.get("version") != MEDIA_INDEX_VERSION:
            raise ValueError(
                f"{path}: not a {MEDIA_INDEX_FORMAT} v{MEDIA_INDEX_VERSION} index (format="
                f"{d.get('format')!r}); write media shards with tools/make_media_shards.py"
            )
        index = cls(
            shards=[MediaShardInfo.from_json(s) for s in d["shards"]], extra=d.get("extra") or {}
        )
        if index.num_samples != d["num_samples"]:
            raise ValueError(
                f"{path}: num_samples={d['num_samples']} but shards hold {index.num_samples}"
            )
        return index


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-reproducible shards
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    block = tarfile.BLOCKSIZE
    return tar.offset - (len(data) + block - 1) // block * block, len(data)


class MediaShardWriter:
    """Writes encoded media into ``{prefix}-{i:06d}.tar`` shards plus ``index.json``.

    ``write`` probes the bytes (raising ``ProbeError`` for empty/unreadable input) unless the
    caller passes the facts as ``info``. Context manager: on an exception the shard in progress
    is deleted and no index is written.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        samples_per_shard: int = 1000,
        prefix: str = "media",
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix={prefix!r}: must be a non-empty file-name prefix")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / INDEX_NAME).exists() and not overwrite:
            raise FileExistsError(
                f"{self.out_dir / INDEX_NAME} exists; pass overwrite=True to replace the dataset"
            )
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.extra = dict(extra or {})
        self._shards: list[MediaShardInfo] = []
        self._keys_seen: set[str] = set()
        self._num_written = 0
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._cur: dict[str, list] | None = None
        self._closed = False

    @property
    def num_samples(self) -> int:
        return self._num_written

    def _open_shard(self) -> None:
        name = f"{self.prefix}-{len(self._shards):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _finish_shard / abort
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._cur = {k: [] for k in ("keys", "exts", "offsets", "sizes", "facts")}
        self._cur["name"] = name  # type: ignore[assignment]

    def write(
        self,
        data: bytes,
        ext: str,
        *,
        key: str | None = None,
        info: MediaInfo | None = None,
        caption: str | None = None,
        camera: Any | None = None,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Append one sample; returns its key (default: the running sample number)."""
        if self._closed:
            raise RuntimeError("MediaShardWriter is closed")
        ext = ext.lower().lstrip(".")
        if media_kind(ext) is None:
            raise ProbeError("unsupported", f"media extension {ext!r}")
        key = f"{self._num_written:09d}" if key is None else str(key)
        _check_key(key)
        if key in self._keys_seen:
            raise ValueError(f"sample key {key!r} written twice")
        if info is None:
            info = probe_media(data, ext)
        meta = dict(meta or {})
        meta.setdefault("key", key)
        meta.update({k: v for k, v in info.to_json().items() if k != "kind"})
        if caption is not None:
            meta["caption"] = str(caption)
        if camera is not None:
            cam = np.asarray(camera, dtype=np.float64)
            if not np.isfinite(cam).all():
                raise ValueError(f"sample {key!r}: camera pose contains NaN/inf")
            meta["camera"] = cam.tolist()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None and self._cur is not None
        offsets, sizes = [-1] * len(MEMBERS), [-1] * len(MEMBERS)
        c = MEMBER_COLUMN[MEDIA]
        offsets[c], sizes[c] = _tar_member(self._tar, f"{key}.{ext}", bytes(data))
        c = MEMBER_COLUMN[META]
        offsets[c], sizes[c] = _tar_member(
            self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode()
        )
        self._cur["keys"].append(key)
        self._cur["exts"].append(ext)
        self._cur["offsets"].append(offsets)
        self._cur["sizes"].append(sizes)
        self._cur["facts"].append(info)
        self._keys_seen.add(key)
        self._num_written += 1
        if len(self._cur["keys"]) >= self.samples_per_shard:
            self._finish_shard()
        return key

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._cur is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        name = self._cur["name"]
        os.replace(self._tmp, self.out_dir / name)  # type: ignore[arg-type]
        self._shards.append(_shard_info(name, self._cur, size))  # type: ignore[arg-type]
        self._tar = self._file = self._tmp = self._cur = None

    def abort(self) -> None:
        """Drop the shard in progress and write no index."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tar = self._file = self._tmp = self._cur = None
        self._closed = True

    def close(self) -> Path:
        """Finalise the last shard and write ``index.json``; returns the index path."""
        if self._closed:
            raise RuntimeError("MediaShardWriter is closed")
        if self._tar is not None:
            self._finish_shard()
        if not self._shards:
            self.abort()
            raise ValueError(f"{self.out_dir}: no samples were written; not writing an index")
        self._closed = True
        return MediaIndex(self._shards, self.extra).save(self.out_dir)

    def __enter__(self) -> MediaShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _unknown_info(kind: str = "") -> MediaInfo:
    return MediaInfo(kind, -1, -1, -1, 0.0, "")


def _shard_info(name: str, cur: dict[str, list], size_bytes: int) -> MediaShardInfo:
    facts: list[MediaInfo] = cur["facts"]
    return MediaShardInfo(
        name=name,
        keys=cur["keys"],
        exts=cur["exts"],
        offsets=np.asarray(cur["offsets"], dtype=np.int64).reshape(-1, len(MEMBERS)),
        sizes=np.asarray(cur["sizes"], dtype=np.int64).reshape(-1, len(MEMBERS)),
        kinds=[f.kind for f in facts],
        widths=np.asarray([f.width for f in facts], dtype=np.int32),
        heights=np.asarray([f.height for f in facts], dtype=np.int32),
        num_frames=np.asarray([f.num_frames for f in facts], dtype=np.int32),
        fps=np.asarray([f.fps for f in facts], dtype=np.float32),
        codecs=[f.codec for f in facts],
        size_bytes=size_bytes,
        errors=list(cur.get("errors") or []),
    )


def build_media_index(
    root: str | os.PathLike, *, pattern: str = "*.tar", write: bool = True
) -> MediaIndex:
    """Index existing webdataset shards of images/videos (img2dataset / video2dataset layout).

    Reads every tar header and probes each media member (image headers; video containers are
    demuxed, not decoded) to record the facts the reader needs. A sample whose media is missing,
    empty or unreadable is still listed (facts unknown) so the reader counts it as bad; a
    truncated tar is indexed up to its last readable header.
    """
    root = Path(root)
    tars = sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if not tars:
        raise FileNotFoundError(f"{root}: no shards matching {pattern!r}")
    shards: list[MediaShardInfo] = []
    for path in tars:
        groups: dict[str, dict[str, Any]] = {}
        with open(path, "rb") as raw:
            try:
                with tarfile.open(fileobj=raw, mode="r:") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        head, _, base = m.name.rpartition("/")
                        stem, dot, suffix = base.partition(".")
                        if not dot:
                            continue
                        key = f"{head}/{stem}" if head else stem
                        g = groups.setdefault(
                            key,
                            {"off": [-1] * len(MEMBERS), "size": [-1] * len(MEMBERS), "ext": ""},
                        )
                        suffix = suffix.lower()
                        col = None
                        if media_kind(suffix) is not None and not g["ext"]:
                            col, g["ext"] = MEMBER_COLUMN[MEDIA], suffix
                        elif suffix in (META, CAPTION):
                            col = MEMBER_COLUMN[suffix]
                        if col is not None:
                            g["off"][col], g["size"][col] = m.offset_data, m.size
            except tarfile.ReadError:
                pass  # truncated/corrupt tail: keep what was indexed; reads report the damage
            if not groups:
                continue
            cur: dict[str, Any] = {
                k: [] for k in ("keys", "exts", "offsets", "sizes", "facts", "errors")
            }
            for key, g in groups.items():
                off, size = g["off"][MEMBER_COLUMN[MEDIA]], g["size"][MEMBER_COLUMN[MEDIA]]
                info = _unknown_info(media_kind(g["ext"]) or "")
                error = ""
                if off >= 0 and size > 0:
                    raw.seek(off)
                    data = raw.read(size)
                    if len(data) < size:
                        error = "truncated"
                    else:
                        try:
                            info = probe_media(data, g["ext"])
                        except ProbeError as e:
                            error = e.reason
                            if error == "undecodable" and looks_truncated(data):
                                error = "truncated"
                elif off >= 0:
                    error = "empty"
                cur["errors"].append(error)
                cur["keys"].append(key.replace("/", "_"))
                cur["exts"].append(g["ext"])
                cur["offsets"].append(g["off"])
                cur["sizes"].append(g["size"])
                cur["facts"].append(info)
        shards.append(_shard_info(path.name, cur, path.stat().st_size))
    if not shards:
        raise FileNotFoundError(f"{root}: shards matching {pattern!r} hold no samples")
    index = MediaIndex(shards)
    if write:
        index.save(root)
    return index

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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lumos_mcore.data.media.probe import MediaInfo, ProbeError, media_kind, probe_media
from lumos_mcore.data.media.pyav_decode import looks_truncated
from lumos_mcore.data.tar_index import INDEX_NAME as INDEX_NAME
from lumos_mcore.data.tar_index import (
    TarIndex,
    TarShard,
    TarShardWriter,
    list_shards,
    members_from_json,
    members_to_json,
    scan_tar,
)

MEDIA_INDEX_FORMAT = "lumos-media"
MEDIA_INDEX_VERSION = 1

# Member columns of the per-sample offset/size tables.
MEDIA, META, CAPTION = "media", "json", "txt"
MEMBERS: tuple[str, ...] = (MEDIA, META, CAPTION)
MEMBER_COLUMN = {name: i for i, name in enumerate(MEMBERS)}
_FACTS = ("kind", "width", "height", "num_frames", "fps", "codec")


@dataclass
class MediaShardInfo(TarShard):
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

    def to_json(self) -> dict[str, Any]:
        return {
            **self._head_json(),
            "ext": list(self.exts),
            "members": members_to_json(self.offsets, self.sizes, MEMBER_COLUMN),
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
        offsets, sizes = members_from_json(d, MEMBER_COLUMN, n)
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
class MediaIndex(TarIndex):
    """Contents of a ``lumos-media`` ``index.json``; ``num_samples``, ``to_json``, ``save`` and
    ``load`` come from ``TarIndex`` (shared with the feature index)."""

    FORMAT = MEDIA_INDEX_FORMAT
    VERSION = MEDIA_INDEX_VERSION
    WRONG_FORMAT = "(format={format!r}); write media shards with tools/make_media_shards.py"

    shards: list[MediaShardInfo]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _from_json(cls, d: dict[str, Any]) -> MediaIndex:
        return cls(
            shards=[MediaShardInfo.from_json(s) for s in d["shards"]], extra=d.get("extra") or {}
        )


class MediaShardWriter(TarShardWriter):
    """Writes encoded media into ``{prefix}-{i:06d}.tar`` shards plus ``index.json``.

    ``write`` probes the bytes (raising ``ProbeError`` for empty/unreadable input) unless the
    caller passes the facts as ``info``. Context manager: on an exception the shard in progress
    is deleted and no index is written. The shard lifecycle is ``TarShardWriter``'s (shared with
    ``FeatureShardWriter``).
    """

    _NAME = "MediaShardWriter"
    _MEMBERS = MEMBERS
    _COLUMNS = ("exts", "facts")

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        samples_per_shard: int = 1000,
        prefix: str = "media",
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            out_dir,
            samples_per_shard=samples_per_shard,
            prefix=prefix,
            overwrite=overwrite,
            extra=extra,
        )

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
        self._check_open()
        ext = ext.lower().lstrip(".")
        if media_kind(ext) is None:
            raise ProbeError("unsupported", f"media extension {ext!r}")
        key = self._sample_key(key)
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

        def encoded():  # lazily, so each member's bytes are made just before it is added
            yield MEMBER_COLUMN[MEDIA], f"{key}.{ext}", bytes(data)
            yield MEMBER_COLUMN[META], f"{key}.json", json.dumps(meta, sort_keys=True).encode()

        offsets, sizes = self._write_members(encoded())
        self._append(key, offsets, sizes, exts=ext, facts=info)
        return key

    def _shard_info(self, name: str, cur: dict[str, Any], size_bytes: int) -> MediaShardInfo:
        return _shard_info(name, cur, size_bytes)

    def _index(self) -> MediaIndex:
        return MediaIndex(self._shards, self.extra)


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
    truncated tar is indexed up to its last readable header; a shard whose headers end before
    its data does (a corrupt header) is recorded under ``extra["damaged_shards"]`` (the byte
    offset and the bytes that could not be indexed), besides the scan's warning.
    """
    root = Path(root)
    tars = list_shards(root, pattern)
    shards: list[MediaShardInfo] = []
    damaged: dict[str, dict[str, int]] = {}
    for path in tars:
        groups: dict[str, dict[str, Any]] = {}
        with open(path, "rb") as raw:
            damage: dict[str, int] = {}
            for key, suffix, m in scan_tar(raw, damage=damage):  # a truncated tail ends the scan
                g = groups.setdefault(
                    key, {"off": [-1] * len(MEMBERS), "size": [-1] * len(MEMBERS), "ext": ""}
                )
                suffix = suffix.lower()
                col = None
                if media_kind(suffix) is not None and not g["ext"]:
                    col, g["ext"] = MEMBER_COLUMN[MEDIA], suffix
                elif suffix in (META, CAPTION):
                    col = MEMBER_COLUMN[suffix]
                if col is not None:
                    g["off"][col], g["size"][col] = m.offset_data, m.size
            if damage:
                damaged[path.name] = damage
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
    index = MediaIndex(shards, extra={"damaged_shards": damaged} if damaged else {})
    if write:
        index.save(root)
    return index

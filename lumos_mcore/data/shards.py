"""Feature shards: webdataset-compatible tar files plus a seekable ``index.json``.

A sample is a group of tar members sharing a key (the webdataset convention: the key is the
member name up to the first dot of its basename)::

    <key>.latent.npy     float16/float32 [C, H, W] or [C, T, H, W] (VAE latents, already scaled)
    <key>.cond.npy       float16/float32 [Lc, Dc] (DINO CLS / patch tokens, T5 tokens)
    <key>.cond_mask.npy  bool [Lc], optional (True = real token; absent = all real)
    <key>.meta.json      dict (key, source size, fps, frame count, caption, ...)

Tar members are stored uncompressed, so ``index.json`` can record the byte offset and size of
every member and a reader can ``pread`` a sample directly instead of streaming the shard; the
same files stay readable by ``webdataset.WebDataset``. Columnar per-shard lists keep the index
compact (a few integers per sample, no per-sample JSON objects).

Shards and the index are written under a temporary name and renamed when complete, so an
interrupted writer never leaves a truncated file under a final name; a dataset is complete
exactly when its ``index.json`` exists.
"""

from __future__ import annotations

import collections
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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

INDEX_FORMAT = "lumos-features"
INDEX_VERSION = 1

LATENT = "latent.npy"
COND = "cond.npy"
COND_MASK = "cond_mask.npy"
META = "meta.json"
# Column order of the per-sample member arrays in ShardInfo / the dataset.
MEMBERS: tuple[str, ...] = (LATENT, COND, COND_MASK, META)
MEMBER_COLUMN = {name: i for i, name in enumerate(MEMBERS)}

STORAGE_DTYPES = ("float16", "float32")


@dataclass
class ShardInfo(TarShard):
    """One shard of the index: member offsets/sizes per sample (-1 where a member is absent)."""

    name: str
    keys: list[str]
    offsets: np.ndarray  # [n, len(MEMBERS)] int64, byte offset of each member's data in the tar
    sizes: np.ndarray  # [n, len(MEMBERS)] int64, member data size in bytes
    latent_shapes: list[list[int] | None]
    cond_shapes: list[list[int] | None]
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            **self._head_json(),
            "members": members_to_json(self.offsets, self.sizes, MEMBER_COLUMN),
            "latent_shape": self.latent_shapes,
            "cond_shape": self.cond_shapes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardInfo:
        n = int(d["num_samples"])
        offsets, sizes = members_from_json(d, MEMBER_COLUMN, n)
        keys = list(d["keys"])
        if len(keys) != n:
            raise ValueError(f"index entry for shard {d['name']}: {len(keys)} keys for {n} samples")
        return cls(
            name=d["name"],
            keys=keys,
            offsets=offsets,
            sizes=sizes,
            latent_shapes=list(d.get("latent_shape") or [None] * n),
            cond_shapes=list(d.get("cond_shape") or [None] * n),
            size_bytes=int(d["size_bytes"]),
        )


@dataclass
class DatasetIndex(TarIndex):
    """Contents of ``index.json``: the shards in order plus dataset-wide shape facts.

    ``num_samples``, ``to_json``, ``save`` and ``load`` come from ``TarIndex`` (shared with the
    media index); this class adds the shape facts and the ``lumos-features`` tag.
    """

    FORMAT = INDEX_FORMAT
    VERSION = INDEX_VERSION
    WRONG_FORMAT = "(format={format!r}, version={version!r})"

    shards: list[ShardInfo]
    storage_dtype: str
    latent_channels: int | None
    latent_rank: int | None  # 3 for images [C, H, W], 4 for video [C, T, H, W]
    cond_dim: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    def _fields_json(self) -> dict[str, Any]:
        return {
            "storage_dtype": self.storage_dtype,
            "latent_channels": self.latent_channels,
            "latent_rank": self.latent_rank,
            "cond_dim": self.cond_dim,
        }

    @classmethod
    def _from_json(cls, d: dict[str, Any]) -> DatasetIndex:
        return cls(
            shards=[ShardInfo.from_json(s) for s in d["shards"]],
            storage_dtype=d["storage_dtype"],
            latent_channels=d.get("latent_channels"),
            latent_rank=d.get("latent_rank"),
            cond_dim=d.get("cond_dim"),
            extra=d.get("extra") or {},
        )


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


class FeatureShardWriter(TarShardWriter):
    """Writes precomputed-feature samples into ``{prefix}-{i:06d}.tar`` shards + ``index.json``.

    Use as a context manager: on normal exit the last shard and the index are finalised; on an
    exception the shard in progress is deleted and no index is written (the completed shards
    remain, but without ``index.json`` the directory is not a dataset). The shard lifecycle is
    ``TarShardWriter``'s (shared with ``MediaShardWriter``); this class checks and encodes the
    feature members and tracks the dataset-wide shape facts.
    """

    _NAME = "FeatureShardWriter"
    _MEMBERS = MEMBERS
    _COLUMNS = ("lat", "cond")

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        samples_per_shard: int = 1000,
        prefix: str = "features",
        storage_dtype: str = "float16",
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        def check_options() -> None:
            if storage_dtype not in STORAGE_DTYPES:
                raise ValueError(f"storage_dtype={storage_dtype!r}: choose one of {STORAGE_DTYPES}")

        super().__init__(
            out_dir,
            samples_per_shard=samples_per_shard,
            prefix=prefix,
            overwrite=overwrite,
            extra=extra,
            check_options=check_options,
        )
        self.storage_dtype = np.dtype(storage_dtype)
        self._latent_channels: int | None = None
        self._latent_rank: int | None = None
        self._cond_dim: int | None = None

    def _storage(self, a: np.ndarray, what: str, key: str) -> np.ndarray:
        if a.dtype.kind not in "fiu":
            raise ValueError(f"sample {key!r}: {what} has non-numeric dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError(f"sample {key!r}: {what} contains NaN/inf")
        with np.errstate(over="ignore"):  # overflow is reported below with the sample key
            out = a.astype(self.storage_dtype)
        if not np.isfinite(out).all():
            raise ValueError(
                f"sample {key!r}: {what} overflows {self.storage_dtype} storage "
                f"(max |x| = {float(np.abs(a).max()):.4g}); use storage_dtype='float32'"
            )
        return out

    def write(
        self,
        latent: Any,
        cond: Any,
        *,
        cond_mask: Any | None = None,
        meta: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> str:
        """Append one sample; returns its key (default: the running sample number)."""
        self._check_open()
        key = self._sample_key(key)
        lat = _to_numpy(latent)
        cnd = _to_numpy(cond)
        if lat.ndim not in (3, 4):
            raise ValueError(
                f"sample {key!r}: latent shape {lat.shape}; expected [C, H, W] or [C, T, H, W]"
            )
        if cnd.ndim != 2 or cnd.shape[0] < 1:
            raise ValueError(f"sample {key!r}: cond shape {cnd.shape}; expected [Lc>=1, Dc]")
        if self._latent_channels is None:
            self._latent_channels, self._latent_rank = int(lat.shape[0]), lat.ndim
            self._cond_dim = int(cnd.shape[1])
        if lat.shape[0] != self._latent_channels or lat.ndim != self._latent_rank:
            raise ValueError(
                f"sample {key!r}: latent shape {lat.shape} but earlier samples have "
                f"{self._latent_channels} channels and rank {self._latent_rank}"
            )
        if cnd.shape[1] != self._cond_dim:
            raise ValueError(
                f"sample {key!r}: cond dim {cnd.shape[1]} but earlier samples have {self._cond_dim}"
            )
        members = {LATENT: self._storage(lat, "latent", key), COND: self._storage(cnd, "cond", key)}
        if cond_mask is not None:
            m = _to_numpy(cond_mask)
            if m.shape != (cnd.shape[0],):
                raise ValueError(
                    f"sample {key!r}: cond_mask shape {m.shape}; expected ({cnd.shape[0]},)"
                )
            if m.dtype != np.bool_:
                if not np.isin(m, (0, 1)).all():
                    raise ValueError(f"sample {key!r}: cond_mask must be boolean")
                m = m.astype(np.bool_)
            if not m.any():
                raise ValueError(f"sample {key!r}: cond_mask has no real token")
            members[COND_MASK] = m
        meta = dict(meta or {})
        meta.setdefault("key", key)

        def encoded():  # lazily, so each member's bytes are made just before it is added
            for name, arr in members.items():
                yield MEMBER_COLUMN[name], f"{key}.{name}", _npy_bytes(arr)
            yield MEMBER_COLUMN[META], f"{key}.{META}", json.dumps(meta, sort_keys=True).encode()

        offsets, sizes = self._write_members(encoded())
        self._append(key, offsets, sizes, lat=list(lat.shape), cond=list(cnd.shape))
        return key

    def _shard_info(self, name: str, cur: dict[str, Any], size_bytes: int) -> ShardInfo:
        return ShardInfo(
            name=name,
            keys=cur["keys"],
            offsets=np.asarray(cur["offsets"], dtype=np.int64),
            sizes=np.asarray(cur["sizes"], dtype=np.int64),
            latent_shapes=cur["lat"],
            cond_shapes=cur["cond"],
            size_bytes=size_bytes,
        )

    def _index(self) -> DatasetIndex:
        return DatasetIndex(
            shards=self._shards,
            storage_dtype=str(self.storage_dtype),
            latent_channels=self._latent_channels,
            latent_rank=self._latent_rank,
            cond_dim=self._cond_dim,
            extra=self.extra,
        )


def _npy_header_shape(f: io.BufferedReader, offset: int) -> tuple[list[int] | None, str | None]:
    """Shape and dtype from an ``.npy`` member header, or (None, None) if unreadable."""
    try:
        f.seek(offset)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)  # header only, no data
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return [int(s) for s in shape], np.dtype(dtype).name
    except Exception:
        return None, None


def _most_common(values: list) -> Any:
    values = [v for v in values if v is not None]
    return collections.Counter(values).most_common(1)[0][0] if values else None


def build_index(
    root: str | os.PathLike, *, pattern: str = "*.tar", write: bool = True
) -> DatasetIndex:
    """Index existing webdataset feature shards (e.g. written by another pipeline).

    Scans the tar headers of ``root/pattern`` (sorted by name) and the ``.npy`` headers for
    shapes; member data is not read. Members other than the four known ones are ignored; a
    sample lacking ``latent.npy`` or ``cond.npy`` is still listed so the reader counts it as bad.
    A truncated tar is indexed up to its last readable header; a shard whose headers end before
    its data does (a corrupt header) is recorded under ``extra["damaged_shards"]`` (the byte
    offset and the bytes that could not be indexed), besides the scan's warning.
    """
    root = Path(root)
    tars = list_shards(root, pattern)
    shards: list[ShardInfo] = []
    dtypes: list[str] = []
    damaged: dict[str, dict[str, int]] = {}
    for path in tars:
        groups: dict[str, list[list[int]]] = {}
        damage: dict[str, int] = {}
        for key, suffix, m in scan_tar(path, damage=damage):  # a truncated tail ends the scan
            if suffix not in MEMBER_COLUMN:
                continue
            g = groups.setdefault(key, [[-1] * len(MEMBERS), [-1] * len(MEMBERS)])
            g[0][MEMBER_COLUMN[suffix]] = m.offset_data
            g[1][MEMBER_COLUMN[suffix]] = m.size
        if damage:
            damaged[path.name] = damage
        if not groups:
            continue
        keys = list(groups)
        offsets = np.asarray([groups[k][0] for k in keys], dtype=np.int64)
        sizes = np.asarray([groups[k][1] for k in keys], dtype=np.int64)
        lat_shapes: list[list[int] | None] = []
        cond_shapes: list[list[int] | None] = []
        with open(path, "rb") as f:
            for i in range(len(keys)):
                for col, out in (
                    (MEMBER_COLUMN[LATENT], lat_shapes),
                    (MEMBER_COLUMN[COND], cond_shapes),
                ):
                    shape, dt = (None, None)
                    if offsets[i, col] >= 0:
                        shape, dt = _npy_header_shape(f, int(offsets[i, col]))
                    out.append(shape)
                    if dt is not None:
                        dtypes.append(dt)
        shards.append(
            ShardInfo(
                name=path.name,
                keys=keys,
                offsets=offsets,
                sizes=sizes,
                latent_shapes=lat_shapes,
                cond_shapes=cond_shapes,
                size_bytes=path.stat().st_size,
            )
        )
    if not shards:
        raise FileNotFoundError(f"{root}: shards matching {pattern!r} hold no samples")
    all_lat = [s for sh in shards for s in sh.latent_shapes]
    all_cond = [s for sh in shards for s in sh.cond_shapes]
    storage = _most_common(dtypes) or "float16"
    index = DatasetIndex(
        shards=shards,
        storage_dtype=storage if storage in STORAGE_DTYPES else "float32",
        latent_channels=_most_common([s[0] if s else None for s in all_lat]),
        latent_rank=_most_common([len(s) if s else None for s in all_lat]),
        cond_dim=_most_common([s[1] if s and len(s) == 2 else None for s in all_cond]),
        extra={"damaged_shards": damaged} if damaged else {},
    )
    if write:
        index.save(root)
    return index

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
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INDEX_NAME = "index.json"
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
_BLOCK = tarfile.BLOCKSIZE


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class ShardInfo:
    """One shard of the index: member offsets/sizes per sample (-1 where a member is absent)."""

    name: str
    keys: list[str]
    offsets: np.ndarray  # [n, len(MEMBERS)] int64, byte offset of each member's data in the tar
    sizes: np.ndarray  # [n, len(MEMBERS)] int64, member data size in bytes
    latent_shapes: list[list[int] | None]
    cond_shapes: list[list[int] | None]
    size_bytes: int

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "size_bytes": self.size_bytes,
            "keys": list(self.keys),
            "members": {
                m: {
                    "offset": self.offsets[:, c].tolist(),
                    "size": self.sizes[:, c].tolist(),
                }
                for m, c in MEMBER_COLUMN.items()
            },
            "latent_shape": self.latent_shapes,
            "cond_shape": self.cond_shapes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardInfo:
        n = int(d["num_samples"])
        offsets = np.full((n, len(MEMBERS)), -1, dtype=np.int64)
        sizes = np.full((n, len(MEMBERS)), -1, dtype=np.int64)
        for m, c in MEMBER_COLUMN.items():
            if m in d["members"]:
                offsets[:, c] = d["members"][m]["offset"]
                sizes[:, c] = d["members"][m]["size"]
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
class DatasetIndex:
    """Contents of ``index.json``: the shards in order plus dataset-wide shape facts."""

    shards: list[ShardInfo]
    storage_dtype: str
    latent_channels: int | None
    latent_rank: int | None  # 3 for images [C, H, W], 4 for video [C, T, H, W]
    cond_dim: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "num_samples": self.num_samples,
            "storage_dtype": self.storage_dtype,
            "latent_channels": self.latent_channels,
            "latent_rank": self.latent_rank,
            "cond_dim": self.cond_dim,
            "extra": self.extra,
            "shards": [s.to_json() for s in self.shards],
        }

    def save(self, root: str | os.PathLike) -> Path:
        path = Path(root) / INDEX_NAME
        _atomic_write_bytes(path, json.dumps(self.to_json(), separators=(",", ":")).encode())
        return path

    @classmethod
    def load(cls, root: str | os.PathLike) -> DatasetIndex:
        path = Path(root) / INDEX_NAME
        with open(path, "rb") as f:
            d = json.load(f)
        if d.get("format") != INDEX_FORMAT or d.get("version") != INDEX_VERSION:
            raise ValueError(
                f"{path}: not a {INDEX_FORMAT} v{INDEX_VERSION} index "
                f"(format={d.get('format')!r}, version={d.get('version')!r})"
            )
        shards = [ShardInfo.from_json(s) for s in d["shards"]]
        index = cls(
            shards=shards,
            storage_dtype=d["storage_dtype"],
            latent_channels=d.get("latent_channels"),
            latent_rank=d.get("latent_rank"),
            cond_dim=d.get("cond_dim"),
            extra=d.get("extra") or {},
        )
        if index.num_samples != d["num_samples"]:
            raise ValueError(
                f"{path}: num_samples={d['num_samples']} but shards hold {index.num_samples}"
            )
        return index


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _check_key(key: str) -> None:
    # webdataset splits the member name at the first dot of the basename; "/" would create
    # directories inside the tar and change the grouping.
    if not key or "." in key or "/" in key or "\\" in key:
        raise ValueError(f"sample key {key!r}: must be non-empty and contain no '.', '/' or '\\'")


class FeatureShardWriter:
    """Writes precomputed-feature samples into ``{prefix}-{i:06d}.tar`` shards + ``index.json``.

    Use as a context manager: on normal exit the last shard and the index are finalised; on an
    exception the shard in progress is deleted and no index is written (the completed shards
    remain, but without ``index.json`` the directory is not a dataset).
    """

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
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={storage_dtype!r}: choose one of {STORAGE_DTYPES}")
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
        self.storage_dtype = np.dtype(storage_dtype)
        self.extra = dict(extra or {})
        self._shards: list[ShardInfo] = []
        self._keys_seen: set[str] = set()
        self._num_written = 0
        self._latent_channels: int | None = None
        self._latent_rank: int | None = None
        self._cond_dim: int | None = None
        # Shard in progress.
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._cur: dict[str, list] | None = None
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
        self._cur = {"name": name, "keys": [], "offsets": [], "sizes": [], "lat": [], "cond": []}

    def _add_member(self, name: str, data: bytes) -> tuple[int, int]:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # byte-reproducible shards
        info.mode = 0o644
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        end = self._tar.offset
        return end - _round_up(len(data), _BLOCK), len(data)

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
        if self._closed:
            raise RuntimeError("FeatureShardWriter is closed")
        key = f"{self._num_written:09d}" if key is None else str(key)
        _check_key(key)
        if key in self._keys_seen:
            raise ValueError(f"sample key {key!r} written twice")
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

        if self._tar is None:
            self._open_shard()
        assert self._cur is not None
        offsets = [-1] * len(MEMBERS)
        sizes = [-1] * len(MEMBERS)
        for name, arr in members.items():
            c = MEMBER_COLUMN[name]
            offsets[c], sizes[c] = self._add_member(f"{key}.{name}", _npy_bytes(arr))
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        offsets[MEMBER_COLUMN[META]], sizes[MEMBER_COLUMN[META]] = self._add_member(
            f"{key}.{META}", meta_bytes
        )
        self._cur["keys"].append(key)
        self._cur["offsets"].append(offsets)
        self._cur["sizes"].append(sizes)
        self._cur["lat"].append(list(lat.shape))
        self._cur["cond"].append(list(cnd.shape))
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
        final = self.out_dir / self._cur["name"]
        os.replace(self._tmp_path, final)
        self._shards.append(
            ShardInfo(
                name=self._cur["name"],
                keys=self._cur["keys"],
                offsets=np.asarray(self._cur["offsets"], dtype=np.int64),
                sizes=np.asarray(self._cur["sizes"], dtype=np.int64),
                latent_shapes=self._cur["lat"],
                cond_shapes=self._cur["cond"],
                size_bytes=size,
            )
        )
        self._tar = self._file = self._tmp_path = self._cur = None

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
        if self._closed:
            raise RuntimeError("FeatureShardWriter is closed")
        if self._tar is not None:
            self._finish_shard()
        if not self._shards:
            self.abort()
            raise ValueError(f"{self.out_dir}: no samples were written; not writing an index")
        index = DatasetIndex(
            shards=self._shards,
            storage_dtype=str(self.storage_dtype),
            latent_channels=self._latent_channels,
            latent_rank=self._latent_rank,
            cond_dim=self._cond_dim,
            extra=self.extra,
        )
        self._closed = True
        return index.save(self.out_dir)

    def __enter__(self) -> FeatureShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


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
    A truncated tar is indexed up to its last readable header.
    """
    root = Path(root)
    tars = sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if not tars:
        raise FileNotFoundError(f"{root}: no shards matching {pattern!r}")
    shards: list[ShardInfo] = []
    dtypes: list[str] = []
    for path in tars:
        groups: dict[str, list[list[int]]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    head, _, base = m.name.rpartition("/")
                    stem, dot, suffix = base.partition(".")
                    if not dot or suffix not in MEMBER_COLUMN:
                        continue
                    key = f"{head}/{stem}" if head else stem
                    g = groups.setdefault(key, [[-1] * len(MEMBERS), [-1] * len(MEMBERS)])
                    g[0][MEMBER_COLUMN[suffix]] = m.offset_data
                    g[1][MEMBER_COLUMN[suffix]] = m.size
        except tarfile.ReadError:
            pass  # truncated or corrupt tail: keep what was indexed; reads report the damage
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
    )
    if write:
        index.save(root)
    return index

"""Read megatron ``dist_checkpointing`` checkpoints tensor by tensor, in one process.

A ``torch_dist`` checkpoint is a PyTorch distributed-checkpoint (DCP) folder: ``.metadata``
lists every tensor by its *global* sharded key with its full shape and the chunks the saving
ranks wrote (TP slices, PP stages), ``__<rank>_<i>.distcp`` hold the bytes. The non-sharded
state (``train_state.model_config``) is a ``common.pt`` beside them up to megatron-core 0.18, and
a ``common_state`` object inside the DCP files from 0.19 on; both are read. DCP assembles a full
tensor from whatever chunks a key was saved in, so the reader needs neither megatron nor
torch.distributed and is independent of the TP / PP / CP / DP layout the checkpoint was written
at.

Homogeneous transformer layers are stored stacked (``decoder.layers.<name>`` with a leading
layer axis); :class:`McoreCheckpointReader` yields them per layer (``decoder.layers.<i>.<name>``).
Chunks that split a key along the layer axis only (pipeline stages, one-rank saves) are read
straight from their byte range, one chunk at a time; keys split across TP ranks are assembled
by DCP one key at a time. Memory therefore holds at most one stacked key, not the model.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lumos_mcore.convert.safetensors_io import TensorSpec

__all__ = ["McoreCheckpointReader", "is_mcore_checkpoint", "resolve_mcore_checkpoint"]

_LAYERS = "decoder.layers."
_PARTIAL = ".partial"
_SKIP_PREFIXES = ("optimizer.", "rng_state")
_EMA = "ema."
_COMMON = "common_state"  # megatron-core >= 0.19: the non-sharded state inside DCP


def is_mcore_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint folder (``metadata.json``) or a root holding ``latest`` / ``iter_*``."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "metadata.json").is_file() or (path / "latest").is_file():
        return True
    return any(p.is_dir() and _PARTIAL not in p.name for p in path.glob("iter_*"))


def resolve_mcore_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder itself, or a root's newest complete one (``latest``, else the
    highest ``iter_*`` folder that is not an unfinished ``*.partial`` save)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    marker = path / "latest"
    if marker.is_file():
        found = path / marker.read_text().strip()
        if (found / "metadata.json").is_file():
            return found
    done = sorted(p for p in path.glob("iter_*") if p.is_dir() and _PARTIAL not in p.name)
    if done and (done[-1] / "metadata.json").is_file():
        return done[-1]
    raise FileNotFoundError(f"{path}: not a megatron checkpoint folder or checkpoint root")


def _load_common(folder: Path, metadata: Any) -> dict[str, Any]:
    """The checkpoint's non-sharded state, from either of megatron-core's two layouts."""
    path = folder / "common.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Written by megatron with plain pickle (e.g. numpy scalars in the data-loader
            # state); megatron loads it the same way. Only open checkpoints you trust.
            return torch.load(path, map_location="cpu", weights_only=False)
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    key = next(
        (
            k
            for k, v in metadata.state_dict_metadata.items()
            if k.startswith(_COMMON + "/") and isinstance(v, BytesStorageMetadata)
        ),
        None,
    )
    if key is None:
        raise FileNotFoundError(
            f"{folder}: neither common.pt nor a '{_COMMON}' object in .metadata "
            "(not a megatron dist_checkpointing save)"
        )
    holder: dict[str, Any] = {key: io.BytesIO()}
    load(holder, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    loaded = holder[key]
    if isinstance(loaded, io.BytesIO):  # DCP may hand back the raw bytes instead of the object
        loaded.seek(0)
        loaded = torch.load(loaded, map_location="cpu", weights_only=False)
    # megatron saves the common state as a one-element list (a ShardedObject's data)
    return loaded[0] if isinstance(loaded, (list, tuple)) else loaded


class McoreCheckpointReader:
    """Stream the model (or EMA) weights of a megatron checkpoint as full per-layer tensors.

    ``specs()`` announces every tensor (megatron global names, per layer) with shape and
    dtype before any data is read; ``tensors()`` yields them in the same order.
    """

    def __init__(self, path: str | os.PathLike, *, ema: bool = False) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = resolve_mcore_checkpoint(path)
        meta = json.loads((self.folder / "metadata.json").read_text())
        backend = meta.get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(
                f"{self.folder}: sharded backend {backend!r}; only 'torch_dist' checkpoints "
                "(megatron-core's default) can be read"
            )
        md = FileSystemReader(str(self.folder)).read_metadata()
        self.common = _load_common(self.folder, md)
        train_state = self.common.get("train_state", {})
        self.model_config: dict[str, Any] | None = train_state.get("model_config")
        self.ema = ema
        self._storage = getattr(md, "storage_data", None)
        stored = {
            k: v
            for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and not k.startswith(_SKIP_PREFIXES)
        }
        if ema:
            self._keys = {k: v for k, v in stored.items() if k.startswith(_EMA)}
            if not self._keys:
                raise ValueError(f"{self.folder}: no EMA weights stored; drop --ema / ema=False")
        else:
            self._keys = {k: v for k, v in stored.items() if not k.startswith(_EMA)}
        self._keys = {k: v for k, v in self._keys.items() if not k.endswith("_extra_state")}
        if not self._keys:
            raise ValueError(f"{self.folder}: no model weights stored")

    def _model_name(self, key: str) -> str:
        return key[len(_EMA) :] if self.ema else key

    @staticmethod
    def _is_stacked(name: str) -> bool:
        rest = name[len(_LAYERS) :] if name.startswith(_LAYERS) else None
        return rest is not None and not rest.split(".", 1)[0].isdigit()

    def specs(self) -> list[TensorSpec]:
        """Every weight as ``TensorSpec`` in megatron's per-layer global naming."""
        out = []
        for key, md in self._keys.items():
            name, shape, dtype = self._model_name(key), tuple(md.size), md.properties.dtype
            if self._is_stacked(name):
                rest = name[len(_LAYERS) :]
                out += [
                    TensorSpec(f"{_LAYERS}{i}.{rest}", shape[1:], dtype) for i in range(shape[0])
                ]
            else:
                out.append(TensorSpec(name, shape, dtype))
        return out

    def _load(self, key: str) -> Tensor:
        """One stored key as a full tensor through DCP's own loader (any chunking, any
        storage transform)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        md = self._keys[key]
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({key: out}, storage_reader=FileSystemReader(str(self.folder)), no_dist=True)
        return out

    def _read_chunk(self, key: str, chunk) -> Tensor | None:
        """One stored chunk straight from its file (None: stored in a way only DCP reads).

        DCP stores each chunk as a ``torch.save`` archive at a byte range of a ``.distcp``
        file; reading that range with ``torch.load`` gives the chunk without DCP's planner
        round trip and without assembling a full tensor (one copy: file -> tensor).
        """
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self._storage.get(MetadataIndex(key, chunk.offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        with open(self.folder / info.relative_path, "rb") as f:
            tensor = torch.load(
                _FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True
            )
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != tuple(chunk.sizes):
            return None
        return tensor

    def _tiling(self, key: str) -> list | None:
        """The stored chunks of a key in order if they tile it along the first axis only
        (whole layers of a stacked key, or the whole tensor), else None."""
        if self._storage is None:
            return None
        md = self._keys[key]
        size = tuple(md.size)
        if not size:
            return None
        chunks = sorted(md.chunks, key=lambda c: tuple(c.offsets))
        start = 0
        for c in chunks:
            if tuple(c.sizes[1:]) != size[1:] or any(c.offsets[1:]) or c.offsets[0] != start:
                return None
            start += c.sizes[0]
        return chunks if start == size[0] else None

    def _pieces(self, key: str) -> Iterator[Tensor]:
        """A stored key as consecutive pieces along its first axis: its chunks read directly
        when they tile it that way, else the whole tensor assembled by DCP (TP-split rows)."""
        chunks = self._tiling(key)
        first = self._read_chunk(key, chunks[0]) if chunks else None
        if first is None:
            yield self._load(key)
            return
        yield first
        for c in chunks[1:]:
            piece = self._read_chunk(key, c)
            if piece is None:
                raise ValueError(
                    f"{self.folder}: chunk at {tuple(c.offsets)} of {key!r} is unreadable"
                )
            yield piece

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, full tensor)`` in ``specs()`` order; one stored key in memory at a time."""
        for key in self._keys:
            name = self._model_name(key)
            if not self._is_stacked(name):
                pieces = list(self._pieces(key))
                yield name, pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                continue
            rest = name[len(_LAYERS) :]
            layer = 0
            for piece in self._pieces(key):
                for t in piece.unbind(0):
                    yield f"{_LAYERS}{layer}.{rest}", t
                    layer += 1


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window ``[offset, offset + length)`` of an open file."""

    def __init__(self, f, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = min(max(base + pos, 0), self._len)
        return self._pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n])
        self._pos += got
        return got

"""Streaming safetensors writing in the diffusers layout, and reading of safetensors folders.

Why not ``safetensors.torch.save_file``: it needs every tensor of a file in memory at once. A
safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte range) and the raw tensor bytes in order. When every tensor's name, shape and dtype is
known up front (a converter knows them from the source's metadata), the header can be written
first and each tensor's bytes appended as it arrives, so writing holds one tensor at a time.

The folder layout is that of ``ModelMixin.save_pretrained``: ``diffusion_pytorch_model.safetensors``
when everything fits in ``max_shard_size`` (diffusers' default ``"10GB"``), else
``diffusion_pytorch_model-00001-of-0000N.safetensors`` files plus
``diffusion_pytorch_model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``),
split like ``huggingface_hub.split_torch_state_dict_into_shards`` except that shards keep
the tensors' order (a tensor larger than the limit closes the current shard and gets its own),
so that they can be written in one pass.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "ShardedSafetensorsWriter",
    "TensorSpec",
    "parse_size",
    "plan_shards",
    "safetensors_files",
]

SAFE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_SHARD_NAME = "diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor announced before its data: name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5e9, ``"2GiB"`` -> 2**31, ``"500MB"``, ``"1024"`` or an int -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"max_shard_size={size!r}: write a byte count like '10GB', '500MB' or '2GiB'"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be positive")
    return value


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str) -> list[list[TensorSpec]]:
    """Split ``specs`` in order into shards of at most ``max_shard_size`` bytes each (a larger
    tensor gets a shard of its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        n = spec.nbytes
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def _header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} has no safetensors name")
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write announced tensors, one at a time and in the announced order, into ``folder``.

    ``write(name, tensor)`` checks the tensor against its announcement (name, shape, dtype) and
    appends its bytes to the current shard; ``close()`` checks that every tensor came and
    writes the index for a sharded model. Memory: one tensor.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        specs: Sequence[TensorSpec],
        *,
        max_shard_size: int | str = "10GB",
        metadata: dict[str, str] | None = None,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"tensors announced twice: {dup[:5]}")
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(specs, max_shard_size)
        n = len(self.shards)
        self.files = [
            SAFE_WEIGHTS_NAME if n == 1 else _SHARD_NAME.format(i=i + 1, n=n) for i in range(n)
        ]
        self.total_size = sum(s.nbytes for s in specs)
        self._order: Iterator[tuple[int, TensorSpec]] = (
            (i, spec) for i, shard in enumerate(self.shards) for spec in shard
        )
        self._shard = -1
        self._file = None
        self._written = 0

    def _open(self, index: int) -> None:
        self._close_file()
        self._shard = index
        self._file = open(self.folder / self.files[index], "wb")  # noqa: SIM115
        self._file.write(_header(self.shards[index], self.metadata))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor`` (which must be the next announced one) to its shard file."""
        try:
            shard, spec = next(self._order)
        except StopIteration:
            raise ValueError(
                f"tensor {name!r} was not announced (all tensors are written)"
            ) from None
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} arrived where "
                f"{spec.name!r} {spec.shape} {spec.dtype} was announced"
            )
        if shard != self._shard:
            while self._shard < shard:  # empty shards only for an empty model
                self._open(self._shard + 1)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._written += 1

    def close(self) -> list[Path]:
        """Finish the last shard and write the index; return the files written."""
        missing = [spec.name for _, spec in self._order]
        if missing:
            raise ValueError(f"{len(missing)} announced tensor(s) never came, e.g. {missing[:5]}")
        while self._shard < len(self.shards) - 1:
            self._open(self._shard + 1)
        self._close_file()
        out = [self.folder / f for f in self.files]
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {
                    spec.name: self.files[i]
                    for i, shard in enumerate(self.shards)
                    for spec in shard
                },
            }
            path = self.folder / SAFE_WEIGHTS_INDEX_NAME
            path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            out.append(path)
        return out

    def abort(self) -> None:
        """Close an open file after an error (the caller removes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a diffusers model folder: the index's shards, or the single file."""
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise FileNotFoundError(
        f"{folder}: no {SAFE_WEIGHTS_NAME} (or {SAFE_WEIGHTS_INDEX_NAME} with its shards)"
        + (f"; found {[p.name for p in found]}" if found else "")
    )

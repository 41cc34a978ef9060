"""Open a checkpoint in any supported format as an announced stream of tensors.

Every source hands out weights in one of the two Lumos layouts — ``"mcore"`` (megatron global
names, per-head fused QKV) or ``"hf"`` (``LumosTransformer2DModel`` / released Lumos names) —
together with the architecture it claims. Conversion between the two is
``hf_adapter.StateDictConverter``; PixArt and the released ``.pth`` are first mapped to ``"hf"``.

Streaming: megatron checkpoints are read one stored key at a time, safetensors folders one
tensor at a time (memory-mapped), released ``.pth`` files are memory-mapped (``torch.load(...,
mmap=True)``, zipfile format) so only touched pages are read. A diffusers PixArt folder is
loaded whole: ``pixart_to_hf`` fuses Q/K/V across tensors and checks the model as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.convert.mcore_reader import McoreCheckpointReader, is_mcore_checkpoint
from lumos_mcore.convert.safetensors_io import DTYPE_NAMES, TensorSpec, safetensors_files
from lumos_mcore.models.dit.hf_adapter import HF_CLASSES, ConversionError

log = logging.getLogger(__name__)

__all__ = [
    "SOURCE_FORMATS",
    "WeightSource",
    "detect_format",
    "model_config_from_dict",
    "open_safetensors_file",
    "open_source",
]

SOURCE_FORMATS = ("mcore", "hf", "pixart-diffusers", "lumos-pth")
PIXART_CLASS = "PixArtTransformer2DModel"
_DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass
class WeightSource:
    """Weights announced by ``specs`` (names in ``layout``) and streamed by ``tensors()``.

    ``model_config`` is the architecture the checkpoint records (inferred for ``.pth``;
    None when a megatron checkpoint has no config). ``config_is_recorded`` tells whether it
    was stored with the weights (then its head count is authoritative).
    """

    layout: str
    specs: list[TensorSpec]
    tensors: Callable[[], Iterator[tuple[str, Tensor]]]
    model_config: ModelConfig | None
    description: str
    config_is_recorded: bool = True


def model_config_from_dict(d: Mapping[str, Any], source: str = "checkpoint") -> ModelConfig:
    """``ModelConfig`` from a stored dict; fields this version does not know are an error."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConversionError(
            f"{source}: model_config has fields {unknown} that this version of ModelConfig "
            "does not know; pass --config with a config for this version"
        )
    return ModelConfig(**dict(d))


def _dict_source(
    sd: dict[str, Tensor], layout: str, cfg: ModelConfig | None, desc: str, recorded: bool
) -> WeightSource:
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    return WeightSource(layout, specs, lambda: iter(sd.items()), cfg, desc, recorded)


# ---------------------------------------------------------------------------------------------
# format detection
# ---------------------------------------------------------------------------------------------
def _diffusers_folder(path: Path) -> Path | None:
    """The folder holding a diffusers ``config.json`` (the path, or its ``transformer/``)."""
    for folder in (path, path / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    return None


def _model_class(config: dict) -> str | None:
    """The config's model class, with diffusers' own remapping: PixArt-α folders written before
    ``PixArtTransformer2DModel`` existed (the released checkpoints) say ``Transformer2DModel``
    with ``norm_type="ada_norm_single"``, and diffusers loads them as PixArt."""
    name = config.get("_class_name")
    if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":
        return PIXART_CLASS
    return name


def _class_name(folder: Path) -> str | None:
    return _model_class(json.loads((folder / "config.json").read_text()))


def detect_format(path: str | os.PathLike) -> str:
    """``mcore`` | ``hf`` | ``pixart-diffusers`` | ``lumos-pth`` for a path, from its contents."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    if path.is_file():
        return "lumos-pth"
    if is_mcore_checkpoint(path):
        return "mcore"
    folder = _diffusers_folder(path)
    if folder is not None:
        name = _class_name(folder)
        if name == PIXART_CLASS:
            return "pixart-diffusers"
        if name in (*HF_CLASSES, None):
            return "hf"
        raise ConversionError(
            f"{folder / 'config.json'}: model class {name!r}; expected "
            f"{', '.join(HF_CLASSES)} or {PIXART_CLASS}"
        )
    raise ConversionError(
        f"{path}: not a megatron checkpoint (metadata.json / latest), a diffusers model folder "
        "(config.json) or a .pth file"
    )


# ---------------------------------------------------------------------------------------------
# the formats
# ---------------------------------------------------------------------------------------------
def _mcore_source(path: Path, ema: bool | None) -> WeightSource:
    """``ema``: True = EMA weights (error if none), False = training weights, None = EMA when
    stored, else training weights."""
    if ema is None:
        try:
            reader = McoreCheckpointReader(path, ema=True)
        except ValueError:
            reader = McoreCheckpointReader(path, ema=False)
    else:
        reader = McoreCheckpointReader(path, ema=ema)
    cfg = None
    if reader.model_config is not None:
        cfg = model_config_from_dict(reader.model_config, str(reader.folder))
    which = "EMA" if reader.ema else "training"
    return WeightSource(
        "mcore",
        reader.specs(),
        reader.tensors,
        cfg,
        f"megatron checkpoint {reader.folder} ({which} weights)",
    )


def _safetensors_specs(path: Path) -> list[TensorSpec]:
    """Tensors of a safetensors file in file order, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out = []
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if entry["dtype"] not in _DTYPES_BY_NAME:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        out.append(TensorSpec(name, tuple(entry["shape"]), _DTYPES_BY_NAME[entry["dtype"]]))
    return out


def _safetensors_stream(files: list[Path], specs: list[list[TensorSpec]]):
    from safetensors import safe_open

    def gen() -> Iterator[tuple[str, Tensor]]:
        for path, file_specs in zip(files, specs):
            with safe_open(str(path), framework="pt") as f:
                for spec in file_specs:
                    yield spec.name, f.get_tensor(spec.name)

    return gen


def _read_folder_weights(folder: Path) -> tuple[list[TensorSpec], Callable]:
    files = safetensors_files(folder)
    per_file = [_safetensors_specs(p) for p in files]
    specs = [s for file_specs in per_file for s in file_specs]
    return specs, _safetensors_stream(files, per_file)


def _hf_source(path: Path) -> WeightSource:
    from lumos_mcore.models.dit.hf_adapter import model_config_from_hf_config

    folder = _diffusers_folder(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: no config.json (not a diffusers model folder)")
    config = json.loads((folder / "config.json").read_text())
    name = _model_class(config)
    if name == PIXART_CLASS:
        raise ConversionError(
            f"{folder}: holds a {PIXART_CLASS}; read it with --src-format pixart-diffusers"
        )
    if name not in (*HF_CLASSES, None):
        raise ConversionError(
            f"{folder}: model class {name!r} is not one of {', '.join(HF_CLASSES)}"
        )
    cfg = model_config_from_hf_config(config)
    specs, stream = _read_folder_weights(folder)
    return WeightSource("hf", specs, stream, cfg, f"HF folder {folder}")


def _pixart_source(path: Path, cond_tokens: int | None) -> WeightSource:
    from lumos_mcore.models.dit.hf_adapter import model_config_from_hf_config
    from lumos_mcore.models.dit.pixart_adapter import pixart_to_hf

    folder = _diffusers_folder(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: no config.json (not a diffusers model folder)")
    config = json.loads((folder / "config.json").read_text())
    if _model_class(config) not in (PIXART_CLASS, None):
        raise ConversionError(
            f"{folder}: model class {config.get('_class_name')!r} is not {PIXART_CLASS}"
        )
    _, stream = _read_folder_weights(folder)
    sd = dict(stream())
    kwargs = {} if cond_tokens is None else {"cond_tokens": cond_tokens}
    hf_sd, hf_cfg = pixart_to_hf(sd, config, **kwargs)
    cfg = model_config_from_hf_config(hf_cfg)
    return _dict_source(hf_sd, "hf", cfg, f"diffusers PixArt folder {folder}", True)


_EMA_CONTAINERS = ("ema", "state_dict_ema", "model_ema")


def _pth_source(path: Path, ema: bool | None, num_heads: int | None) -> WeightSource:
    from lumos_mcore.models.dit.lumos_pth import infer_model_config, unwrap_state_dict

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zipfile) serialization cannot be memory-mapped
        raw = torch.load(path, map_location="cpu", weights_only=True)
    if ema is True and not (isinstance(raw, Mapping) and any(k in raw for k in _EMA_CONTAINERS)):
        raise ConversionError(
            f"{path}: no EMA weights stored ({', '.join(_EMA_CONTAINERS)}); drop --ema"
        )
    if ema is False and isinstance(raw, Mapping):
        has_raw = any(isinstance(raw.get(k), Mapping) for k in ("state_dict", "model", "module"))
        only_ema = [k for k in _EMA_CONTAINERS if isinstance(raw.get(k), Mapping)]
        if only_ema and not has_raw:  # converted all the same: the file's only weights
            log.warning(
                "%s holds only EMA weights (%r), no training weights: converting those "
                "(pass --ema to record them as EMA)",
                path,
                only_ema[0],
            )
    sd = unwrap_state_dict(raw, prefer_ema=ema is not False, source=str(path))
    pos_embed = sd.pop("pos_embed", None)
    try:
        cfg = infer_model_config(sd, num_heads=num_heads, pos_embed=pos_embed)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err}") from None
    return _dict_source(sd, "hf", cfg, f"released Lumos checkpoint {path}", False)


def open_safetensors_file(path: str | os.PathLike, *, num_heads: int | None = None) -> WeightSource:
    """A single ``.safetensors`` file holding a state dict in the released Lumos /
    ``LumosTransformer2DModel`` naming (as a ``.pth`` does), without a ``config.json``.

    The architecture is read off the tensors as for a ``.pth`` (``lumos_pth.infer_model_config``;
    ``num_heads`` as there). Only the header and a stored ``pos_embed`` table are read here; the
    weights stream one tensor at a time (memory-mapped).
    """
    from safetensors import safe_open

    from lumos_mcore.models.dit.lumos_pth import infer_model_config

    path = Path(path)
    specs = _safetensors_specs(path)
    pos_embed = None
    if any(s.name == "pos_embed" for s in specs):
        with safe_open(str(path), framework="pt") as f:
            pos_embed = f.get_tensor("pos_embed")
        specs = [s for s in specs if s.name != "pos_embed"]
    shapes = {s.name: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in specs}
    try:
        cfg = infer_model_config(shapes, num_heads=num_heads, pos_embed=pos_embed)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err}") from None
    stream = _safetensors_stream([path], [specs])
    return WeightSource("hf", specs, stream, cfg, f"safetensors file {path}", False)


def open_source(
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    ema: bool | None = False,
    num_heads: int | None = None,
    cond_tokens: int | None = None,
) -> WeightSource:
    """Open ``path`` (``fmt`` None: detected) as a :class:`WeightSource`.

    ``ema`` (mcore, lumos-pth): True = the EMA weights (error if absent), False = the training
    weights, None = EMA when stored. ``num_heads``: head count for a ``.pth`` (which records
    none; default hidden // 72). ``cond_tokens``: null-caption length for PixArt (default 120).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    fmt = fmt or detect_format(path)
    if fmt == "mcore":
        return _mcore_source(path, ema)
    if fmt == "hf":
        return _hf_source(path)
    if fmt == "pixart-diffusers":
        return _pixart_source(path, cond_tokens)
    if fmt == "lumos-pth":
        return _pth_source(path, ema, num_heads)
    raise ValueError(f"format {fmt!r}: choose one of {', '.join(SOURCE_FORMATS)}")

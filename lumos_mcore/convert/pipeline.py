"""Checkpoint conversion between megatron, Hugging Face (diffusers) and PixArt formats.

``convert_checkpoint`` runs three steps:

1. *plan* — open the source (``sources.open_source``), settle the target architecture (the
   recorded one, or ``--model`` / ``--config``) and push every announced tensor through the
   name / shape map on the meta device. A checkpoint that does not fit fails here, naming the
   tensor and both shapes, before a byte is written;
2. *stream* — read, convert (megatron's per-head QKV / KV interleaving, renames), cast and
   write tensor by tensor; HF / PixArt output goes through ``ShardedSafetensorsWriter``;
3. *commit* — everything is written into a hidden temporary sibling of the destination, which
   is renamed into place only when complete and removed on any error (Ctrl-C included).

megatron output is a weights-only ``dist_checkpointing`` checkpoint written through the
megatron model itself (see ``megatron_io``): global (unsharded) keys, so the checkpoint is
*layout-independent* — it loads at any TP / PP / CP / DP layout (``checkpoint.load=<dst>``),
as training checkpoints saved at one layout resume at another.
``tp`` / ``pp`` / ``cp`` are therefore validated against the model (heads and layers must
divide, the token count must split over CP) and recorded in ``conversion.json``; they do not
change the files. That path needs torch.distributed (started here in one process when absent)
and, because ``dist_checkpointing`` spawns helper processes, a ``__main__`` guard in scripts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec
from lumos_mcore.convert.sources import (
    PIXART_CLASS,
    SOURCE_FORMATS,
    WeightSource,
    model_config_from_dict,
    open_source,
)
from lumos_mcore.durable import fsync_dir, fsync_file, write_durably
from lumos_mcore.models.dit.hf_adapter import (
    ConversionError,
    StateDictConverter,
    check_state_dict,
    hf_class_name,
    hf_config_from_model_config,
)

__all__ = [
    "DEST_FORMATS",
    "SOURCE_FORMATS",
    "convert_checkpoint",
    "convert_stream",
    "head_count",
    "load_model_config",
    "parse_dtype",
    "plan_conversion",
    "read_weights",
    "resolve_model_config",
    "stream_weights",
]

DEST_FORMATS = ("mcore", "hf", "pixart-diffusers")
CONVERSION_RECORD = "conversion.json"
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """``ModelConfig`` from a YAML file: a job config (its ``model:`` section) or the section."""
    import yaml

    with open(path, encoding="utf-8") as f:
        tree = yaml.safe_load(f) or {}
    if not isinstance(tree, dict):
        raise ConversionError(f"{path}: expected a mapping, got {type(tree).__name__}")
    section = tree.get("model", tree) if isinstance(tree.get("model"), dict) else tree
    return model_config_from_dict(section, str(path))


def head_count(
    num_heads: int | None = None,
    model_config: ModelConfig | None = None,
    model_name: str | None = None,
) -> int | None:
    """The head count to read a ``.pth`` with (it records none): ``num_heads`` (``--num-heads``),
    else the config's / registry size's; None = infer (hidden // 72).

    Fused QKV rows are regrouped per head, so a wrong count scrambles the weights silently: an
    explicit ``num_heads`` that disagrees with the given config is refused, naming both.
    """
    implied, where = None, None
    if model_config is not None:
        implied, where = model_config.num_heads_, "the config's model.num_heads"
    elif model_name is not None:
        implied, where = ModelConfig(name=model_name).num_heads_, f"{model_name}'s num_heads"
    if num_heads is not None and implied is not None and num_heads != implied:
        raise ConversionError(
            f"--num-heads {num_heads} disagrees with {where}={implied}; drop --num-heads or "
            "make the two agree"
        )
    return num_heads if num_heads is not None else implied


def resolve_model_config(
    source: WeightSource,
    model_config: ModelConfig | None = None,
    model_name: str | None = None,
) -> ModelConfig:
    """Target architecture: ``model_config`` as given, else the source's config with the
    registry size ``model_name``, else the source's config."""
    if model_config is not None and model_name is not None:
        raise ValueError("give a model name (--model) or a config (--config), not both")
    if model_config is not None:
        return model_config
    if model_name is not None:
        if source.model_config is None:
            return ModelConfig(name=model_name)
        return dataclasses.replace(
            source.model_config, name=model_name, depth=None, hidden_size=None, num_heads=None
        )
    if source.model_config is None:
        raise ConversionError(
            f"{source.description} records no model config; pass --model NAME or --config YAML"
        )
    return source.model_config


def _meta(spec: TensorSpec) -> Tensor:
    return torch.empty(spec.shape, dtype=spec.dtype, device="meta")


def _cast_dtype(spec_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and spec_dtype.is_floating_point else spec_dtype


def plan_conversion(
    source: WeightSource,
    target: ModelConfig,
    layout: str,
    dtype: torch.dtype | None = None,
) -> list[TensorSpec]:
    """The tensors the conversion to ``layout`` ("mcore" | "hf") will produce, in order.

    Checks every source tensor's name and shape against ``target`` without reading data;
    raises ``ConversionError`` naming the tensor and both shapes when one does not fit.
    """
    if source.layout == layout:
        check_state_dict(((s.name, _meta(s)) for s in source.specs), target, layout)
        out = list(source.specs)
    else:
        conv = StateDictConverter(target, source.layout)
        out = []
        for s in source.specs:
            out += [
                TensorSpec(n, tuple(t.shape), s.dtype)
                for n, t in conv.convert_key(s.name, _meta(s))
            ]
        conv.finish()
    if (
        source.model_config is not None
        and source.config_is_recorded
        and source.model_config.num_heads_ != target.num_heads_
    ):
        raise ConversionError(
            f"model.num_heads={target.num_heads_}: {source.description} was trained with "
            f"num_heads={source.model_config.num_heads_}; fused QKV rows are grouped per head, "
            "so the head count of a trained model cannot change"
        )
    return [TensorSpec(s.name, s.shape, _cast_dtype(s.dtype, dtype)) for s in out]


def _prefetch(items: Iterator[Any], depth: int = 8) -> Iterator[Any]:
    """Run ``items`` in a background thread, at most ``depth`` items ahead.

    Reading + converting the next tensors overlaps with writing the current one (file reads,
    tensor copies and file writes all release the GIL). Errors in the producer re-raise in
    the consumer; a consumer that stops early (an error while writing) stops the producer.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((None, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((None, done))
        except BaseException as err:  # handed to the consumer
            q.put((err, None))

    thread = threading.Thread(target=produce, name="checkpoint-reader", daemon=True)
    thread.start()
    try:
        while True:
            err, item = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with suppress(queue.Empty):
                q.get(timeout=0.1)
        thread.join()


def convert_stream(
    source: WeightSource, target: ModelConfig, layout: str, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """The source's tensors converted to ``layout`` and cast to ``dtype``, read ahead in a
    background thread (call :func:`plan_conversion` first: it validates without reading)."""
    return _prefetch(_convert_stream(source, target, layout, dtype))


def _convert_stream(
    source: WeightSource, target: ModelConfig, layout: str, dtype: torch.dtype | None
) -> Iterator[tuple[str, Tensor]]:
    conv = StateDictConverter(target, source.layout) if source.layout != layout else None
    for name, tensor in source.tensors():
        pairs = conv.convert_key(name, tensor) if conv is not None else [(name, tensor)]
        for out_name, out in pairs:
            if dtype is not None and out.is_floating_point() and out.dtype != dtype:
                out = out.to(dtype)
            yield out_name, out
    if conv is not None:
        conv.finish()


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"fp32"`` / ``"fp16"`` (or a torch dtype, or None) -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of bf16, fp32, fp16")
    return _DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# atomic output
# ---------------------------------------------------------------------------------------------
@contextmanager
def atomic_output(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder next to ``dst``; the caller builds ``<stage>/out`` in it.

    On success ``<stage>/out`` replaces ``dst`` by rename; on any exception (KeyboardInterrupt
    and SystemExit included) the staging folder and any parent folders created for ``dst``
    are removed, so nothing of a failed conversion remains.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    created = []
    parent = dst.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".converting", dir=dst.parent))
    try:
        yield stage
        built = stage / "out"
        if not built.exists():
            raise RuntimeError(f"conversion wrote nothing into {built}")
        _swap_into_place(built, dst, stage / "replaced")
        fsync_dir(dst.parent)
        shutil.rmtree(stage, ignore_errors=True)
    except _OldOutputKeptError:
        raise  # the previous output lies in the staging folder: keep it
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


class _OldOutputKeptError(RuntimeError):
    """The swap failed and the previous output could not be moved back (it is kept)."""


def _swap_into_place(built: Path, dst: Path, aside: Path) -> None:
    """Rename ``built`` to ``dst``, moving an existing ``dst`` to ``aside`` first.

    If the second rename fails (or is interrupted), the previous output is moved back to
    ``dst`` before the error propagates, so ``--overwrite`` never loses the old export.
    """
    moved = False
    try:
        if dst.exists() or dst.is_symlink():
            os.replace(dst, aside)
            moved = True
        os.replace(built, dst)
    except BaseException as err:
        if moved and not (dst.exists() or dst.is_symlink()):
            try:
                os.replace(aside, dst)
            except BaseException:
                raise _OldOutputKeptError(
                    f"replacing {dst} failed ({err!r}) and the previous output could not be "
                    f"moved back: it is kept at {aside}; move it to {dst} by hand"
                ) from err
        raise


def _dtype_names(dtypes) -> str:
    names = sorted({str(d).removeprefix("torch.") for d in dtypes})
    return names[0] if len(names) == 1 else ", ".join(names)


def written_dtype(model: torch.nn.Module) -> str:
    """The floating dtype(s) of ``model``'s parameters, as ``conversion.json`` records them."""
    return _dtype_names(p.dtype for p in model.parameters() if p.is_floating_point())


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def _diffusers_config(class_name: str, config: dict[str, Any]) -> str:
    """``config.json`` text as ``ConfigMixin.save_config`` writes it."""
    full = {"_class_name": class_name, "_diffusers_version": version("diffusers"), **config}
    return json.dumps(full, indent=2, sort_keys=True) + "\n"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled
    )


def _write_safetensors_folder(
    folder: Path,
    specs: list[TensorSpec],
    items: Iterator[tuple[str, Tensor]],
    class_name: str,
    config: dict[str, Any],
    max_shard_size: int | str,
    bar,
) -> None:
    folder.mkdir()
    writer = ShardedSafetensorsWriter(folder, specs, max_shard_size=max_shard_size)
    try:
        for name, tensor in items:
            writer.write(name, tensor)
            bar.update(tensor.numel() * tensor.element_size())
        writer.close()
    finally:
        writer.abort()
    write_durably(folder / "config.json", _diffusers_config(class_name, config))
    for index in folder.glob("*.index.json"):  # written by the writer's close()
        fsync_file(index)
    fsync_dir(folder)


def _save_mcore(
    path: Path, items: Iterator[tuple[str, Tensor]], cfg: ModelConfig, bf16: bool, bar
) -> str:
    """Stream megatron-named tensors into a one-process ``LumosDiT`` of ``cfg`` (bf16 or fp32
    parameters) and write it as a weights-only megatron checkpoint at ``path`` (see
    ``megatron_io``); returns the dtype written (for ``conversion.json``). Memory: the model."""
    from lumos_mcore.convert.megatron_io import (
        build_megatron_model,
        one_process,
        save_megatron_checkpoint,
    )

    def counted() -> Iterator[tuple[str, Tensor]]:
        for name, tensor in items:
            yield name, tensor
            bar.update(tensor.numel() * tensor.element_size())

    with one_process(cfg):
        model, _ = build_megatron_model(cfg, counted(), bf16=bf16, for_checkpoint=True)
        save_megatron_checkpoint(path, model, cfg)
    return written_dtype(model)


# ---------------------------------------------------------------------------------------------
# the conversion
# ---------------------------------------------------------------------------------------------
def convert_checkpoint(
    src: str | os.PathLike,
    src_format: str,
    dst: str | os.PathLike,
    dst_format: str,
    *,
    model_config: ModelConfig | str | os.PathLike | None = None,
    model_name: str | None = None,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    dtype: str | torch.dtype | None = None,
    ema: bool = False,
    num_heads: int | None = None,
    max_shard_size: int | str = "10GB",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert the checkpoint at ``src`` into a new ``dst`` and return ``dst``.

    ``model_config`` (a ``ModelConfig`` or a YAML path) / ``model_name`` set the target
    architecture (default: the one the source records; a ``.pth`` records none and is
    inferred). ``dtype`` casts floating tensors (default: as stored; megatron output is bf16
    or fp32, so fp16 is refused and an fp16 source is widened to fp32, as ``conversion.json``
    records). ``ema`` reads the EMA
    weights of a megatron checkpoint / ``.pth`` container. ``num_heads`` overrides the head
    count inferred for a ``.pth``. ``max_shard_size`` splits HF / PixArt weights into
    diffusers shards. ``tp`` / ``pp`` / ``cp``: megatron layout to validate (see the module
    docstring). Raises ``ConversionError`` (naming the tensor and both shapes) when the
    checkpoint does not fit the target; ``dst`` is then left absent.
    """
    from lumos_mcore.config.parallel import ParallelConfig

    if src_format not in SOURCE_FORMATS:
        raise ValueError(f"src_format={src_format!r}: choose one of {', '.join(SOURCE_FORMATS)}")
    if dst_format not in DEST_FORMATS:
        raise ValueError(f"dst_format={dst_format!r}: choose one of {', '.join(DEST_FORMATS)}")
    if dst_format != "mcore" and (tp, pp, cp) != (1, 1, 1):
        raise ValueError(
            f"tp={tp}, pp={pp}, cp={cp}: a parallel layout only applies to --dst-format mcore"
        )
    if ema and src_format not in ("mcore", "lumos-pth"):
        raise ValueError(f"ema=True: a {src_format} folder holds one set of weights; drop --ema")
    dst_path = Path(dst).absolute()
    if dst_path.exists() and not overwrite:
        raise FileExistsError(f"{dst_path} exists; pass --overwrite to replace it")
    if dst_path == Path(src).absolute():
        raise ValueError(f"dst={dst_path} is the source; write to a new path")
    torch_dtype = parse_dtype(dtype)
    if isinstance(model_config, (str, os.PathLike)):
        model_config = load_model_config(model_config)

    if dst_format == "mcore" and torch_dtype == torch.float16:
        raise ValueError(
            f"--dtype {dtype}: megatron checkpoints hold the weights of a bf16 or fp32 model "
            "(LumosDiT has no fp16 mode); pass --dtype bf16 or --dtype fp32, or write fp16 "
            "with --dst-format hf"
        )
    if model_config is not None and model_name is not None:
        raise ValueError("give a model name (--model) or a config (--config), not both")
    heads = head_count(num_heads, model_config, model_name)
    source = open_source(
        src,
        src_format,
        ema=ema,
        num_heads=heads,
        cond_tokens=model_config.cond_tokens if model_config is not None else None,
    )
    target = resolve_model_config(source, model_config, model_name)
    layout = "mcore" if dst_format == "mcore" else "hf"
    if dst_format == "pixart-diffusers":  # refused before a byte is read
        from lumos_mcore.models.dit.pixart_adapter import pixart_config_from_hf_config

        pixart_config_from_hf_config(hf_config_from_model_config(target))
    specs = plan_conversion(source, target, layout, torch_dtype)
    if dst_format == "mcore":
        ParallelConfig(tp=tp, pp=pp, cp=cp).validate(
            tp * pp * cp,
            num_attention_heads=target.num_heads_,
            num_layers=target.depth_,
            seq_len=target.num_tokens,
        )

    total = sum(s.nbytes for s in specs)
    items = convert_stream(source, target, layout, torch_dtype)
    with (
        atomic_output(dst_path, overwrite) as stage,
        closing(items),  # stops the reader thread if writing fails
        _progress(total, f"{src_format} -> {dst_format}", progress) as bar,
    ):
        out = stage / "out"
        if dst_format == "hf":
            config = hf_config_from_model_config(target)
            name = hf_class_name(target)
            _write_safetensors_folder(out, specs, items, name, config, max_shard_size, bar)
        elif dst_format == "pixart-diffusers":
            from lumos_mcore.models.dit.pixart_adapter import hf_to_pixart

            hf_sd = {}
            for name, tensor in items:
                hf_sd[name] = tensor
                bar.update(tensor.numel() * tensor.element_size())
            px_sd, px_config = hf_to_pixart(hf_sd, hf_config_from_model_config(target))
            del hf_sd
            px_specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in px_sd.items()]
            _write_safetensors_folder(
                out,
                px_specs,
                iter(px_sd.items()),
                PIXART_CLASS,
                px_config,
                max_shard_size,
                _progress(0, "", False),
            )
        else:
            bf16 = any(s.dtype == torch.bfloat16 for s in specs)
            written = _save_mcore(out, items, target, bf16, bar)
            record = {
                "source": str(Path(src).absolute()),
                "source_format": src_format,
                "weights": "ema" if ema else "training",
                # what the files hold (an fp16 source is widened to fp32, a mixed one is bf16)
                "dtype": written,
                "source_dtypes": _dtype_names(s.dtype for s in source.specs),
                "layout": {"tp": tp, "pp": pp, "cp": cp},
                "layout_independent": True,
                "note": (
                    "megatron dist_checkpointing stores global (unsharded) keys: this checkpoint "
                    "loads at any TP/PP/CP/DP layout; 'layout' is the one validated at "
                    "conversion time"
                ),
            }
            write_durably(out / CONVERSION_RECORD, json.dumps(record, indent=2) + "\n")
    return dst_path


def stream_weights(
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    layout: str = "hf",
    ema: bool | None = None,
    model_config: ModelConfig | None = None,
    dtype: str | torch.dtype | None = None,
    num_heads: int | None = None,
) -> tuple[ModelConfig, list[TensorSpec], Iterator[tuple[str, Tensor]]]:
    """``(architecture, announced tensors, tensor stream)`` of a checkpoint in any format,
    converted to ``layout`` ("hf": ``LumosTransformer2DModel`` names, "mcore": full megatron
    names); checked against the architecture before anything is read.

    ``ema`` None: EMA weights when the checkpoint stores them. ``num_heads``: the head count
    of a ``.pth`` (default: ``model_config``'s, else hidden // 72); for a source that records
    its architecture it must agree with the recorded one.
    """
    heads = head_count(num_heads, model_config)
    source = open_source(path, fmt, ema=ema, num_heads=heads)
    target = resolve_model_config(source, model_config)
    if heads is not None and target.num_heads_ != heads:
        raise ConversionError(
            f"--num-heads {heads}: {source.description} has num_heads={target.num_heads_}; "
            "drop --num-heads"
        )
    torch_dtype = parse_dtype(dtype)
    specs = plan_conversion(source, target, layout, torch_dtype)
    return target, specs, convert_stream(source, target, layout, torch_dtype)


def read_weights(
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    layout: str = "hf",
    ema: bool | None = None,
    model_config: ModelConfig | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[dict[str, Tensor], ModelConfig]:
    """All weights of a checkpoint in any format as one state dict in ``layout`` + its
    architecture (see :func:`stream_weights`)."""
    target, _, stream = stream_weights(
        path, fmt, layout=layout, ema=ema, model_config=model_config, dtype=dtype
    )
    return dict(stream), target

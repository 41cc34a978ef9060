"""Checkpoint conversion: megatron ``dist_checkpointing`` <-> Hugging Face (diffusers) folders
of ``LumosTransformer2DModel`` (I2I / T2I / NVS) and ``LumosTransformer3DModel`` (I2V) <->
diffusers ``PixArtTransformer2DModel``, plus the released
Lumos ``.pth`` files; streaming, validated against the target architecture, atomic on disk.

Command line: ``python tools/convert_checkpoint.py --help``.
"""

from lumos_mcore.convert.inflate import inflate_i2i_to_i2v
from lumos_mcore.convert.mcore_reader import McoreCheckpointReader, resolve_mcore_checkpoint
from lumos_mcore.convert.pipeline import (
    DEST_FORMATS,
    SOURCE_FORMATS,
    convert_checkpoint,
    convert_stream,
    load_model_config,
    plan_conversion,
    read_weights,
    resolve_model_config,
    stream_weights,
)
from lumos_mcore.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec, parse_size
from lumos_mcore.convert.sources import WeightSource, detect_format, open_source

__all__ = [
    "DEST_FORMATS",
    "SOURCE_FORMATS",
    "McoreCheckpointReader",
    "ShardedSafetensorsWriter",
    "TensorSpec",
    "WeightSource",
    "convert_checkpoint",
    "convert_stream",
    "detect_format",
    "inflate_i2i_to_i2v",
    "load_model_config",
    "open_source",
    "parse_size",
    "plan_conversion",
    "read_weights",
    "resolve_mcore_checkpoint",
    "resolve_model_config",
    "stream_weights",
]

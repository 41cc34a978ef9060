#!/usr/bin/env python
"""Convert Lumos checkpoints between megatron, Hugging Face (diffusers) and PixArt formats.

    python tools/convert_checkpoint.py --src runs/x/checkpoints --src-format mcore \\
        --dst export/lumos-i2i --dst-format hf --ema --dtype bf16

Formats: ``mcore`` (megatron dist_checkpointing folder or checkpoint root, any TP/PP/CP/DP
layout; written layout-independent), ``hf`` (``config.json`` +
``diffusion_pytorch_model.safetensors``, sharded with an index above ``--max-shard-size``; every
variant: I2I / T2I / NVS load with ``LumosTransformer2DModel.from_pretrained``, I2V with
``LumosTransformer3DModel.from_pretrained``, Flag-DiT options included), ``pixart-diffusers``
(diffusers ``PixArtTransformer2DModel`` folders, plain adaLN-single image models only), ``lumos-pth`` (released
``Lumos_I2I.pth`` / ``Lumos_T2I.pth``, read only; the architecture is inferred from the tensors,
the head count as hidden // 72 unless ``--model`` / ``--config`` / ``--num-heads`` say otherwise).

``--i2v-frames N`` inflates an I2I source into the initial checkpoint of an I2V model with N
latent frames (``--dst-format mcore``): the image weights are copied, the new temporal
attention of every block starts with a zero out-projection (so the video model begins as the
image model on every frame).

megatron checkpoints store global (unsharded) keys, so any of them loads at any parallel layout:
``--tp/--pp/--cp`` only validate the layout you intend to train at against the model and record
it in ``conversion.json``. Output appears atomically: nothing is left at ``--dst`` on failure.
Exit status 2 with an ``error:`` line for checkpoints that do not fit the target.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumos_mcore.convert.pipeline import DEST_FORMATS, SOURCE_FORMATS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--src", required=True, help="source checkpoint (folder or .pth file)")
    p.add_argument("--src-format", required=True, choices=SOURCE_FORMATS)
    p.add_argument("--dst", required=True, help="destination folder (must not exist)")
    p.add_argument("--dst-format", required=True, choices=DEST_FORMATS)
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--model", help="target size from the registry, e.g. Lumos-XL/2")
    arch.add_argument("--config", help="YAML with the target model config (job or model section)")
    p.add_argument("--tp", type=int, default=1, help="megatron layout to validate (mcore output)")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32", "fp16"),
        help="cast (default: as stored; fp16 for --dst-format hf only)",
    )
    p.add_argument("--ema", action="store_true", help="convert the EMA weights")
    p.add_argument("--num-heads", type=int, help="head count of a .pth (default hidden // 72)")
    p.add_argument("--max-shard-size", default="10GB", help="HF shard size (default 10GB)")
    p.add_argument(
        "--i2v-frames", type=int, help="inflate an I2I source to an I2V model with N frames"
    )
    p.add_argument(
        "--video-attention",
        default="spatial_temporal",
        choices=("spatial_temporal", "full_3d"),
        help="I2V attention for --i2v-frames",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _inflate(args: argparse.Namespace) -> Path:
    """I2I -> I2V inflation (megatron output only)."""
    from lumos_mcore.convert.inflate import inflate_i2i_to_i2v
    from lumos_mcore.convert.pipeline import load_model_config

    if args.dst_format != "mcore":
        raise ValueError("--i2v-frames writes the initial megatron checkpoint: --dst-format mcore")
    if args.model or args.dtype or (args.tp, args.pp, args.cp) != (1, 1, 1):
        raise ValueError("--i2v-frames takes the architecture of the I2I source (or --config)")
    return inflate_i2i_to_i2v(
        args.src,
        args.dst,
        src_format=args.src_format,
        num_frames=args.i2v_frames,
        video_attention=args.video_attention,
        model_config=load_model_config(args.config) if args.config else None,
        num_heads=args.num_heads,
        ema=args.ema,
        overwrite=args.overwrite,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the partial output is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from lumos_mcore.convert.pipeline import convert_checkpoint
    from lumos_mcore.models.dit.hf_adapter import ConversionError

    t0 = time.perf_counter()
    try:
        if args.i2v_frames is not None:
            dst = _inflate(args)
        else:
            dst = convert_checkpoint(
                args.src,
                args.src_format,
                args.dst,
                args.dst_format,
                model_config=args.config,
                model_name=args.model,
                tp=args.tp,
                pp=args.pp,
                cp=args.cp,
                dtype=args.dtype,
                ema=args.ema,
                num_heads=args.num_heads,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst_format} checkpoint {dst} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

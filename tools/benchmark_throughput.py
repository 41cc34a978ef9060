"""Throughput / MFU benchmark of Lumos train steps at a parallel layout.

Single layout (in this process, on spawned gloo ranks on CPU, or on the ranks of torchrun):
    python tools/benchmark_throughput.py --model Lumos-B/2 --variant i2i --resolution 256 \
        --tp 1 --pp 1 --cp 1 --micro-batch-size 4 --steps 5 --compare diffusers --json out.json
    torchrun --nproc-per-node 8 tools/benchmark_throughput.py --model Lumos-XL/2 --tp 2 --nproc 8
Sweep over sequence lengths and layouts (CSV + JSON + PNG):
    python tools/benchmark_throughput.py --model Lumos-S/2 --sweep --resolutions 128,256,512 \
        --layouts single,dp2,tp2,tp2-sp,pp2 --out-dir docs/benchmarks

Reports step time, samples/s, tokens/s, achieved TFLOP/s from the analytic FLOP count
(``lumos_mcore.perf.flops``), MFU against the GPU's spec peak or, on CPU, against the fp32 matmul
FLOP/s measured in the same run, peak memory per rank and the fraction of step time spent in
torch.distributed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    from lumos_mcore.perf.runner import BenchmarkSpec
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lumos_mcore.perf.runner import BenchmarkSpec

from lumos_mcore.perf.runner import (
    UnsupportedVariantError,
    format_result,
    json_safe,
    run_benchmark,
    spec_dict,
)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default="Lumos-S/2", help="registry name, e.g. Lumos-XL/2")
    m.add_argument("--variant", default="i2i", choices=("i2i", "t2i", "i2v", "nvs"))
    m.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    m.add_argument("--frames", type=int, default=None, help="video frames (i2v)")
    m.add_argument("--cond-tokens", type=int, default=None, help="default: 1 (i2i), 120 (t2i)")
    m.add_argument("--cond-channels", type=int, default=None, help="default: 768 / 4096")
    m.add_argument("--depth", type=int, default=None, help="override the registry depth")
    m.add_argument("--hidden-size", type=int, default=None)
    m.add_argument("--num-heads", type=int, default=None)
    m.add_argument("--adaln", default="zero", choices=("zero", "single"))
    m.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    lay = p.add_argument_group("layout")
    lay.add_argument("--tp", type=int, default=1)
    lay.add_argument("--pp", type=int, default=1)
    lay.add_argument("--cp", type=int, default=1)
    lay.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    lay.add_argument(
        "--nproc", type=int, default=None, help="ranks (default: torchrun's world, else tp*pp*cp)"
    )
    run = p.add_argument_group("measurement")
    run.add_argument("--steps", type=int, default=5, help="measured steps")
    run.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    run.add_argument("--micro-batch-size", type=int, default=2)
    run.add_argument("--num-microbatches", type=int, default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--threads", type=int, default=None, help="CPU threads per rank (default: cores / ranks)"
    )
    run.add_argument("--peak-dtype", default="bf16", choices=("bf16", "fp8"))
    run.add_argument("--peak-tflops", type=float, default=None, help="per-rank peak to use")
    run.add_argument(
        "--probe-seconds", type=float, default=0.2, help="duration of each matmul-peak repeat"
    )
    run.add_argument(
        "--probe-size", type=int, default=2048, help="side of the square matmul-peak GEMM"
    )
    run.add_argument(
        "--compare",
        choices=("diffusers",),
        default=None,
        help="also time diffusers' PixArtTransformer2DModel at equal dims in this run",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", default=None, help="write the result(s) as JSON here")
    out.add_argument("--sweep", action="store_true", help="sweep resolutions x layouts")
    out.add_argument("--resolutions", type=_int_list, default=[128, 256, 512])
    out.add_argument("--layouts", default="single,dp2,tp2,tp2-sp,pp2")
    out.add_argument("--out-dir", default="docs/benchmarks", help="sweep CSV/JSON/PNG folder")
    out.add_argument("--stem", default="sweep", help="file name stem of the sweep outputs")
    return p


def spec_from_args(args: argparse.Namespace) -> BenchmarkSpec:
    return BenchmarkSpec(
        model=args.model,
        variant=args.variant,
        resolution=args.resolution,
        frames=args.frames,
        tp=args.tp,
        pp=args.pp,
        cp=args.cp,
        sequence_parallel=args.sp,
        # Under torchrun every rank of the job takes part unless --nproc says otherwise.
        nproc=args.nproc or (int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None),
        steps=args.steps,
        warmup=args.warmup,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.num_microbatches,
        recompute=args.recompute,
        cond_tokens=args.cond_tokens,
        cond_channels=args.cond_channels,
        depth=args.depth,
        hidden_size=args.hidden_size,
        num_heads=args.num_heads,
        adaln_type=args.adaln,
        seed=args.seed,
        peak_dtype=args.peak_dtype,
        peak_tflops=args.peak_tflops,
        peak_probe_seconds=args.probe_seconds,
        peak_probe_size=args.probe_size,
        compare_diffusers=args.compare == "diffusers",
        threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = spec_from_args(args)
        if args.sweep:
            from lumos_mcore.perf.sweep import run_sweep, write_sweep

            layouts = [s for s in args.layouts.split(",") if s.strip()]
            rows = run_sweep(
                spec, args.resolutions, layouts, lambda r: print(format_result(r), flush=True)
            )
            paths = write_sweep(rows, args.out_dir, args.stem)
            print("wrote " + ", ".join(str(p) for p in paths.values()))
            return 0
        results = run_benchmark([spec])
    except UnsupportedVariantError as err:
        parser.exit(2, f"error: {err}\n")
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if not results:  # a non-reporting rank of a torchrun job
        return 0
    (result,) = results
    print(format_result(result), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"spec": spec_dict(spec), "result": result}
        Path(args.json).write_text(json.dumps(json_safe(payload), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

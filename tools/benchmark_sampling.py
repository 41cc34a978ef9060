#!/usr/bin/env python
"""Time per denoising call of one I2V clip: one process vs one model over TP / CP ranks.

    python tools/benchmark_sampling.py --model Lumos-S/2 --frames 8 --latent-size 32 \\
        --layouts 1,cp2,tp2 --out docs/benchmarks/sampling_cp_cpu.md

Each layout runs in its own group of local processes (gloo on CPU, NCCL with one GPU each on
CUDA), one after the other in this run: ``1`` is the one-process model ``lumos_mcore.sample``
runs with ``backend="megatron"`` (megatron ``LumosDiT`` in one process), ``hf`` the pure-PyTorch
``LumosTransformer3DModel`` the sampler uses by default in one process, ``cpN`` / ``tpN`` /
``tpNcpM`` the ``--tp`` / ``--cp`` model over ``N`` (x ``M``) ranks. Every layout builds a
randomly-initialised model of the same architecture and times ``--repeat`` no-grad forwards of one clip after ``--warmup``,
batch 2 as classifier-free guidance calls it. On CPU the machine's cores are divided among a
layout's ranks, so the ratios say what splitting one clip buys on the same hardware. Reported:
median seconds per call, speedup over ``1``, and on CUDA the peak memory per rank.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_LAYOUT = re.compile(r"^(?:1|hf|(?:tp(\d+))?(?:cp(\d+))?)$")


def parse_layout(text: str) -> tuple[int, int]:
    """``"1"`` / ``"hf"`` -> (1, 1); ``"cp2"`` -> (1, 2); ``"tp2cp4"`` -> (2, 4)."""
    m = _LAYOUT.match(text.strip())
    if not m or not text.strip():
        raise SystemExit(f"--layouts: {text!r} is not 1, hf, tpN, cpM or tpNcpM")
    return int(m.group(1) or 1), int(m.group(2) or 1)


def _model_config(args: argparse.Namespace):
    from lumos_mcore.config.model import ModelConfig

    return ModelConfig(
        name=args.model,
        variant="i2v",
        num_frames=args.frames,
        latent_size=args.latent_size,
        video_attention=args.attention,
    )


def _worker(
    rank: int, world: int, port: int, args: argparse.Namespace, tp: int, cp: int, hf: bool, q
):
    import torch

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    else:
        from lumos_mcore.perf.hardware import cpu_cores

        torch.set_num_threads(max(1, cpu_cores() // world))
    try:
        q.put((rank, _time_layout(args, tp, cp, cuda, hf)))
    except BaseException as err:  # reported to the parent, which names the layout
        q.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        from lumos_mcore.parallel.state import destroy_parallel

        destroy_parallel()


def _build(cfg, tp: int, cp: int, cuda: bool, hf: bool):
    """The layout's model: the HF class (``hf``) or megatron's ``LumosDiT`` over TP x CP."""
    import torch

    from lumos_mcore.convert.megatron_io import (
        _init_one_process,
        build_megatron_model,
        inference_config,
    )

    if hf:
        from lumos_mcore.inference import LumosInferenceModel
        from lumos_mcore.models.dit.hf_adapter import (
            hf_class_name,
            hf_config_from_model_config,
            hf_model_class,
        )

        torch.manual_seed(0)
        config = hf_config_from_model_config(cfg, cond_dropout_prob=0.0)
        model = hf_model_class(hf_class_name(cfg))(**config)
        return LumosInferenceModel(model.to(torch.bfloat16) if cuda else model, cfg)
    _init_one_process(cfg, seed=0, tp=tp, cp=cp)
    model, _ = build_megatron_model(inference_config(cfg), {}, allow_new=True, bf16=cuda, seed=0)
    return model


def _time_layout(args: argparse.Namespace, tp: int, cp: int, cuda: bool, hf: bool = False) -> dict:
    import torch

    cfg = _model_config(args)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = _build(cfg, tp, cp, cuda, hf).to(device).eval()
    g = torch.Generator().manual_seed(1)
    shape = (2, cfg.in_channels, args.frames, args.latent_size, args.latent_size)
    x = torch.randn(shape, generator=g).to(device, dtype)  # [2, C, T, H, W]
    t = torch.full((2, args.frames), 500, device=device)  # [2, T]
    cond = torch.randn(2, cfg.cond_tokens, cfg.cond_channels, generator=g).to(device, dtype)
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.repeat):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(x, t, cond)  # [2, C_out, T, H, W]
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"seconds": statistics.median(times), "peak_gib": peak, "shape": tuple(out.shape)}


def run_layout(args: argparse.Namespace, tp: int, cp: int, hf: bool = False) -> dict:
    import torch
    import torch.multiprocessing as mp

    from lumos_mcore.parallel.state import find_free_port

    world = tp * cp
    if torch.cuda.is_available() and world > torch.cuda.device_count():
        raise SystemExit(f"layout tp{tp}cp{cp} needs {world} GPUs")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, args, tp, cp, hf, q))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=args.timeout) for _ in procs)
    for p in procs:
        p.join()
    bad = {r: v for r, v in results.items() if isinstance(v, str)}
    if bad:
        raise SystemExit(f"layout tp{tp}cp{cp} failed: {bad}")
    # every rank ran the same calls: the slowest rank is the layout's time
    return {
        "seconds": max(v["seconds"] for v in results.values()),
        "peak_gib": results[0]["peak_gib"],
    }


def _markdown(args: argparse.Namespace, rows: list[tuple[str, dict]], device: str) -> str:
    from lumos_mcore.models.common.registry import MODEL_SIZES

    cfg = _model_config(args)
    tokens = args.frames * (args.latent_size // cfg.patch_size) ** 2
    base = rows[0][1]["seconds"]
    lines = [
        f"# Sampling with model parallelism: {args.model} I2V, {tokens} tokens per clip",
        "",
        f"Device: {device}. `python tools/benchmark_sampling.py --model {args.model} --frames "
        f"{args.frames} --latent-size {args.latent_size} --attention {args.attention} "
        f"--layouts {args.layouts}`; one no-grad forward of a guided batch (2 clips), median "
        f"of {args.repeat} after {args.warmup} warm-up calls; all layouts in one run.",
        "",
        "| layout | ranks | s / call | speedup vs 1 | peak GiB / rank |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        tp, cp = parse_layout(name)
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(
            f"| {name} | {tp * cp} | {r['seconds']:.3f} | {base / r['seconds']:.2f}x | {peak} |"
        )
    size = MODEL_SIZES.get(args.model)
    if size is not None:
        lines += ["", f"Model: depth {size.depth}, hidden {size.hidden_size}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[tuple[str, dict]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Lumos-S/2")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--attention", choices=("full_3d", "spatial_temporal"), default="full_3d")
    p.add_argument(
        "--layouts", default="1,hf,cp2,tp2", help="comma-separated: 1, hf, tpN, cpM, tpNcpM"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", help="write the markdown report here")
    args = p.parse_args(argv)
    layouts = [s.strip() for s in args.layouts.split(",")]
    if layouts[0] != "1":
        raise SystemExit("--layouts: start with 1 (the one-process baseline)")
    rows = []
    for name in layouts:
        tp, cp = parse_layout(name)
        rows.append((name, run_layout(args, tp, cp, hf=name == "hf")))
        print(f"{name}: {rows[-1][1]['seconds']:.3f} s / call", flush=True)
    import torch

    from lumos_mcore.perf.hardware import cpu_cores, device_name

    device = device_name() if torch.cuda.is_available() else f"CPU, {cpu_cores()} cores"
    report = _markdown(args, rows, device)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return rows


if __name__ == "__main__":
    main()

"""Per-rank activation memory and step time of Lumos-I2V: CP=1 vs CP=2 vs TP=2+SP, side by side.

    python tools/benchmark_cp_memory.py                        # defaults below, ~10 min on 2 cores
    python tools/benchmark_cp_memory.py --frames 4,8,16 --layouts cp1,cp2,tp2sp,cp2_sel \
        --hidden 384 --heads 6 --depth 4 --json docs/benchmarks/cp_memory.json

Every layout runs the real training path on spawned gloo ranks (CPU) or NCCL (one GPU per
rank): megatron DDP, ``get_forward_backward_func``, ``DiffusionForwardStep`` with first-frame
conditioning, on one I2V micro-batch of ``frames x (latent/2)^2`` tokens. Per rank it reports:

* **activation memory** — the bytes autograd keeps for backward, counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks`` around the forward: every saved tensor's
  storage counted once (deduplicated by storage pointer), the parameters' storages (weights a
  linear layer saves) excluded. This is the
  quantity context parallelism divides; it does not depend on the allocator or the OS;
* **peak RSS increase** — ``VmHWM`` after the step minus ``VmRSS`` before it, with the
  high-water mark reset through ``/proc/self/clear_refs`` (Linux) and glibc told to ``mmap``
  blocks above 128 KiB so freed tensors leave the resident set; it includes transient buffers
  (attention workspaces, gathered K/V, communication buffers) and is noisier; on CUDA the
  ``max_memory_allocated`` increase instead;
* **step time** — forward + backward wall time, the fastest of ``--repeats`` measured steps
  after one warm-up step, the maximum over ranks. Threads per rank = CPU cores / ranks, so
  every layout uses the whole machine; on a shared machine the times are indicative only.

The ratio columns divide by the CP=1 value at the same sequence length; the target for CP=2 is
at most 0.55x the CP=1 activation memory per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = {
    "cp1": dict(world=1, parallel=dict(), model=dict()),
    # activation recompute alone (selective core attention; full, uniform 1 layer / block 2)
    "cp1_sel": dict(world=1, parallel=dict(), model=dict(recompute="selective")),
    "cp1_full": dict(world=1, parallel=dict(), model=dict(recompute="full")),
    "cp1_block": dict(
        world=1,
        parallel=dict(),
        model=dict(recompute="full", recompute_method="block", recompute_num_layers=2),
    ),
    "cp2": dict(world=2, parallel=dict(cp=2), model=dict()),
    "tp2sp": dict(world=2, parallel=dict(tp=2, sequence_parallel=True), model=dict()),
    "cp2_sel": dict(world=2, parallel=dict(cp=2), model=dict(recompute="selective")),
    "cp2_full": dict(world=2, parallel=dict(cp=2), model=dict(recompute="full")),
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rank_main(rank: int, world: int, port: int, args: dict, layout: dict, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    try:
        queue.put((rank, "ok", _measure(args, layout)))
    except BaseException as e:  # report instead of hanging the parent
        import traceback

        queue.put((rank, "error", f"{e}\n{traceback.format_exc()}"))
    finally:
        from lumos_mcore.parallel.state import destroy_parallel

        destroy_parallel()


def _measure(args: dict, layout: dict) -> list[dict]:
    from lumos_mcore.config.parallel import ParallelConfig

    pcfg = ParallelConfig(**layout["parallel"])
    return [_measure_one(args, layout, pcfg, frames) for frames in args["frames"]]


def _measure_one(args: dict, layout: dict, pcfg, frames: int) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lumos_mcore.config.diffusion import DiffusionConfig
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.perf.memory import SavedTensorBytes, estimate_memory
    from lumos_mcore.training.setup import build_model, use_bf16
    from lumos_mcore.training.step import DiffusionForwardStep, with_positions

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mcfg = ModelConfig(
        name="Lumos-S/2",
        variant="i2v",
        num_frames=frames,
        latent_size=args["latent"],
        depth=args["depth"],
        hidden_size=args["hidden"],
        num_heads=args["heads"],
        video_attention=args["attention"],
        cond_tokens=1,
        precision="fp32",
        **layout["model"],
    )
    info = initialize_parallel(
        pcfg,
        num_attention_heads=mcfg.num_heads_,
        num_layers=mcfg.depth_,
        seed=0,
        seq_len=mcfg.num_tokens,
    )
    chunks, _ = build_model(mcfg, pcfg, seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {
        "latent": torch.randn(1, 4, frames, args["latent"], args["latent"], generator=g),
        "cond": torch.randn(1, 1, 768, generator=g),
    }
    fstep = DiffusionForwardStep(
        build_objective(DiffusionConfig()), seed=0, cond_dropout=0.0, device=device
    )
    fwd_bwd = get_forward_backward_func()

    def step(counter: SavedTensorBytes | None) -> tuple[float, int]:
        def forward_step(data_iterator, model):
            if counter is None:
                return fstep(data_iterator, model)
            with counter:
                return fstep(data_iterator, model)

        for chunk in chunks:
            chunk.zero_grad_buffer()
        it = with_positions(
            iter([dict(batch)]),
            start_step=0,
            num_microbatches=1,
            global_batch_size=1,
            dp_rank=0,
            dp_size=1,
        )
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else _rss_kib("VmRSS") * 1024
        _reset_peak()
        t0 = time.perf_counter()
        fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=it,
            model=chunks,
            num_microbatches=1,
            seq_length=mcfg.num_tokens,
            micro_batch_size=1,
            forward_only=False,
        )
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
        return dt, peak - base

    step(None)  # warm-up (allocator, caches)
    torch.distributed.barrier()
    counter = SavedTensorBytes(p for chunk in chunks for p in chunk.parameters())
    dt, peak = step(counter)
    for _ in range(args["repeats"] - 1):  # the machine may be shared: keep the fastest step
        torch.distributed.barrier()
        dt = min(dt, step(None)[0])
    return {
        "frames": frames,
        "tokens": mcfg.num_tokens,
        "rank": info.rank,
        "activation_bytes": counter.total,
        # the analytic count of lumos_mcore.perf.memory for the same layout
        "activation_estimate_bytes": estimate_memory(mcfg, pcfg, bf16=use_bf16(mcfg)).activations,
        "peak_increase_bytes": peak,
        "step_s": dt,
    }


def run_layout(name: str, args: dict) -> list[dict]:
    """Run one layout on its spawned ranks; per sequence length the max over ranks."""
    import torch.multiprocessing as mp

    from lumos_mcore.parallel.state import find_free_port

    layout = LAYOUTS[name]
    world = layout["world"]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = find_free_port()
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    # glibc: serve large blocks by mmap and unmap them on free, so that RSS follows the live
    # tensors (otherwise freed memory stays resident and the peak increase reads near zero).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, args, layout, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, status, payload = queue.get(timeout=args["timeout"])
        if status == "error":
            for p in procs:
                p.kill()
            raise RuntimeError(f"layout {name} rank {rank} failed:\n{payload}")
        results[rank] = payload
    for p in procs:
        p.join(timeout=30)
    merged = []
    for i, frames in enumerate(args["frames"]):
        rows = [results[r][i] for r in range(world)]
        merged.append(
            {
                "layout": name,
                "frames": frames,
                "tokens": rows[0]["tokens"],
                "activation_mib": max(r["activation_bytes"] for r in rows) / 2**20,
                "estimate_mib": max(r["activation_estimate_bytes"] for r in rows) / 2**20,
                "peak_increase_mib": max(r["peak_increase_bytes"] for r in rows) / 2**20,
                "step_s": max(r["step_s"] for r in rows),
            }
        )
    return merged


def format_table(rows: list[dict]) -> str:
    base = {r["tokens"]: r for r in rows if r["layout"] == "cp1"}
    lines = [
        "| layout | frames | tokens | activation MiB/rank | x CP=1 | estimate MiB | "
        "peak RSS +MiB/rank | x CP=1 | step s | x CP=1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["tokens"], list(LAYOUTS).index(r["layout"]))):
        b = base.get(r["tokens"])

        def ratio(key, r=r, b=b):
            return f"{r[key] / b[key]:.2f}" if b and b[key] > 0 else "-"

        lines.append(
            f"| {r['layout']} | {r['frames']} | {r['tokens']} | {r['activation_mib']:.1f} | "
            f"{ratio('activation_mib')} | {r['estimate_mib']:.1f} | "
            f"{r['peak_increase_mib']:.1f} | "
            f"{ratio('peak_increase_mib')} | {r['step_s']:.2f} | {ratio('step_s')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", default="4,8,16", help="latent frames per sample (comma list)")
    ap.add_argument("--latent", type=int, default=32, help="latent size (32 = 256 px)")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument(
        "--attention", default="spatial_temporal", choices=["spatial_temporal", "full_3d"]
    )
    ap.add_argument("--layouts", default="cp1,cp2,tp2sp", help=f"from {','.join(LAYOUTS)}")
    ap.add_argument("--repeats", type=int, default=3, help="measured steps (fastest is kept)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ns = ap.parse_args(argv)
    args = dict(
        frames=[int(f) for f in ns.frames.split(",")],
        latent=ns.latent,
        hidden=ns.hidden,
        heads=ns.heads,
        depth=ns.depth,
        attention=ns.attention,
        timeout=ns.timeout,
        repeats=max(1, ns.repeats),
    )
    names = [n.strip() for n in ns.layouts.split(",")]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")
    rows = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += run_layout(name, args)
    print(
        f"Lumos-I2V ({ns.attention}), depth {ns.depth}, hidden {ns.hidden}, {ns.heads} heads, "
        f"latent {ns.latent}x{ns.latent} per frame, micro-batch 1, fp32, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}"
    )
    print(format_table(rows))
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps({"args": args, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

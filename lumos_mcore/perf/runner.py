"""Throughput benchmark of real Lumos train steps at a given parallel layout.

Each rank builds its model chunks with ``lumos_mcore.training.setup.build_model`` (megatron DDP,
the distributed-optimizer-capable megatron optimizer), and runs warm-up and measured train steps
through megatron's ``get_forward_backward_func`` with ``DiffusionForwardStep`` on synthetic
batches — the code path ``lumos-train`` runs, minus the data loader. Layouts with several ranks
run on spawned gloo processes (one thread each) on CPU, or on the ranks of a ``torchrun`` job.

Step time of a multi-rank step is the slowest rank's (ranks meet at a barrier before each
step). Throughput counts the *global* batch; FLOPs come from :mod:`lumos_mcore.perf.flops`.
"""

from __future__ import annotations

import math
import os
import pickle
import queue
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import torch

from lumos_mcore.perf.flops import DiTShape, count_flops, count_model_flops, pixart_shape
from lumos_mcore.perf.hardware import (
    CommTimer,
    MemorySampler,
    PeakSpec,
    cpu_cores,
    device_name,
    gpu_peak,
    measure_matmul_flops,
)

__all__ = [
    "BenchmarkSpec",
    "UnsupportedVariantError",
    "format_result",
    "model_config_for",
    "run_benchmark",
    "run_specs_on_this_rank",
]

# Condition tokens x channels each variant is trained with (DESIGN.md §1).
VARIANT_COND = {"i2i": (1, 768), "t2i": (120, 4096), "i2v": (1, 768), "nvs": (1, 768)}
VAE_DOWNSAMPLE = 8  # SD-VAE: 256 px -> 32 x 32 latents
DEFAULT_FRAMES = 16  # I2V: the paper's 16 frames


class StepTime(NamedTuple):
    """Wall-clock and process CPU seconds of one train step's two phases.

    CPU time counts only while this process runs, so on a shared machine it is far less
    disturbed by other jobs than wall time (with one thread per rank it is the compute time).
    """

    fwd_bwd: float
    optimizer: float
    fwd_bwd_cpu: float
    optimizer_cpu: float


class UnsupportedVariantError(ValueError):
    """The requested model variant does not exist in this build."""


@dataclass
class BenchmarkSpec:
    """One benchmark configuration (model, input size, layout, measurement)."""

    model: str = "Lumos-S/2"
    variant: str = "i2i"
    resolution: int = 256  # pixels; latents are resolution / 8
    frames: int | None = None  # video variants
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    nproc: int | None = None  # None: tp * pp * cp (one data-parallel replica)
    steps: int = 5
    warmup: int = 2
    micro_batch_size: int = 2
    num_microbatches: int | None = None  # None: 1, or 2 * pp with pipeline parallelism
    recompute: str = "none"
    cond_tokens: int | None = None  # None: the variant's (1 DINO CLS token, 120 T5 tokens)
    cond_channels: int | None = None
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    adaln_type: str = "zero"
    seed: int = 0
    peak_dtype: str = "bf16"  # GPU spec peak to compare against: bf16 or fp8
    peak_tflops: float | None = None  # explicit per-rank peak (overrides spec / measurement)
    peak_probe_seconds: float = 0.2  # per repeat of the matmul probe (CPU peak measurement)
    peak_probe_size: int = 2048  # side of the square GEMM of the matmul probe
    compare_diffusers: bool = False
    threads: int | None = None  # CPU threads per rank (None: cores / ranks on this machine)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "steps", "micro_batch_size", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"--warmup={self.warmup}: must be >= 0")
        if self.resolution % VAE_DOWNSAMPLE:
            raise ValueError(
                f"--resolution={self.resolution}: must be a multiple of {VAE_DOWNSAMPLE} "
                "(VAE downsampling)"
            )
        if self.variant not in VARIANT_COND:
            raise ValueError(f"--variant={self.variant!r}: choose one of {', '.join(VARIANT_COND)}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("--sp needs --tp > 1 (sequence parallelism splits over TP ranks)")
        mp = self.tp * self.pp * self.cp
        if self.world_size % mp:
            raise ValueError(
                f"--nproc={self.world_size}: must be a multiple of tp*pp*cp={mp} "
                f"(tp={self.tp}, pp={self.pp}, cp={self.cp})"
            )
        if self.compare_diffusers and self.variant in ("i2v", "nvs"):
            raise ValueError(
                f"--compare diffusers: PixArtTransformer2DModel is an image model; it has no "
                f"counterpart of --variant {self.variant}"
            )
        if self.peak_dtype not in ("bf16", "fp8"):
            raise ValueError(f"--peak-dtype={self.peak_dtype!r}: choose bf16 or fp8")

    @property
    def world_size(self) -> int:
        return self.nproc or self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def microbatches(self) -> int:
        if self.num_microbatches is not None:
            return self.num_microbatches
        return 2 * self.pp if self.pp > 1 else 1

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.microbatches * self.dp

    @property
    def layout(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        return f"tp{self.tp}{sp}-pp{self.pp}-cp{self.cp}-dp{self.dp}"


def model_config_for(spec: BenchmarkSpec):
    """The ``ModelConfig`` a spec describes; refuses variants this build does not have."""
    from lumos_mcore.config.model import ModelConfig

    tokens, channels = VARIANT_COND[spec.variant]
    kwargs: dict[str, Any] = dict(
        name=spec.model,
        variant=spec.variant,
        latent_size=spec.resolution // VAE_DOWNSAMPLE,
        cond_tokens=spec.cond_tokens or tokens,
        cond_channels=spec.cond_channels or channels,
        adaln_type=spec.adaln_type,
        recompute=spec.recompute,
        depth=spec.depth,
        hidden_size=spec.hidden_size,
        num_heads=spec.num_heads,
    )
    if spec.variant == "i2v":
        kwargs["num_frames"] = spec.frames or DEFAULT_FRAMES
    elif spec.frames not in (None, 1):
        raise ValueError(f"--frames={spec.frames}: only --variant i2v has frames")
    try:
        return ModelConfig(**kwargs)
    except TypeError as err:  # a ModelConfig without video / NVS fields
        raise UnsupportedVariantError(
            f"--variant {spec.variant}: this build's ModelConfig has no field for it ({err}); "
            f"the '{spec.variant}' model variant is not available"
        ) from None
    except ValueError as err:
        if spec.variant in ("i2v", "nvs") and str(err).startswith("model.variant="):
            raise UnsupportedVariantError(
                f"--variant {spec.variant}: the model variant '{spec.variant}' is not available "
                f"in this build (ModelConfig: {err}); benchmark i2i or t2i"
            ) from None
        raise


def _tokens(spec: BenchmarkSpec, mcfg) -> int:
    """Tokens per sample (all frames of a video)."""
    return mcfg.num_tokens


def _flop_count(spec: BenchmarkSpec, mcfg):
    return count_model_flops(mcfg, recompute=spec.recompute)


# ---- synthetic data ---------------------------------------------------------------------------


def _synthetic_batches(spec: BenchmarkSpec, mcfg, dp_rank: int) -> Iterator[dict]:
    """Endless micro-batches of random latents / conditions with global sample positions."""
    g = torch.Generator().manual_seed(spec.seed + 1000 * dp_rank)
    mb, lat = spec.micro_batch_size, mcfg.latent_size
    shape: tuple[int, ...] = (mb, mcfg.in_channels, lat, lat)
    if mcfg.variant == "i2v":
        shape = (mb, mcfg.in_channels, mcfg.num_frames, lat, lat)
    batch = {
        "latent": torch.randn(shape, generator=g),  # [B, C, (T,) H, W]
        "cond": torch.nn.functional.normalize(
            torch.randn(mb, mcfg.cond_tokens, mcfg.cond_channels, generator=g), dim=-1
        ),  # [B, Lc, Cc]
    }
    if mcfg.variant == "nvs":
        batch["input_latent"] = torch.randn(shape, generator=g)  # [B, C, H, W]
        batch["camera"] = torch.randn(mb, mcfg.camera_dim, generator=g)  # [B, 12]
    if mcfg.use_size_conditioning:
        px = float(spec.resolution)
        batch["resolution"] = torch.tensor([[px, px]]).repeat(mb, 1)  # [B, 2]
        batch["aspect_ratio"] = torch.ones(mb, 1)  # [B, 1]
    k = 0
    while True:
        start = (k * spec.dp + dp_rank) * mb
        yield {**batch, "position": torch.arange(start, start + mb)}
        k += 1


# ---- one rank ---------------------------------------------------------------------------------


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _probe_shapes(spec: BenchmarkSpec, mcfg) -> list[tuple[int, int, int]]:
    """A large square GEMM and the model's own MLP GEMM ([B*L, D] @ [D, 4D])."""
    d, n = mcfg.hidden_size_, spec.peak_probe_size
    rows = max(256, min(spec.micro_batch_size * _tokens(spec, mcfg), 8192))
    return [(n, n, n), (rows, d, int(mcfg.mlp_ratio * d))]


def _probe(spec: BenchmarkSpec, mcfg, *, quick: bool = False) -> dict[str, float]:
    """Matmul TFLOP/s of this rank now (``quick``: the model GEMM only, one short repeat)."""
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = _probe_shapes(spec, mcfg)
    if quick:
        shapes = shapes[1:]
    _, measured = measure_matmul_flops(
        shapes,
        dtype=dtype,
        device=device,
        repeats=1 if quick else 5,
        min_time=spec.peak_probe_seconds / (2 if quick else 1),
    )
    return {k: v / 1e12 for k, v in measured.items()}


def _spec_peak(spec: BenchmarkSpec) -> PeakSpec | None:
    """Per-rank MFU denominator that is not measured: explicit, else the GPU's spec sheet."""
    if spec.peak_tflops:
        return PeakSpec(spec.peak_tflops, "given (--peak-tflops)")
    if torch.cuda.is_available():
        return gpu_peak(torch.cuda.get_device_name(), spec.peak_dtype)
    return None


def _run_one(spec: BenchmarkSpec) -> dict[str, Any]:
    """Benchmark ``spec`` on this rank (process group already started); rank-local results."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lumos_mcore.config.diffusion import DiffusionConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.config.train import OptimConfig
    from lumos_mcore.diffusion.objective import build_objective
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.setup import (
        build_model,
        build_optimizer,
        select_kernels,
        use_bf16,
    )
    from lumos_mcore.training.step import DiffusionForwardStep

    mcfg = model_config_for(spec)
    pcfg = ParallelConfig(
        tp=spec.tp, pp=spec.pp, cp=spec.cp, sequence_parallel=spec.sequence_parallel
    )
    tokens = _tokens(spec, mcfg)
    info = initialize_parallel(
        pcfg,
        num_attention_heads=mcfg.num_heads_,
        num_layers=mcfg.depth_,
        seed=spec.seed,
        seq_len=tokens,
    )
    chunks, _ = build_model(mcfg, pcfg, seed=spec.seed)
    select_kernels(mcfg, pcfg, spec.micro_batch_size)  # CUDA: Triton or torch, as in training
    optimizer, _ = build_optimizer(
        chunks,
        OptimConfig(warmup_steps=0),
        bf16=use_bf16(mcfg),
        use_distributed_optimizer=False,
        total_steps=spec.warmup + spec.steps,
    )
    forward_step = DiffusionForwardStep(
        build_objective(DiffusionConfig()), seed=spec.seed, cond_dropout=0.1, device=_device()
    )
    batches = _synthetic_batches(spec, mcfg, info.dp_rank)
    fwd_bwd = get_forward_backward_func()

    def step() -> StepTime:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        t0, c0 = time.perf_counter(), time.process_time()
        fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=chunks,
            num_microbatches=spec.microbatches,
            seq_length=tokens,
            micro_batch_size=spec.micro_batch_size,
            forward_only=False,
        )
        _sync()
        t1, c1 = time.perf_counter(), time.process_time()
        optimizer.step()
        _sync()
        return StepTime(t1 - t0, time.perf_counter() - t1, c1 - c0, time.process_time() - c1)

    for _ in range(spec.warmup):
        step()
    dist.barrier()
    probes = [_probe(spec, mcfg)]
    paired: list[float] = []  # matmul TFLOP/s measured right before each step
    fwd_bwd_times, opt_times, cpu_times = [], [], []
    comm = CommTimer()
    with MemorySampler() as mem:
        for _ in range(spec.steps):
            dist.barrier()
            # A short probe before every step: the CPU of a shared machine changes speed over
            # seconds, so each step is also compared with what a GEMM achieved just before it.
            quick = _probe(spec, mcfg, quick=True)
            paired.append(max(quick.values()))
            probes.append(quick)
            dist.barrier()
            with comm.active():
                st = step()
            mem.sample()
            fwd_bwd_times.append(st.fwd_bwd)
            opt_times.append(st.optimizer)
            cpu_times.append(st.fwd_bwd_cpu + st.optimizer_cpu)
    dist.barrier()
    probes.append(_probe(spec, mcfg))
    peak = _spec_peak(spec)
    if peak is None:
        kind = "bf16" if torch.cuda.is_available() else "fp32"
        best = max(v for p in probes for v in p.values())
        peak = PeakSpec(best, f"measured {kind} matmul")
    step_seconds = sum(fwd_bwd_times) + sum(opt_times)
    return {
        "rank": dist.get_rank(),
        "fwd_bwd_s": fwd_bwd_times,
        "optimizer_s": opt_times,
        "cpu_s": cpu_times,
        "comm_fraction": comm.seconds / step_seconds if step_seconds > 0 else 0.0,
        "comm_calls_per_step": comm.calls / spec.steps,
        "peak_memory_gib": mem.peak_gib,
        "memory_kind": mem.kind,
        "peak_tflops": peak.tflops,
        "peak_source": peak.source,
        "matmul_tflops": {"before": probes[0], "after": probes[-1]},
        "matmul_tflops_paired": paired,
        "threads": torch.get_num_threads(),
        "params_local": sum(p.numel() for c in chunks for p in c.parameters()),
        "chunks": chunks,
        "optimizer": optimizer,
        "step_fn": step,
    }


def _summary(spec: BenchmarkSpec, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the ranks' measurements into one report (run on any rank / the parent)."""
    mcfg = model_config_for(spec)
    tokens = _tokens(spec, mcfg)
    flops = _flop_count(spec, mcfg)
    fb = [max(r["fwd_bwd_s"][i] for r in ranks) for i in range(spec.steps)]
    opt = [max(r["optimizer_s"][i] for r in ranks) for i in range(spec.steps)]
    step = [a + b for a, b in zip(fb, opt)]
    cpu = [max(r["cpu_s"][i] for r in ranks) for i in range(spec.steps)]
    t = statistics.median(step)
    model_flops = flops.model_train * spec.global_batch
    hw_flops = flops.hardware_train * spec.global_batch
    peak_total = sum(r["peak_tflops"] for r in ranks)
    matmul_total = sum(
        max(v for probe in r["matmul_tflops"].values() for v in probe.values()) for r in ranks
    )
    achieved = model_flops / t / 1e12
    # Per step: achieved / (sum over ranks of the matmul speed measured just before the step).
    paired = [
        model_flops / step[i] / 1e12 / sum(r["matmul_tflops_paired"][i] for r in ranks)
        for i in range(spec.steps)
    ]
    return {
        "model": spec.model,
        "variant": spec.variant,
        "resolution": spec.resolution,
        "frames": getattr(mcfg, "num_frames", 1),
        "layout": spec.layout,
        "world_size": spec.world_size,
        "device": device_name(),
        "load_average": os.getloadavg(),
        "precision": "bf16" if torch.cuda.is_available() else "fp32",
        "recompute": spec.recompute,
        "hidden_size": mcfg.hidden_size_,
        "depth": mcfg.depth_,
        "num_heads": mcfg.num_heads_,
        "tokens_per_sample": tokens,
        "cond_tokens": mcfg.cond_tokens,
        "micro_batch_size": spec.micro_batch_size,
        "num_microbatches": spec.microbatches,
        "global_batch": spec.global_batch,
        "steps": spec.steps,
        "warmup": spec.warmup,
        "step_time_s": t,
        "step_time_s_all": step,
        "step_time_s_min": min(step),
        "step_cpu_s": statistics.median(cpu),
        "fwd_bwd_time_s": statistics.median(fb),
        "optimizer_time_s": statistics.median(opt),
        "samples_per_s": spec.global_batch / t,
        "tokens_per_s": spec.global_batch * tokens / t,
        "flops_per_sample": flops.as_dict(),
        "model_tflop_per_step": model_flops / 1e12,
        "achieved_tflops": achieved,
        "hardware_tflops": hw_flops / t / 1e12,
        "peak_tflops_total": peak_total,
        "peak_source": ranks[0]["peak_source"],
        "mfu": achieved / peak_total,
        "mfu_paired": statistics.median(paired),
        "mfu_paired_all": paired,
        "achieved_over_matmul": achieved / matmul_total,
        "hfu": hw_flops / t / 1e12 / peak_total,
        "matmul_tflops_per_rank": [r["matmul_tflops"] for r in ranks],
        "threads_per_rank": ranks[0]["threads"],
        "peak_memory_gib_per_rank": [r["peak_memory_gib"] for r in ranks],
        "memory_kind": ranks[0]["memory_kind"],
        "comm_fraction_per_rank": [r["comm_fraction"] for r in ranks],
        "comm_fraction": statistics.fmean(r["comm_fraction"] for r in ranks),
        "params_per_rank": [r["params_local"] for r in ranks],
    }


# ---- diffusers reference ------------------------------------------------------------------------


def build_pixart(mcfg) -> torch.nn.Module:
    """diffusers' ``PixArtTransformer2DModel`` with the dimensions of ``mcfg``."""
    from diffusers import PixArtTransformer2DModel

    d, heads = mcfg.hidden_size_, mcfg.num_heads_
    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=d // heads,
        in_channels=mcfg.in_channels,
        out_channels=mcfg.out_channels,
        num_layers=mcfg.depth_,
        cross_attention_dim=d,
        caption_channels=mcfg.cond_channels,
        sample_size=mcfg.latent_size,
        patch_size=mcfg.patch_size,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=mcfg.norm_eps,
        use_additional_conditions=False,
    )


def _pixart_step_fn(spec: BenchmarkSpec, mcfg) -> Callable[[], StepTime]:
    """A plain-PyTorch train step of PixArt at equal dims: fwd + bwd (MSE on the noise), then
    gradient clipping and AdamW (what ``optim.clip_grad`` and the megatron optimizer do)."""
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(spec.seed)
    model = build_pixart(mcfg).to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03)
    g = torch.Generator().manual_seed(spec.seed)
    b = spec.micro_batch_size * spec.microbatches
    lat = mcfg.latent_size
    x = torch.randn(b, mcfg.in_channels, lat, lat, generator=g).to(device, dtype)
    cond = torch.randn(b, mcfg.cond_tokens, mcfg.cond_channels, generator=g).to(device, dtype)
    noise = torch.randn(x.shape, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)

    def step() -> StepTime:
        opt.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(
            x,
            encoder_hidden_states=cond,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample  # [B, C_out, H, W]
        loss = torch.nn.functional.mse_loss(out[:, : mcfg.in_channels].float(), noise.float())
        loss.backward()
        _sync()
        t1, c1 = time.perf_counter(), time.process_time()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as optim.clip_grad does
        opt.step()
        _sync()
        return StepTime(t1 - t0, time.perf_counter() - t1, c1 - c0, time.process_time() - c1)

    return step


def _compare(
    spec: BenchmarkSpec, ours: Callable[[], StepTime] | None, ours_summary: dict
) -> dict[str, Any]:
    """Time PixArt at equal dims; interleaved with our step when ``ours`` is given (1 process).

    Interleaving (ours, theirs, ours, ...) exposes both to the same machine state, which matters
    on shared CPUs whose speed drifts over seconds. Ratios are medians of the per-pair ratios.
    """
    mcfg = model_config_for(spec)
    theirs = _pixart_step_fn(spec, mcfg)
    for _ in range(max(1, spec.warmup)):
        theirs()
    mine: list[StepTime] = []
    other: list[StepTime] = []
    for _ in range(spec.steps):
        if ours is not None:
            mine.append(ours())
        other.append(theirs())
    if ours is None:  # multi-rank run: compare with what the ranks measured
        mine = [
            StepTime(
                ours_summary["fwd_bwd_time_s"],
                ours_summary["optimizer_time_s"],
                ours_summary["step_cpu_s"],
                0.0,
            )
        ]
    tokens = ours_summary["tokens_per_sample"]
    pix_flops = count_flops(pixart_shape(DiTShape.from_model_config(mcfg)), tokens)
    batch = spec.micro_batch_size * spec.microbatches
    med = statistics.median

    def ratio(key) -> float:
        if ours is None:
            return key(mine[0]) / med([key(o) for o in other])
        return med([key(a) / key(b) for a, b in zip(mine, other)])

    def fwd_bwd(s: StepTime) -> float:
        return s.fwd_bwd

    def step(s: StepTime) -> float:
        return s.fwd_bwd + s.optimizer

    def step_cpu(s: StepTime) -> float:
        return s.fwd_bwd_cpu + s.optimizer_cpu

    their_step = med([step(o) for o in other])
    return {
        "reference": "diffusers.PixArtTransformer2DModel",
        "interleaved": ours is not None,
        "batch": batch,
        "ours_fwd_bwd_s": med([fwd_bwd(m) for m in mine]),
        "ours_step_s": med([step(m) for m in mine]),
        "ours_step_cpu_s": med([step_cpu(m) for m in mine]),
        "diffusers_fwd_bwd_s": med([fwd_bwd(o) for o in other]),
        "diffusers_step_s": their_step,
        "diffusers_step_cpu_s": med([step_cpu(o) for o in other]),
        "ratio_fwd_bwd": ratio(fwd_bwd),
        "ratio_step": ratio(step),
        "ratio_step_cpu": ratio(step_cpu),
        "ours_step_s_all": [step(m) for m in mine],
        "diffusers_step_s_all": [step(o) for o in other],
        "diffusers_model_tflop_per_step": pix_flops.model_train * batch / 1e12,
        "diffusers_achieved_tflops": pix_flops.model_train * batch / their_step / 1e12,
    }


# ---- process management -------------------------------------------------------------------------


def run_specs_on_this_rank(specs: list[BenchmarkSpec]) -> list[dict[str, Any]] | None:
    """Run every spec on this rank of an already-launched job (torchrun or spawned).

    Returns the summaries on rank 0 (``None`` elsewhere). With one rank and
    ``compare_diffusers``, the PixArt reference runs interleaved with our steps.
    """
    import torch.distributed as dist

    from lumos_mcore.parallel.state import init_distributed

    init_distributed()
    threads = {s.threads for s in specs if s.threads}
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(max(threads))
    out = []
    for spec in specs:
        local = _run_one(spec)
        step_fn = local.pop("step_fn")
        gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        light = {k: v for k, v in local.items() if k not in ("chunks", "optimizer")}
        dist.all_gather_object(gathered, light)
        summary = _summary(spec, gathered)
        if spec.compare_diffusers and dist.get_world_size() == 1:
            summary["compare"] = _compare(spec, step_fn, summary)
        del local, step_fn
        out.append(summary)
    return out if dist.get_rank() == 0 else None


def _spawned_rank(rank: int, world: int, specs: list[BenchmarkSpec], results, env) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        payload = ("ok", pickle.dumps(run_specs_on_this_rank(specs)))
    except BaseException:
        payload = ("error", traceback.format_exc())
    finally:
        try:
            from lumos_mcore.parallel.state import destroy_parallel

            destroy_parallel()
        except Exception:
            pass
    results.put((rank, *payload))


def _spawn(specs: list[BenchmarkSpec], world: int, timeout: float) -> list[dict[str, Any]]:
    """Run ``specs`` on ``world`` spawned gloo ranks; return rank 0's summaries."""
    import torch.multiprocessing as mp

    from lumos_mcore.parallel.state import find_free_port

    threads = specs[0].threads or max(1, cpu_cores() // world)
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(find_free_port()),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    saved = {k: os.environ.get(k) for k in env}
    procs = []
    try:
        os.environ.update(env)  # spawned children read it before torch starts its thread pool
        for rank in range(world):
            p = ctx.Process(target=_spawned_rank, args=(rank, world, specs, results, env))
            p.start()
            procs.append(p)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"benchmark ranks did not finish within {timeout:.0f}s")
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(
                        f"a benchmark rank died with exit code {dead[0].exitcode}"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(f"benchmark rank {rank} failed:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return outputs[0]


def _in_this_process(specs: list[BenchmarkSpec]) -> list[dict[str, Any]]:
    """One rank in this process; what it started (process group, parallel state, rendezvous
    variables, thread count) is undone afterwards, so a caller's process is left as it was."""
    import torch.distributed as dist

    from lumos_mcore.parallel.state import destroy_parallel

    started = not dist.is_initialized()
    saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    threads = torch.get_num_threads()
    try:
        return run_specs_on_this_rank(specs) or []
    finally:
        if started:
            destroy_parallel()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        torch.set_num_threads(threads)


def run_benchmark(specs: list[BenchmarkSpec], *, timeout: float = 3600.0) -> list[dict[str, Any]]:
    """Run specs sharing one world size; returns one summary per spec (on the reporting rank).

    Inside a torchrun job every rank runs them; otherwise one spec list runs in this process
    (one rank) or on spawned gloo ranks (several, CPU only).
    """
    worlds = {s.world_size for s in specs}
    if len(worlds) != 1:
        raise ValueError(f"specs of one run must share a world size, got {sorted(worlds)}")
    world = worlds.pop()
    for spec in specs:
        model_config_for(spec)  # refuse unsupported variants before starting processes
    launched = int(os.environ.get("WORLD_SIZE", "0"))
    if launched:
        if launched != world:
            raise ValueError(f"--nproc={world} but the job has WORLD_SIZE={launched}")
        return run_specs_on_this_rank(specs) or []
    if world == 1:
        return _in_this_process(specs)
    if torch.cuda.is_available():
        raise ValueError(
            f"--nproc={world} on CUDA: launch with torchrun --nproc-per-node {world} instead"
        )
    summaries = _spawn(specs, world, timeout)
    for spec, summary in zip(specs, summaries):
        if spec.compare_diffusers:
            summary["compare"] = _compare(spec, None, summary)
    return summaries


def format_result(r: dict[str, Any]) -> str:
    """A few human-readable lines for one summary."""
    mem = ", ".join(f"{m:.2f}" for m in r["peak_memory_gib_per_rank"])
    lines = [
        f"{r['model']} {r['variant']} {r['resolution']}px ({r['tokens_per_sample']} tokens) "
        f"{r['layout']} on {r['device']}, {r['precision']}, global batch {r['global_batch']}",
        f"  step {r['step_time_s'] * 1e3:.1f} ms (fwd+bwd {r['fwd_bwd_time_s'] * 1e3:.1f}, "
        f"optimizer {r['optimizer_time_s'] * 1e3:.1f}) | {r['samples_per_s']:.2f} samples/s | "
        f"{r['tokens_per_s']:.0f} tokens/s",
        f"  {r['achieved_tflops'] * 1e3:.1f} GFLOP/s achieved (model FLOPs "
        f"{r['model_tflop_per_step'] * 1e3:.1f} GFLOP/step) | peak "
        f"{r['peak_tflops_total'] * 1e3:.1f} GFLOP/s ({r['peak_source']}) | "
        f"MFU {r['mfu']:.3f} (vs the matmul right before each step: {r['mfu_paired']:.3f}) | "
        f"HFU {r['hfu']:.3f}",
        f"  peak memory/rank [{mem}] GiB ({r['memory_kind']}) | communication "
        f"{r['comm_fraction'] * 100:.1f}% of step time",
    ]
    c = r.get("compare")
    if c:
        lines.append(
            f"  vs {c['reference']} (batch {c['batch']}, "
            f"{'interleaved' if c['interleaved'] else 'after'}): fwd+bwd "
            f"{c['ours_fwd_bwd_s'] * 1e3:.1f} vs {c['diffusers_fwd_bwd_s'] * 1e3:.1f} ms "
            f"(ratio {c['ratio_fwd_bwd']:.3f}); full step {c['ours_step_s'] * 1e3:.1f} vs "
            f"{c['diffusers_step_s'] * 1e3:.1f} ms (ratio {c['ratio_step']:.3f}); process CPU "
            f"time per step ratio {c['ratio_step_cpu']:.3f}"
        )
    return "\n".join(lines)


def json_safe(obj: Any) -> Any:
    """Summaries with NaN/inf replaced by None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def spec_dict(spec: BenchmarkSpec) -> dict[str, Any]:
    """The spec as plain data (for reports)."""
    return asdict(spec)


def with_layout(spec: BenchmarkSpec, **layout: Any) -> BenchmarkSpec:
    """A copy of ``spec`` at another layout / size."""
    return replace(spec, **layout)

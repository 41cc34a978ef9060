#!/usr/bin/env python
"""GPU throughput of the Lumos DiT block stack, written up as a markdown report.

Times forward + backward of the transformer blocks (``TransformerBlock`` of ``DiTLayer``) on
synthetic ``[s, b, h]`` inputs -- the part of a Lumos step whose cost grows with the token count
-- for the variants the engine can run on one GPU:

- layer spec: ``local`` (megatron linears) or ``te`` (TransformerEngine linears + fused attention)
- attention: SDPA, flash-attn (``lumos_mcore.ops.FlashAttnCoreAttention``), TE fused attention
- attention layout: ``full_3d`` (one self-attention over all tokens) or, at 16K tokens,
  ``spatial_temporal`` (16 frames x 1024 tokens: per-frame self-attention + a temporal
  self-attention per block, the layout of ``examples/recipes/lumos_i2v_xl2_16f_512.yaml``)
- precision: bf16, FP8 (TE ``tensorwise`` current scaling with bf16 first/last layers, or
  ``delayed`` scaling)
- the Triton kernels of ``lumos_mcore.ops`` (norm + adaLN modulate, gated residual) forced on,
  against their PyTorch references (each op's own timings: the autoselect table)
- full activation recompute (needed for 64K tokens per sample)

at 4K / 16K / 64K tokens per sample for Lumos-XL/2 (28 x 1152, 16 heads x 72) with the I2V
condition (one DINO token), and bf16 vs FP8 for a 2B-parameter, 2048-wide configuration at 4K
and 16K tokens.

FLOPs are counted by ``lumos_mcore.perf.flops.count_flops`` as the trainer counts them
(DESIGN.md section 4), for the blocks only: per layer forward ``24 L D^2`` (QKV + out-proj ``8 L
D^2``, MLP ``16 L D^2``) ``+ 4 L^2 D`` (full 3-D self-attention; spatial + temporal: ``4 L S D +
4 L T D`` plus ``8 L D^2`` for the temporal projections, ``S`` tokens per frame, ``T`` frames)
``+ 6 D^2`` (cross-attention of the one condition token, as executed) ``+ 12 D^2`` (adaLN);
training = 3 x forward (model FLOPs, used for MFU) and 4 x forward with full recompute (hardware
FLOPs, reported as HFU). Peaks: ``lumos_mcore.perf.hardware``'s dense spec table for the GPU's
name (``--peak-bf16/--peak-fp8`` override it; a GPU not in the table gets MFU "n/a"). Rows that
fail (out of memory, missing support) are reported with the error instead of a number; parts
whose package is missing are listed as skipped.

The report and the JSON are rewritten after every row (and on SIGTERM), so a run cut short
keeps what it measured; ``--budget-s`` counts from the script's start and starts no row whose
expected time would overrun it, running the rows the targets are read from first.

Usage: ``python tools/benchmark_gpu.py [--out docs/benchmarks/gpu_<date>.md] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

T_START = time.monotonic()  # --budget-s counts from here: torch / megatron imports included

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SIZES = {
    # name: (depth, hidden, heads) -- Lumos-XL/2 and a 2B-parameter, 2048-wide configuration
    "XL": (28, 1152, 16),
    "2B": (22, 2048, 16),
}
COND_TOKENS = 1  # I2V: the DINO CLS feature of the first frame
# attention layout -> frames per sample (spatial_temporal: the 16-frame I2V recipe)
LAYOUT_FRAMES = {"full_3d": 1, "spatial_temporal": 16}
RECIPE_TOKENS = 16384  # lumos_i2v_xl2_16f_512.yaml: 16 frames x 32 x 32 latent tokens
FP8_TOKENS = (16384, 4096)  # the 2B FP8 target: the verdict at 16K, 4K reported too

# --budget-s: a row starts only if its expected time fits what is left
FIRST_ROW_S = 60.0  # no row finished yet: a 16K row's build, warm-up and steps, generously
ROW_RESERVE_S = 5.0  # report writing, allocator release
ROW_SAFETY = 1.5  # on the step time scaled from the largest finished row
KERNELS_S = 30.0  # the Triton fused-op timings (kernel compilation included)


@dataclass(frozen=True)
class Variant:
    """One way of running the block stack."""

    spec: str  # local | te
    attention: str  # sdpa | flash | te
    precision: str = "bf16"  # bf16 | fp8-tensorwise | fp8-delayed
    fused: bool = False  # Triton norm+modulate / gated residual through lumos_mcore.ops

    @property
    def label(self) -> str:
        ops = " + fused ops" if self.fused else ""
        return f"{self.spec} / {self.attention} / {self.precision}{ops}"

    @property
    def fp8(self) -> bool:
        return self.precision.startswith("fp8")


@dataclass
class Row:
    size: str
    tokens: int
    variant: Variant
    recompute: bool
    layers_timed: int
    depth: int
    layout: str = "full_3d"  # full_3d | spatial_temporal
    steps: int = 6  # timed steps, after ``warmup`` untimed ones
    warmup: int = 2
    status: str = "pending"  # ok | out of memory (...) | error: ... | not run (...)
    ms: float | None = None
    ms_spread: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    hfu: float | None = None
    peak_mem_gb: float | None = None  # torch.cuda.max_memory_allocated (OOM: reached before)
    peak_reserved_gb: float | None = None  # torch.cuda.max_memory_reserved
    est_mem_gb: float | None = None  # lumos_mcore.perf.memory's count for the timed stack
    est_train_gb: float | None = None  # ... for a whole train step (optimizer state included)
    build_s: float | None = None
    wall_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        rc = ", recompute" if self.recompute else ""
        return f"{self.size} {self.tokens} tokens {self.layout} {self.variant.label}{rc}"

    @property
    def quick(self) -> bool:
        """Fewer layers timed than the model has (``--quick`` / ``--layers``): time scaled,
        memory not the model's."""
        return self.layers_timed != self.depth


class ContextLostError(RuntimeError):
    """A sticky CUDA error (illegal address, device-side assert): every later CUDA call fails."""


class Interrupted(BaseException):
    """SIGTERM (``timeout``, a scheduler): stop, write what was measured, exit. A
    BaseException, so that a row's ``except Exception`` does not report it as the row's error."""


def _on_signal(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "installed"))


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformer_engine": _version("transformer_engine"),
        "flash_attn": _version("flash_attn"),
        # FA3 wheels name their package flash_attn_3; older builds ship only the top-level module
        "flash_attn_3 (FA3)": _version("flash_attn_3") or _version("flash_attn_interface"),
        "megatron_core": _version("megatron.core"),
        "nvidia_dali": _version("nvidia.dali"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            capability=f"{props.major}.{props.minor}",
            memory_gb=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
            cudnn=str(torch.backends.cudnn.version()),
        )
    return env


def resolve_peaks(gpu: str | None, bf16: float | None = None, fp8: float | None = None) -> dict:
    """MFU denominators by precision (``PeakSpec`` or None): ``--peak-*`` when given, else
    ``perf.hardware``'s dense spec table for the GPU's name, else None -- MFU "n/a", since a
    wrong denominator (another GPU's peak) reads as a measurement."""
    from lumos_mcore.perf.hardware import PeakSpec, gpu_peak

    out = {}
    for dtype, given in (("bf16", bf16), ("fp8", fp8)):
        if given:
            out[dtype] = PeakSpec(float(given), f"given: --peak-{dtype}")
        else:
            out[dtype] = gpu_peak(gpu, dtype) if gpu else None
    return out


def flops_fwd_per_layer(tokens: int, hidden: int, cond: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one full-3-D DiT block for one sample (DESIGN.md section 4)."""
    L, D, Lc = tokens, hidden, cond
    linear = 8 * L * D * D + 4 * mlp_ratio * L * D * D
    self_attn = 4 * L * L * D
    cross = 4 * L * D * D + 4 * L * Lc * D + 4 * Lc * D * D
    if Lc == 1:
        # One unmasked condition token runs as proj(V(cond)) (models/dit/cross_attention.py):
        # K/V and out-projection of one row -- count what is executed, as perf.flops does.
        cross = 4 * D * D + 2 * D * D
    adaln = 12 * D * D
    return linear + self_attn + cross + adaln


def row_flops(row: Row) -> tuple[float, float]:
    """(model, hardware) FLOPs of one step of the whole ``depth``-layer stack for one sample,
    from ``perf.flops.count_flops`` with the row's frames and attention layout, as the trainer
    counts them: model = 3 x the blocks' forward, hardware adds the recomputed forward."""
    from lumos_mcore.perf.flops import DiTShape, count_flops

    _, hidden, heads = SIZES[row.size]
    shape = DiTShape(depth=row.depth, hidden_size=hidden, num_heads=heads, cond_tokens=COND_TOKENS)
    count = count_flops(
        shape,
        row.tokens,
        frames=LAYOUT_FRAMES[row.layout],
        attention="spatial_temporal" if row.layout == "spatial_temporal" else "full",
        recompute="full" if row.recompute else "none",
        single_token_cross=True,
    )
    fwd = count.blocks_forward  # embedders and final layer are not in the timed region
    return 3 * fwd, (4 if row.recompute else 3) * fwd


def frame_grid(tokens: int, frames: int) -> tuple[int, int]:
    """Token grid ``(h, w)`` of one frame: square when it can be, else one row."""
    per_frame = tokens // frames
    side = math.isqrt(per_frame)
    return (side, side) if side * side == per_frame else (1, per_frame)


# ---------------------------------------------------------------------------------------------
# Building the block stack
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def kernel_mode(variant: Variant) -> Iterator[None]:
    """``DiTLayer`` calls ``lumos_mcore.ops`` for norm + modulate and the gated residuals; a
    ``fused`` row forces their Triton kernels, every other row the PyTorch references, so the
    two rows of a pair differ only in that (``LUMOS_KERNELS``, restored afterwards).

    An ``sdpa`` row also sets ``LUMOS_FLASH_ATTN=sdpa``: on CUDA the local spec's SDPA core
    attention routes through ``ops.flash_attention``, which would pick flash-attn wherever it is
    installed and make the sdpa row a second flash row."""
    from lumos_mcore.ops import dispatch, flash_attention

    flash = {flash_attention.ENV: "sdpa"} if variant.attention == "sdpa" else {}
    with _env({dispatch.ENV: "triton" if variant.fused else "torch", **flash}):
        flash_attention.flash_attn_backend.cache_clear()
        try:
            yield
        finally:
            flash_attention.flash_attn_backend.cache_clear()


@contextlib.contextmanager
def _kernels_env(mode: str) -> Iterator[None]:
    from lumos_mcore.ops.dispatch import ENV

    with _env({ENV: mode}):
        yield


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables, restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_spec(variant: Variant, layout: str = "full_3d"):
    from megatron.core.transformer.enums import AttnMaskType

    from lumos_mcore.models.dit.layer_spec import get_dit_layer_local_spec, get_dit_layer_te_spec

    video = "spatial_temporal" if layout == "spatial_temporal" else None
    if video and variant.attention == "flash":
        raise ValueError("FlashAttnCoreAttention has no spatial / temporal token patterns")
    build = get_dit_layer_te_spec if variant.spec == "te" else get_dit_layer_local_spec
    spec = copy.deepcopy(build(video=video))
    sub = spec.submodules
    # One condition token, nothing to pad: no cross-attention mask.
    sub.cross_attention.params = {
        **sub.cross_attention.params,
        "attn_mask_type": AttnMaskType.no_mask,
    }
    if variant.attention == "flash":
        from lumos_mcore.ops.flash_attention import FlashAttnCoreAttention

        sub.self_attention.submodules.core_attention = FlashAttnCoreAttention
        sub.cross_attention.submodules.core_attention = FlashAttnCoreAttention
    if variant.fp8:
        # K/V of one condition token: rows = batch, too few for FP8 tensor cores.
        from lumos_mcore.ops.te_fp8 import without_fp8

        kv = sub.cross_attention.submodules.linear_kv
        sub.cross_attention.submodules.linear_kv = without_fp8(kv)
    return spec


def model_config(row: Row, depth: int, **kw):
    """The ``ModelConfig`` of a row's stack (``depth`` layers): the I2V video settings for the
    spatial + temporal layout, one adaLN row per sample as the benchmark feeds it."""
    from lumos_mcore.config.model import ModelConfig

    _, hidden, heads = SIZES[row.size]
    video = {}
    if row.layout == "spatial_temporal":
        video = dict(
            variant="i2v",
            num_frames=LAYOUT_FRAMES[row.layout],
            video_attention="spatial_temporal",
            first_frame_condition=False,
        )
    return ModelConfig(
        name="Lumos-XL/2",
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        cond_tokens=COND_TOKENS,
        spec=row.variant.spec,
        precision="bf16",
        **video,
        **kw,
    )


def build_block(row: Row, device: str = "cuda"):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from lumos_mcore.models.dit.model import build_transformer_config
    from lumos_mcore.ops.te_fp8 import fp8_config_overrides

    mcfg = model_config(
        row,
        row.layers_timed,
        recompute="full" if row.recompute else "none",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    extra = {}
    if row.variant.fp8:
        recipe = row.variant.precision.split("-", 1)[1]
        extra = fp8_config_overrides(recipe, bf16_layers_at_ends=0 if recipe == "delayed" else 1)
    config = build_transformer_config(mcfg, bf16=True, **extra)
    # initialise on the GPU: 28 x 2048-wide layers
    config.use_cpu_initialization = torch.device(device).type == "cpu"
    torch.manual_seed(0)
    spec = build_spec(row.variant, row.layout)
    block = TransformerBlock(config, spec, post_layer_norm=False).to(device)
    with torch.no_grad():  # adaLN / cross / temporal projections start at zero: make them work
        for p in block.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return block, config


def block_inputs(row: Row, device: str = "cuda") -> tuple[dict, torch.Tensor]:
    """Keyword arguments of the block's forward and the output gradient, as the model passes
    them: ``x [s, 1, h]``, one adaLN row ``c [1, 1, h]``, the condition token ``[1, 1, h]``;
    the spatial + temporal layout also gets its ``SequenceLayout`` (frames x h x w) with a
    temporal position table bound."""
    from lumos_mcore.models.dit.layout import Segment, SequenceLayout

    _, hidden, _ = SIZES[row.size]
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    x = randn(row.tokens, 1, hidden).requires_grad_()  # [s, b, h]
    kwargs = dict(
        hidden_states=x,
        attention_mask=randn(1, 1, hidden),  # adaLN conditioning [1, b, h]
        context=randn(COND_TOKENS, 1, hidden),  # [Lc, b, h]
    )
    if row.layout == "spatial_temporal":
        frames = LAYOUT_FRAMES[row.layout]
        layout = SequenceLayout([Segment(frames, *frame_grid(row.tokens, frames))]).to(device)
        kwargs["packed_seq_params"] = layout.bind(temporal_pos=randn(row.tokens, 1, hidden))
    return kwargs, randn(row.tokens, 1, hidden)  # grad [s, b, h]


def time_block(block, row: Row) -> tuple[float, float]:
    """Median and spread (ms) of ``row.steps`` forward + backward steps after ``row.warmup``;
    no optimizer step, gradients land in plain ``.grad``."""
    kwargs, grad = block_inputs(row, "cuda")
    x = kwargs["hidden_states"]

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(**kwargs)
        out.backward(grad)

    for _ in range(row.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(row.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    spread = (max(times) - min(times)) if len(times) > 1 else 0.0
    return statistics.median(times), spread


def estimate_block_gib(row: Row) -> float:
    """What ``lumos_mcore.perf.memory`` predicts ``max_memory_allocated`` of the timed stack to
    be: bf16 weights and grads, the activations autograd keeps (one ``[s, b, h]`` input per
    layer plus one re-run layer under full recompute), the input / output-grad tensors and one
    layer's backward gradients. Library workspaces are not counted; the column next to the
    measured peak is the estimate's check on a GPU."""
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.perf.memory import layer_activation_terms, param_count

    _, hidden, _ = SIZES[row.size]
    fp8 = row.variant.precision.split("-", 1)[1] if row.variant.fp8 else None
    mcfg = model_config(row, max(row.layers_timed, 3), fp8=fp8)
    par = ParallelConfig()
    kernels = "triton" if row.variant.fused else "torch"
    terms = layer_activation_terms(mcfg, par, act_bytes=2, kernels=kernels, tokens=row.tokens)
    layer = sum(terms.values())
    io = 2 * row.tokens * hidden * 2  # x and the output gradient, bf16
    if row.recompute:
        acts = row.layers_timed * row.tokens * hidden * 2 + layer
    else:
        acts = row.layers_timed * layer
    weights = param_count(mcfg, par).per_layer * row.layers_timed * (2 + 2)  # bf16 + bf16 grad
    mlp = int(hidden * mcfg.mlp_ratio)
    backward = row.tokens * (2 * mlp + 3 * hidden) * 2
    return (weights + acts + io + backward) / 2**30


def estimate_train_gib(row: Row) -> float:
    """``perf.memory``'s peak of a whole train step of the full model at the row's tokens:
    fp32 grads, Adam state, fp32 master weights and EMA on top of the timed stack's memory,
    embedders and final layer (one GPU, no distributed optimizer) -- what the measured peak,
    which has no optimizer, leaves out."""
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.perf.memory import estimate_memory

    fp8 = row.variant.precision.split("-", 1)[1] if row.variant.fp8 else None
    mcfg = model_config(
        row,
        row.depth,
        fp8=fp8,
        recompute="full" if row.recompute else "none",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    kernels = "triton" if row.variant.fused else "torch"
    est = estimate_memory(mcfg, ParallelConfig(), kernels=kernels, tokens=row.tokens)
    return est.total / 2**30


def release_cuda() -> str | None:
    """Free a row's cached blocks. Returns None, or the error when the CUDA context is lost:
    after a sticky error (illegal address, device-side assert) every CUDA call raises, so no
    later row can run -- the caller stops and writes the report instead of crashing."""
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def _memory_peaks(row: Row) -> None:
    with contextlib.suppress(Exception):  # host-side counters; unreadable only with no context
        row.peak_mem_gb = torch.cuda.max_memory_allocated() / 2**30
        row.peak_reserved_gb = torch.cuda.max_memory_reserved() / 2**30


def run_row(row: Row, peaks: dict) -> Row:
    """Time one row and fill its numbers; a failing row gets the error as its status. Raises
    ``ContextLostError`` (after recording the row) when the failure left the CUDA context unusable."""
    t0 = time.monotonic()
    try:
        row.est_mem_gb, row.est_train_gb = estimate_block_gib(row), estimate_train_gib(row)
    except Exception as exc:
        row.notes.append(f"memory estimate failed: {type(exc).__name__}: {_first_line(exc)}")
    lost = release_cuda()
    if lost is not None:
        row.status = f"not run (CUDA context lost: {lost})"
        raise ContextLostError(lost)
    torch.cuda.reset_peak_memory_stats()
    block = None
    failed = False
    try:
        with kernel_mode(row.variant):
            block, _ = build_block(row)
            torch.cuda.synchronize()
            row.build_s = time.monotonic() - t0
            ms, spread = time_block(block, row)
    except torch.cuda.OutOfMemoryError as exc:
        row.status = f"out of memory ({_first_line(exc, 120)})"
        failed = True
    except Exception as exc:  # report the failure instead of aborting the whole benchmark
        row.status = f"error: {type(exc).__name__}: {_first_line(exc)}"
        traceback.print_exc()
        failed = True
    finally:
        # the exception (and the tensors its frames hold) is gone once its handler ended
        block = None
        _memory_peaks(row)
        lost = release_cuda()
        row.wall_s = time.monotonic() - t0
    if lost is not None:
        if not failed:
            row.status = f"error: CUDA context lost after the row: {lost}"
        raise ContextLostError(lost)
    if failed:
        return row
    row.status = "ok"
    scale = row.depth / row.layers_timed  # whole-model time when fewer layers were timed
    row.ms = ms * scale
    row.ms_spread = spread * scale
    model_flops, hw_flops = row_flops(row)
    sec = row.ms / 1e3
    row.tokens_per_s = row.tokens / sec
    row.tflops = model_flops / sec / 1e12
    peak = peaks.get("fp8" if row.variant.fp8 else "bf16")
    if peak is not None:
        row.mfu = row.tflops / peak.tflops
        row.hfu = hw_flops / sec / 1e12 / peak.tflops
    if row.quick:
        row.notes.append(f"timed {row.layers_timed} of {row.depth} layers, scaled")
        if row.variant.precision == "fp8-tensorwise":
            # first_last_layers_bf16 applies to the timed stack: 2 of layers_timed layers in bf16
            row.notes.append(f"2 of the {row.layers_timed} timed layers bf16 (first/last)")
    return row


# ---------------------------------------------------------------------------------------------
# Plan and budget
# ---------------------------------------------------------------------------------------------
def available() -> dict[str, str | None]:
    """Which optional parts can run: None = yes, else the reason they are skipped."""
    have = {}
    have["te"] = None
    try:
        from lumos_mcore.models.dit.layer_spec import te_available

        if not te_available():
            have["te"] = "missing package: transformer-engine[pytorch]"
    except Exception as exc:
        have["te"] = f"transformer-engine unusable: {exc}"
    have["flash"] = None
    try:
        from lumos_mcore.ops.flash_attention import flash_attn_backend

        # Every head dim the rows use: a build may import and still lack the kernels for one
        # (older FA3 builds have no head dim 72), and its rows would then time SDPA.
        head_dims = sorted({hidden // heads for _, hidden, heads in SIZES.values()})
        if flash_attn_backend() is None:
            have["flash"] = "missing package: flash-attn"
        elif any(flash_attn_backend(hd) is None for hd in head_dims):
            bad = [hd for hd in head_dims if flash_attn_backend(hd) is None]
            have["flash"] = f"flash-attn cannot run head dim {bad} here (see the log)"
    except Exception as exc:
        have["flash"] = f"flash-attn unusable: {exc}"
    have["triton"] = None if _version("triton") else "missing package: triton"
    major, minor = torch.cuda.get_device_capability()
    have["fp8"] = have["te"] or (
        None
        if (major, minor) >= (8, 9)
        else f"FP8 needs compute capability >= 8.9 (this GPU {major}.{minor})"
    )
    return have


def plan(args, have: dict) -> tuple[list[Row], list[str]]:
    skipped: list[str] = []
    rows: list[Row] = []

    def want(variant: Variant) -> bool:
        needs = {
            "te": variant.spec == "te" or variant.attention == "te",
            "flash": variant.attention == "flash",
        }
        needs["fp8"] = variant.fp8
        needs["triton"] = variant.fused
        for part, needed in needs.items():
            if needed and have[part]:
                msg = f"{variant.label}: skipped ({have[part]})"
                if msg not in skipped:
                    skipped.append(msg)
                return False
        return True

    xl = [
        Variant("local", "sdpa"),
        Variant("local", "flash"),
        Variant("local", "sdpa", fused=True),
        Variant("te", "te"),
        Variant("te", "te", fused=True),
        Variant("te", "te", "fp8-tensorwise"),
        Variant("te", "te", "fp8-delayed"),
    ]
    big = [
        Variant("local", "sdpa"),
        Variant("local", "flash"),
        Variant("te", "te"),
        Variant("te", "te", "fp8-tensorwise"),
        Variant("te", "te", "fp8-delayed"),
    ]
    # flash-attn has no spatial / temporal patterns (FlashAttnCoreAttention)
    spatial_temporal = [Variant("local", "sdpa"), Variant("te", "te")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    for size in args.sizes.split(","):
        depth = SIZES[size][0]
        layers = min(depth, args.layers) if args.layers else depth
        variants = xl if size == "XL" else big
        sizes_tokens = (
            token_counts
            if size == "XL"
            else [t for t in token_counts if t in FP8_TOKENS] or token_counts[:1]
        )
        for tokens in sizes_tokens:
            recompute = tokens >= 65536
            steps = max(2, args.iters // 2) if recompute else args.iters
            row = Row(size, tokens, Variant("local", "sdpa"), recompute, layers, depth)
            row.steps, row.warmup = steps, args.warmup
            for variant in variants:
                if recompute and variant.fused:
                    continue  # fused ops change per-layer memory little; keep 64K to the main rows
                if want(variant):
                    rows.append(replace(row, variant=variant, notes=[]))
            if size == "XL" and tokens == RECIPE_TOKENS:
                for variant in spatial_temporal:
                    if want(variant):
                        rows.append(
                            replace(row, variant=variant, layout="spatial_temporal", notes=[])
                        )
    return order_rows(rows), skipped


_BACKEND_RANK = {"te": 0, "flash": 1, "sdpa": 2}  # the likely fastest first


def order_rows(rows: list[Row]) -> list[Row]:
    """Run order, so that a ``--budget-s`` cut drops the rows no target is read from:
    (0) XL/2 at 16K bf16, both attention layouts -- the MFU target; (1) one 64K bf16 row with
    recompute, on the likely fastest backend -- the long-sequence target; (2) the 2B bf16 / FP8
    rows, 16K before 4K -- the FP8 target; (3) everything else, in plan order."""
    long = [
        r for r in rows if r.size == "XL" and r.tokens >= 65536 and r.variant.precision == "bf16"
    ]
    first_long = min(long, key=lambda r: _BACKEND_RANK[r.variant.attention], default=None)

    def key(r: Row) -> tuple:
        backend = _BACKEND_RANK[r.variant.attention]
        if (
            r.size == "XL"
            and r.tokens == RECIPE_TOKENS
            and r.variant.precision == "bf16"
            and not r.variant.fused
        ):
            return (0, backend, r.layout != "full_3d")
        if r is first_long:
            return (1,)
        if r.size == "2B" and not r.variant.fused:
            return (2, -r.tokens, r.variant.spec != "te")
        return (3,)

    return sorted(rows, key=key)  # stable: plan order within a class


def row_work(row: Row) -> float:
    """Executed FLOPs of a row's timed steps (warm-up included), for scaling durations."""
    _, hw = row_flops(row)
    return hw * row.layers_timed / row.depth * (row.warmup + row.steps)


def expected_row_s(row: Row, finished: list[Row]) -> float:
    """A conservative guess of how long ``row`` takes: the longest build seen (twice) plus the
    step time per FLOP of the largest finished row (where build and first-call overheads weigh
    least) scaled to this row's FLOPs, with a safety factor; a fixed allowance before any
    row has finished."""
    done = [r for r in finished if r.status == "ok" and r.wall_s is not None]
    if not done:
        return FIRST_ROW_S
    ref = max(done, key=row_work)
    build = max(r.build_s or 0.0 for r in done)
    per_flop = max(ref.wall_s - (ref.build_s or 0.0), 0.0) / row_work(ref)
    return ROW_RESERVE_S + 2 * build + ROW_SAFETY * per_flop * row_work(row)


def budget_left(budget_s: float, now: float | None = None) -> float | None:
    """Seconds of ``--budget-s`` left (None: no budget), counted from the script's start."""
    if not budget_s:
        return None
    return budget_s - ((time.monotonic() if now is None else now) - T_START)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _pct(row: Row, value: float | None) -> str:
    if value is None:
        return "n/a" if row.status == "ok" else "-"
    return f"{100 * value:.1f}"


def _ran(row: Row) -> bool:
    return row.status == "ok" or row.status.startswith(("out of memory", "error"))


NOT_PLANNED = "not in this run's plan (--sizes / --tokens)"


def _why_not(rows: list[Row], fallback: str) -> str:
    """Why none of ``rows`` gave a number: their distinct statuses, else ``fallback``."""
    statuses = [f"{r.variant.label}: {r.status}" for r in rows if r.status != "ok"]
    return "; ".join(dict.fromkeys(statuses)) if statuses else fallback


def _quick_note(row: Row) -> str:
    return (
        f" (quick run: {row.layers_timed} of {row.depth} layers timed and scaled -- not a verdict)"
        if row.quick
        else ""
    )


def _mfu_targets(rows: list[Row], have: dict) -> list[str]:
    out = []
    layouts = (
        (
            "spatial_temporal",
            "the verdict: the I2V recipe's layout, spatial_temporal (16 frames x 1024 tokens)",
        ),
        ("full_3d", "full 3-D attention over all 16384 tokens (full_3d)"),
    )
    for layout, what in layouts:
        prefix = f"Lumos-XL/2 I2V bf16 at 16K tokens ≥ 50% MFU, {what}"
        cands = [
            r
            for r in rows
            if r.size == "XL"
            and r.tokens == RECIPE_TOKENS
            and r.variant.precision == "bf16"
            and r.layout == layout
        ]
        ok = [r for r in cands if r.status == "ok"]
        measured = [r for r in ok if r.mfu is not None]
        if not ok:
            why = _why_not(cands, NOT_PLANNED)
            out.append(f"{prefix}: not measured ({why})")
        elif not measured:
            out.append(
                f"{prefix}: not measured (no peak FLOP/s known for this GPU: pass --peak-bf16)"
            )
        else:
            best = max(measured, key=lambda r: r.mfu)
            verdict = "met" if best.mfu >= 0.5 else "NOT met"
            if best.quick:
                verdict += " (quick run)"
            out.append(
                f"{prefix}: **{verdict}** -- best {100 * best.mfu:.1f}% (row: {best.label})"
                + _quick_note(best)
            )
    return out


def _fp8_targets(rows: list[Row], have: dict) -> list[str]:
    out = []
    prefix = "FP8 ≥ 1.3× bf16 on 2B"
    for i, tokens in enumerate(FP8_TOKENS):
        which = "the verdict" if i == 0 else "also reported"
        bf = [
            r
            for r in rows
            if r.size == "2B"
            and r.tokens == tokens
            and r.variant.spec == "te"
            and r.variant.precision == "bf16"
            and not r.variant.fused
        ]
        f8 = [r for r in rows if r.size == "2B" and r.tokens == tokens and r.variant.fp8]
        bf_ok = [r for r in bf if r.status == "ok"]
        f8_ok = [r for r in f8 if r.status == "ok"]
        if not (bf_ok and f8_ok):
            if have.get("fp8"):
                why = have["fp8"]
            else:
                why = _why_not(bf + f8, NOT_PLANNED)
            out.append(f"{prefix}: not measured ({why}) -- {tokens} tokens, {which}")
            continue
        b = bf_ok[0]
        best = max(f8_ok, key=lambda r: r.tokens_per_s)
        ratio = best.tokens_per_s / b.tokens_per_s
        verdict = "met" if ratio >= 1.3 else "NOT met"
        quick = best.quick or b.quick
        if quick:
            verdict += " (quick run)"
        out.append(
            f"{prefix}: **{verdict}** -- {ratio:.2f}× tokens/s at {tokens} tokens, {which} "
            f"({best.variant.label} vs {b.variant.label})"
            + (_quick_note(best if best.quick else b) if quick else "")
        )
    return out


def _long_target(rows: list[Row], env: dict) -> str:
    prefix = "≥ 64K tokens per sample on one GPU with recompute"
    long = [r for r in rows if r.tokens >= 65536]
    ok = [r for r in long if r.status == "ok"]
    full = [r for r in ok if not r.quick]
    if full:
        best = min(full, key=lambda r: r.peak_mem_gb or 0)
        labels = ", ".join(sorted({f"{r.size} {r.variant.label}" for r in full}))
        memory = env.get("memory_gb")
        of = f" of {memory} GB" if memory else ""
        train = (
            f"; optimizer state is not in the measured peak: perf.memory puts a whole train "
            f"step (fp32 grads, Adam state, fp32 master weights, EMA, no distributed optimizer) "
            f"at {best.est_train_gb:.1f} GB"
            if best.est_train_gb is not None
            else "; optimizer state is not in the measured peak"
        )
        return (
            f"{prefix}: **met** -- {labels} (least memory: {best.label}, peak "
            f"{_fmt(best.peak_mem_gb, '.1f')} GB allocated / {_fmt(best.peak_reserved_gb, '.1f')} GB "
            f"reserved{of}{train})"
        )
    if ok:
        r = ok[0]
        return (
            f"{prefix}: not shown (quick run: {r.layers_timed} of {r.depth} layers timed, so the "
            f"measured memory is not the model's; needs a run with every layer) -- "
            + ", ".join(sorted({f"{r.size} {r.variant.label}" for r in ok}))
        )
    if any(_ran(r) for r in long):
        return f"{prefix}: **NOT met** -- {_why_not([r for r in long if _ran(r)], '')}"
    return f"{prefix}: not measured ({_why_not(long, NOT_PLANNED)})"


def targets(rows: list[Row], have: dict | None = None, env: dict | None = None) -> list[str]:
    have, env = have or {}, env or {}
    out = _mfu_targets(rows, have) + _fp8_targets(rows, have)
    for tokens in sorted({r.tokens for r in rows if r.size == "XL"}):
        bf = [
            r
            for r in rows
            if r.size == "XL"
            and r.tokens == tokens
            and r.layout == "full_3d"
            and r.variant.spec == "te"
            and r.variant.precision == "bf16"
            and not r.variant.fused
            and r.status == "ok"
        ]
        f8 = [
            r
            for r in rows
            if r.size == "XL" and r.tokens == tokens and r.variant.fp8 and r.status == "ok"
        ]
        if bf and f8:
            best = max(f8, key=lambda r: r.tokens_per_s)
            ratio = best.tokens_per_s / bf[0].tokens_per_s
            out.append(
                f"XL FP8 / bf16 tokens/s at {tokens} tokens: {ratio:.2f}× ({best.variant.label})"
            )
    out.append(_long_target(rows, env))
    return out


def _peak_text(peaks: dict) -> str:
    parts = []
    for dtype, name in (("bf16", "bf16"), ("fp8", "FP8")):
        p = peaks.get(dtype)
        if p is None:
            parts.append(f"{name}: not known for this GPU (MFU n/a; pass --peak-{dtype})")
        else:
            parts.append(f"{name}: {p.tflops:g} TFLOP/s ({p.source})")
    return "; ".join(parts)


def report(
    rows: list[Row],
    skipped: list[str],
    env: dict,
    peaks: dict,
    kernel_rows: list[dict],
    args,
    *,
    have: dict | None = None,
    state: str = "finished",
    elapsed_s: float | None = None,
) -> str:
    date = dt.date.today().isoformat()
    budget = getattr(args, "budget_s", 0) or 0
    run = f"Run: {state}"
    if elapsed_s is not None:
        run += f", {elapsed_s:.0f} s since the script started"
    if budget:
        run += f" (--budget-s {budget:.0f})"
    lines = [
        f"# GPU benchmark -- {env.get('gpu', 'no GPU')} -- {date}",
        "",
        run + ".",
        "",
        "Forward + backward of the Lumos DiT block stack (TransformerBlock of DiTLayer) on synthetic "
        "`[s, b=1, h]` inputs, one condition token (I2V: DINO CLS of the first frame) and one "
        "adaLN row per sample, produced by `tools/benchmark_gpu.py` (run by "
        "`tools/gpu_proof.sh`). Each row reports the median of its own number of timed steps "
        f"(column `steps`: {args.iters}, and {max(2, args.iters // 2)} for the 64K rows) "
        f"after {args.warmup} warm-up steps, timed with CUDA events. The optimizer step is not "
        "timed, and gradients land in the parameters' plain `.grad` (no megatron DDP gradient "
        "buffer, no all-reduce). 64K rows use full activation recompute. Attention layout: "
        "`full_3d` = one self-attention over all tokens; `spatial_temporal` = the I2V recipe "
        "(`examples/recipes/lumos_i2v_xl2_16f_512.yaml`, 16 frames x 1024 tokens): "
        "self-attention within each frame plus a temporal self-attention per block. Model "
        "FLOPs from `lumos_mcore.perf.flops.count_flops` for the blocks, with the row's layout "
        "(DESIGN.md section 4; full 3-D attention counts `4 L^2 D` per layer); MFU = model "
        "FLOP/s over the dense peak of the row's precision; HFU counts the recomputed forward. "
        f"Peaks used: {_peak_text(peaks)}. Embedders and the final layer are not in the timed "
        "region. Memory: `peak alloc` = `torch.cuda.max_memory_allocated`, `peak reserved` = "
        "`torch.cuda.max_memory_reserved` (for an out-of-memory row: the peak reached before the "
        "failing allocation); `est.` = `lumos_mcore.perf.memory` for the timed stack, `est. "
        "train` = its whole train step (optimizer state, fp32 grads and EMA included -- not in "
        "the measured peak).",
        "",
        "## Environment",
        "",
        "| item | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v if v is not None else 'not installed'} |" for k, v in env.items()]
    lines += ["", "## Targets (issue 7)", ""]
    lines += [f"- {t}" for t in targets(rows, have, env)]
    lines += [
        "",
        "## Results",
        "",
        "| model | tokens | layout | spec / attention / precision | recompute | steps | ms / step | spread ms | tokens/s | TFLOP/s | MFU % | HFU % | peak alloc GB | peak reserved GB | est. GB | est. train GB | status |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(rows, key=lambda r: (list(SIZES).index(r.size), r.tokens)):
        depth, hidden, heads = SIZES[r.size]
        model = f"{r.size} ({depth}x{hidden}, {heads}x{hidden // heads})"
        status = r.status + (f" ({'; '.join(r.notes)})" if r.notes else "")
        lines.append(
            f"| {model} | {r.tokens} | {r.layout} | {r.variant.label} | "
            f"{'full' if r.recompute else 'none'} | {r.steps} | "
            f"{_fmt(r.ms, '.1f')} | {_fmt(r.ms_spread, '.1f')} | {_fmt(r.tokens_per_s, ',.0f')} | "
            f"{_fmt(r.tflops, '.1f')} | {_pct(r, r.mfu)} | {_pct(r, r.hfu)} | "
            f"{_fmt(r.peak_mem_gb, '.1f')} | {_fmt(r.peak_reserved_gb, '.1f')} | "
            f"{_fmt(r.est_mem_gb, '.1f')} | {_fmt(r.est_train_gb, '.1f')} | {status} |"
        )
    if kernel_rows:
        lines += [
            "",
            "## Fused Triton ops vs PyTorch (forward + backward, ms; `lumos_mcore.ops.autoselect`)",
            "",
            "| tokens | op | triton ms | torch ms | chosen |",
            "| ---: | --- | ---: | ---: | --- |",
        ]
        for k in kernel_rows:
            lines.append(
                f"| {k['tokens']} | {k['op']} | {_fmt(k['triton_ms'], '.3f')} | {_fmt(k['torch_ms'], '.3f')} | {k['backend']} |"
            )
    lines += ["", "## Skipped", ""]
    lines += [f"- {s}" for s in skipped] or ["- nothing"]
    if getattr(args, "tests_summary", None) and Path(args.tests_summary).exists():
        lines += [
            "",
            "## GPU test suite",
            "",
            "```",
            Path(args.tests_summary).read_text().rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def row_line(row: Row) -> str:
    """Every number of a finished row on one log line (the log survives what the report
    might not)."""
    return (
        f"[benchmark]   -> {row.status}: {_fmt(row.ms, '.1f')} ms/step "
        f"(spread {_fmt(row.ms_spread, '.1f')}, {row.steps} steps), "
        f"{_fmt(row.tokens_per_s, ',.0f')} tokens/s, {_fmt(row.tflops, '.1f')} TFLOP/s, "
        f"MFU {_pct(row, row.mfu)}%, HFU {_pct(row, row.hfu)}%, peak "
        f"{_fmt(row.peak_mem_gb, '.2f')} GB allocated / {_fmt(row.peak_reserved_gb, '.2f')} GB "
        f"reserved (est. {_fmt(row.est_mem_gb, '.2f')} GB, train step "
        f"{_fmt(row.est_train_gb, '.2f')} GB), {_fmt(row.wall_s, '.0f')} s"
    )


def atomic_write(path: Path, text: str) -> None:
    """A reader, or a kill mid-write, sees the previous complete report or the new one, never
    half of one (the folder is created first)."""
    from lumos_mcore.durable import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


@dataclass
class Progress:
    """What the report is made of, rewritten after every row."""

    args: argparse.Namespace
    env: dict
    peaks: dict
    have: dict
    rows: list[Row]
    skipped: list[str]
    kernel_rows: list[dict] = field(default_factory=list)
    state: str = "running"

    def write(self) -> str:
        elapsed = time.monotonic() - T_START
        text = report(
            self.rows,
            self.skipped,
            self.env,
            self.peaks,
            self.kernel_rows,
            self.args,
            have=self.have,
            state=self.state,
            elapsed_s=elapsed,
        )
        atomic_write(Path(self.args.out), text)
        if self.args.json:
            data = {
                "state": self.state,
                "elapsed_s": elapsed,
                "budget_s": self.args.budget_s,
                "env": self.env,
                "peaks": {k: asdict(v) if v is not None else None for k, v in self.peaks.items()},
                "targets": targets(self.rows, self.have, self.env),
                "rows": [{**asdict(r), "variant": asdict(r.variant)} for r in self.rows],
                "kernels": self.kernel_rows,
                "skipped": self.skipped,
            }
            atomic_write(Path(self.args.json), json.dumps(data, indent=1))
        return text


def kernel_timings(args, have: dict) -> tuple[list[dict], list[str]]:
    if have["triton"]:
        return [], [f"Triton kernel timings: skipped ({have['triton']})"]
    from lumos_mcore import ops

    rows = []
    _, hidden, heads = SIZES["XL"]
    try:
        with _kernels_env("auto"):  # autoselect measures only in auto mode
            for tokens in [int(t) for t in args.tokens.split(",")]:
                ops.reset_kernel_choices()
                for op, c in ops.autoselect(
                    seq_len=tokens, batch=1, hidden_size=hidden, num_heads=heads
                ).items():
                    rows.append(
                        {
                            "tokens": tokens,
                            "op": op,
                            "triton_ms": c.triton_ms,
                            "torch_ms": c.torch_ms,
                            "backend": c.backend,
                        }
                    )
    finally:
        ops.reset_kernel_choices()  # the block rows force their mode (kernel_mode)
    return rows, []


def run_kernel_timings(progress: Progress) -> str | None:
    """The fused-op timings, after the rows: a failure is listed as skipped with its error.
    Returns the error when it left the CUDA context lost."""
    args = progress.args
    left = budget_left(args.budget_s)
    if left is not None and left < KERNELS_S:
        progress.skipped.append(
            f"Triton kernel timings: not run (time budget: {max(left, 0):.0f} s left, "
            f"needs ~{KERNELS_S:.0f} s)"
        )
        return None
    print("[benchmark] Triton fused-op timings", flush=True)
    try:
        kernel_rows, skips = kernel_timings(args, progress.have)
    except Exception as exc:
        traceback.print_exc()
        progress.skipped.append(
            f"Triton kernel timings: skipped (error: {type(exc).__name__}: {_first_line(exc)})"
        )
        return release_cuda()
    progress.kernel_rows = kernel_rows
    progress.skipped += skips
    return None


def run_plan(progress: Progress, run=run_row, kernels=run_kernel_timings) -> int:
    """The rows in plan order under ``--budget-s``, then the fused-op timings (``run`` /
    ``kernels``: the callables doing the work), the report rewritten before, after every row and
    at the end -- also after a lost CUDA context, SIGTERM or a crash here. Returns the exit
    status: 0 finished, 1 stopped early (context lost, crash), 143 SIGTERM, 130 SIGINT."""
    args, rows, skipped = progress.args, progress.rows, progress.skipped
    progress.write()  # a report from the start: a kill at any later point leaves one
    previous = signal.signal(signal.SIGTERM, _on_signal)
    rc, current = 0, None
    try:
        lost = None
        for i, row in enumerate(rows):
            left = budget_left(args.budget_s)
            if left is not None:
                need = expected_row_s(row, rows[:i])
                if need > left:
                    row.status = (
                        f"not run (time budget: needs ~{need:.0f} s, {max(left, 0):.0f} s left "
                        f"of --budget-s {args.budget_s:.0f})"
                    )
                    skipped.append(f"{row.label}: {row.status}")
                    print(f"[benchmark] {i + 1}/{len(rows)} {row.label}: {row.status}", flush=True)
                    continue
            print(f"[benchmark] {i + 1}/{len(rows)} {row.label}", flush=True)
            current = row
            try:
                run(row, progress.peaks)
            except ContextLostError as exc:
                lost = str(exc)
            current = None
            print(row_line(row), flush=True)
            if lost is not None:
                break
            progress.write()
        if lost is None:
            lost = kernels(progress)
        else:
            skipped.append(f"Triton kernel timings: not run (CUDA context lost: {lost})")
        if lost is not None:
            for r in rows:
                if r.status == "pending":
                    r.status = f"not run (CUDA context lost: {lost})"
                    skipped.append(f"{r.label}: {r.status}")
            progress.state = f"stopped early: CUDA context lost ({lost})"
            rc = 1
        else:
            progress.state = "finished"
    except (Interrupted, KeyboardInterrupt) as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the write
        name = str(exc) if isinstance(exc, Interrupted) else "SIGINT"
        if current is not None and current.status == "pending":
            current.status = f"interrupted ({name}) while running"
        for r in rows:
            if r.status == "pending":
                r.status = f"not run (interrupted: {name})"
        progress.state = f"interrupted by {name}: partial"
        rc = 143 if name == "SIGTERM" else 130
    except Exception as exc:  # a bug here must still leave the rows measured so far
        traceback.print_exc()
        progress.state = f"crashed: {type(exc).__name__}: {_first_line(exc)}"
        rc = 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the last write is not cut short either
    try:
        progress.write()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    date = dt.date.today().isoformat()
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / f"gpu_{date}.md"))
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--tokens", default="4096,16384,65536")
    parser.add_argument("--sizes", default="XL,2B")
    parser.add_argument(
        "--layers", type=int, default=0, help="time only this many layers (0 = all)"
    )
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 layers, 3 iterations: a smoke run")
    parser.add_argument(
        "--peak-bf16", type=float, default=None, help="TFLOP/s (default: the GPU's spec table)"
    )
    parser.add_argument("--peak-fp8", type=float, default=None, help="TFLOP/s (as --peak-bf16)")
    parser.add_argument("--tests-summary", default=None, help="pytest summary to embed")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="seconds from the script's start (0 = no limit): no row starts whose expected time "
        "would overrun; the rows the targets are read from run first, cut rows are listed",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.iters, args.warmup = args.layers or 4, 3, 1
    if not torch.cuda.is_available():
        print("[benchmark] no CUDA device: nothing to measure", file=sys.stderr)
        return 2

    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel.state import destroy_parallel, find_free_port, initialize_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    initialize_parallel(ParallelConfig(), num_attention_heads=16, num_layers=28)

    env = environment()
    peaks = resolve_peaks(env.get("gpu"), args.peak_bf16, args.peak_fp8)
    if any(p is None for p in peaks.values()):
        print(f"[benchmark] peaks: {_peak_text(peaks)}", file=sys.stderr)
    have = available()
    rows, skipped = plan(args, have)
    progress = Progress(args, env, peaks, have, rows, skipped)
    rc = run_plan(progress)
    text = Path(args.out).read_text()
    print(text)
    print(f"[benchmark] wrote {args.out} ({progress.state}) at {time.monotonic() - T_START:.0f} s")
    for line in skipped:
        print(f"[benchmark] SKIPPED: {line}")
    if rc == 0:
        destroy_parallel()
    return rc


if __name__ == "__main__":
    sys.exit(main())

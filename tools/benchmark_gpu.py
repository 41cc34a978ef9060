#!/usr/bin/env python
"""GPU throughput of the Lumos DiT block stack, written up as a markdown report.

Times forward + backward of the transformer blocks (``TransformerBlock`` of ``DiTLayer``) on
synthetic ``[s, b, h]`` inputs -- the part of a Lumos step whose cost grows with the token count
-- for the variants the engine can run on one GPU:

- layer spec: ``local`` (megatron linears) or ``te`` (TransformerEngine linears + fused attention)
- attention: SDPA, flash-attn (``lumos_mcore.ops.FlashAttnCoreAttention``), TE fused attention
- precision: bf16, FP8 (TE ``tensorwise`` current scaling with bf16 first/last layers, or
  ``delayed`` scaling)
- the Triton kernels of ``lumos_mcore.ops`` (norm + adaLN modulate, gated residual) forced on,
  against their PyTorch references (each op's own timings: the autoselect table)
- full activation recompute (needed for 64K tokens per sample)

at 4K / 16K / 64K tokens per sample for Lumos-XL/2 (28 x 1152, 16 heads x 72) with the I2V
condition (one DINO token), and bf16 vs FP8 for a 2B-parameter, 2048-wide configuration.

FLOPs are counted analytically per sample as in DESIGN.md section 4: per layer forward
``24 L D^2`` (QKV + out-proj ``8 L D^2``, MLP ``16 L D^2``) ``+ 4 L^2 D`` (self-attention) ``+ 4 L
D^2 + 4 L Lc D + 4 Lc D^2`` (cross-attention) ``+ 12 D^2`` (adaLN); training = 3 x forward (model
FLOPs, used for MFU) and 4 x forward with full recompute (hardware FLOPs, reported as HFU). Peaks:
989 TFLOP/s bf16 and 1979 TFLOP/s FP8 dense on H100 / H200 SXM (``--peak-bf16/--peak-fp8``
override them for other GPUs). Rows that fail (out of memory, missing support) are reported with
the error instead of a number; parts whose package is missing are listed as skipped.

Usage: ``python tools/benchmark_gpu.py [--out docs/benchmarks/gpu_<date>.md] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PEAKS = {"bf16": 989.0, "fp8": 1979.0}  # TFLOP/s dense, H100 / H200 SXM (DESIGN.md section 4)
SIZES = {
    # name: (depth, hidden, heads) -- Lumos-XL/2 and a 2B-parameter, 2048-wide configuration
    "XL": (28, 1152, 16),
    "2B": (22, 2048, 16),
}
COND_TOKENS = 1  # I2V: the DINO CLS feature of the first frame


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


@dataclass
class Row:
    size: str
    tokens: int
    variant: Variant
    recompute: bool
    layers_timed: int
    depth: int
    status: str = "ok"
    ms: float | None = None
    ms_spread: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    hfu: float | None = None
    peak_mem_gb: float | None = None
    est_mem_gb: float | None = None  # lumos_mcore.perf.memory's count for the timed stack
    notes: list[str] = field(default_factory=list)


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


def flops_fwd_per_layer(tokens: int, hidden: int, cond: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one DiT block for one sample (DESIGN.md section 4)."""
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


# ---------------------------------------------------------------------------------------------
# Building the block stack
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def kernel_mode(variant: Variant) -> Iterator[None]:
    """``DiTLayer`` calls ``lumos_mcore.ops`` for norm + modulate and the gated residuals; a
    ``fused`` row forces their Triton kernels, every other row the PyTorch references, so the
    two rows of a pair differ only in that (``LUMOS_KERNELS``, restored afterwards)."""
    from lumos_mcore.ops.dispatch import ENV

    old = os.environ.get(ENV)
    os.environ[ENV] = "triton" if variant.fused else "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def build_spec(variant: Variant):
    from megatron.core.transformer.enums import AttnMaskType

    from lumos_mcore.models.dit.layer_spec import get_dit_layer_local_spec, get_dit_layer_te_spec

    spec = copy.deepcopy(
        get_dit_layer_te_spec() if variant.spec == "te" else get_dit_layer_local_spec()
    )
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
    if variant.precision.startswith("fp8"):
        # K/V of one condition token: rows = batch, too few for FP8 tensor cores.
        from lumos_mcore.ops.te_fp8 import without_fp8

        kv = sub.cross_attention.submodules.linear_kv
        sub.cross_attention.submodules.linear_kv = without_fp8(kv)
    return spec


def build_block(size: str, depth: int, variant: Variant, recompute: bool):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.models.dit.model import build_transformer_config
    from lumos_mcore.ops.te_fp8 import fp8_config_overrides

    _, hidden, heads = SIZES[size]
    mcfg = ModelConfig(
        name="Lumos-XL/2",
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        spec=variant.spec,
        precision="bf16",
        recompute="full" if recompute else "none",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    extra = {}
    if variant.precision.startswith("fp8"):
        recipe = variant.precision.split("-", 1)[1]
        extra = fp8_config_overrides(recipe, bf16_layers_at_ends=0 if recipe == "delayed" else 1)
    config = build_transformer_config(mcfg, bf16=True, **extra)
    config.use_cpu_initialization = False  # initialise on the GPU: 28 x 2048-wide layers
    torch.manual_seed(0)
    block = TransformerBlock(config, build_spec(variant), post_layer_norm=False).cuda()
    with torch.no_grad():  # adaLN / cross-attention projections start at zero: make them work
        for p in block.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return block, config


def time_block(block, tokens: int, hidden: int, warmup: int, iters: int) -> tuple[float, float]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, 1, hidden, generator=g, device="cuda", dtype=torch.bfloat16)
    x.requires_grad_()
    c = torch.randn(1, 1, hidden, generator=g, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(COND_TOKENS, 1, hidden, generator=g, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(tokens, 1, hidden, generator=g, device="cuda", dtype=torch.bfloat16)

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(hidden_states=x, attention_mask=c, context=ctx)
        out.backward(grad)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
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
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.perf.memory import layer_activation_terms, param_count

    _, hidden, heads = SIZES[row.size]
    fp8 = row.variant.precision.startswith("fp8")
    mcfg = ModelConfig(
        name="Lumos-XL/2",
        depth=max(row.layers_timed, 3),
        hidden_size=hidden,
        num_heads=heads,
        cond_tokens=COND_TOKENS,
        spec=row.variant.spec,
        precision="bf16",
        fp8=row.variant.precision.split("-", 1)[1] if fp8 else None,
    )
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


def run_row(row: Row, args, peaks: dict) -> Row:
    depth, hidden, heads = SIZES[row.size]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    block = None
    try:
        with kernel_mode(row.variant):
            block, _ = build_block(row.size, row.layers_timed, row.variant, row.recompute)
            iters = max(2, args.iters // 2) if row.tokens >= 65536 else args.iters
            ms, spread = time_block(block, row.tokens, hidden, args.warmup, iters)
    except torch.cuda.OutOfMemoryError:
        row.status = "out of memory"
        return row
    except Exception as exc:  # report the failure instead of aborting the whole benchmark
        row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        traceback.print_exc()
        return row
    finally:
        del block
        torch.cuda.empty_cache()
    scale = row.depth / row.layers_timed  # whole-model time when fewer layers were timed
    row.ms = ms * scale
    row.ms_spread = spread * scale
    row.peak_mem_gb = torch.cuda.max_memory_allocated() / 2**30
    row.est_mem_gb = estimate_block_gib(row)
    fwd = flops_fwd_per_layer(row.tokens, hidden, COND_TOKENS) * row.depth
    model_flops = 3 * fwd
    hw_flops = (4 if row.recompute else 3) * fwd
    sec = row.ms / 1e3
    row.tokens_per_s = row.tokens / sec
    row.tflops = model_flops / sec / 1e12
    peak = peaks["fp8" if row.variant.precision.startswith("fp8") else "bf16"]
    if peak:
        row.mfu = row.tflops / peak
        row.hfu = hw_flops / sec / 1e12 / peak
    if row.layers_timed != row.depth:
        row.notes.append(f"timed {row.layers_timed} of {row.depth} layers, scaled")
        if row.variant.precision == "fp8-tensorwise":
            # first_last_layers_bf16 applies to the timed stack: 2 of layers_timed layers in bf16
            row.notes.append(f"2 of the {row.layers_timed} timed layers bf16 (first/last)")
    return row


# ---------------------------------------------------------------------------------------------
# Plan
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

        if flash_attn_backend() is None:
            have["flash"] = "missing package: flash-attn"
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
        needs["fp8"] = variant.precision.startswith("fp8")
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
    token_counts = [int(t) for t in args.tokens.split(",")]
    for size in args.sizes.split(","):
        depth = SIZES[size][0]
        layers = min(depth, args.layers) if args.layers else depth
        variants = xl if size == "XL" else big
        for tokens in (
            token_counts
            if size == "XL"
            else [t for t in token_counts if t == 16384] or token_counts[:1]
        ):
            recompute_options = [True] if tokens >= 65536 else [False]
            for variant in variants:
                if tokens >= 65536 and variant.fused:
                    continue  # fused ops change per-layer memory little; keep 64K to the main rows
                if not want(variant):
                    continue
                for rc in recompute_options:
                    rows.append(Row(size, tokens, variant, rc, layers, depth))
    # the rows that decide the targets first, so that a --budget-s cut drops the others
    rows.sort(key=lambda r: 0 if is_target_row(r) else 1)
    return rows, skipped


def is_target_row(row: Row) -> bool:
    """Rows the targets are read from: XL at 16K bf16, any 64K row, the 2B configuration."""
    unfused = not row.variant.fused
    xl16 = row.size == "XL" and row.tokens == 16384 and row.variant.precision == "bf16"
    return unfused and (xl16 or row.tokens >= 65536 or row.size == "2B")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def targets(rows: list[Row]) -> list[str]:
    ok = [r for r in rows if r.status == "ok"]
    out = []
    xl16 = [r for r in ok if r.size == "XL" and r.tokens == 16384 and r.variant.precision == "bf16"]
    if xl16:
        best = max(xl16, key=lambda r: r.mfu or 0)
        verdict = "met" if (best.mfu or 0) >= 0.5 else "NOT met"
        out.append(
            f"Lumos-XL/2 I2V bf16 at 16K tokens >= 50% MFU: **{verdict}** -- best "
            f"{_fmt(best.mfu and 100 * best.mfu, '.1f')}% ({best.variant.label})"
        )
    for size in ("2B", "XL"):
        bf = [
            r
            for r in ok
            if r.size == size
            and r.variant.spec == "te"
            and r.variant.precision == "bf16"
            and not r.variant.fused
        ]
        f8 = [r for r in ok if r.size == size and r.variant.precision.startswith("fp8")]
        for tokens in sorted({r.tokens for r in bf} & {r.tokens for r in f8}):
            b = next(r for r in bf if r.tokens == tokens)
            best = max((r for r in f8 if r.tokens == tokens), key=lambda r: r.tokens_per_s)
            ratio = best.tokens_per_s / b.tokens_per_s
            if size == "2B":
                verdict = "met" if ratio >= 1.3 else "NOT met"
                out.append(
                    f"FP8 >= 1.3x bf16 tokens/s on the 2B configuration ({tokens} tokens): "
                    f"**{verdict}** -- {ratio:.2f}x ({best.variant.label})"
                )
            else:
                out.append(
                    f"XL FP8 / bf16 tokens/s at {tokens} tokens: {ratio:.2f}x ({best.variant.label})"
                )
    long = [r for r in ok if r.tokens >= 65536]
    verdict = "met" if long else "NOT met"
    detail = ", ".join(sorted({r.variant.label for r in long})) or "no 64K row completed"
    out.append(f">= 64K tokens per sample on one GPU with recompute: **{verdict}** -- {detail}")
    return out


def report(
    rows: list[Row], skipped: list[str], env: dict, peaks: dict, kernel_rows: list[dict], args
) -> str:
    date = dt.date.today().isoformat()
    lines = [
        f"# GPU benchmark -- {env.get('gpu', 'no GPU')} -- {date}",
        "",
        "Forward + backward of the Lumos DiT block stack (TransformerBlock of DiTLayer) on synthetic "
        "`[s, b=1, h]` inputs, one condition token (I2V: DINO CLS of the first frame), produced by "
        "`tools/benchmark_gpu.py` (run by `tools/gpu_proof.sh`). Median of "
        f"{args.iters} timed steps after {args.warmup} warm-up steps (CUDA events); 64K rows use full "
        "activation recompute. Model FLOPs per DESIGN.md section 4 (attention counted: "
        "`4 L^2 D` per layer); MFU = model FLOP/s over the dense peak of the row's precision "
        f"({peaks['bf16']} TFLOP/s bf16, {peaks['fp8']} TFLOP/s FP8); HFU counts the recomputed forward. "
        "Embedders and the final layer are not in the timed region.",
        "",
        "## Environment",
        "",
        "| item | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v if v is not None else 'not installed'} |" for k, v in env.items()]
    lines += ["", "## Targets (issue 7)", ""] + [f"- {t}" for t in targets(rows)]
    lines += [
        "",
        "## Results",
        "",
        "| model | tokens | spec / attention / precision | recompute | ms / step | spread ms | tokens/s | TFLOP/s | MFU % | HFU % | peak mem GB | est. GB | status |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(rows, key=lambda r: (list(SIZES).index(r.size), r.tokens)):
        depth, hidden, heads = SIZES[r.size]
        model = f"{r.size} ({depth}x{hidden}, {heads}x{hidden // heads})"
        status = r.status + (f" ({'; '.join(r.notes)})" if r.notes else "")
        lines.append(
            f"| {model} | {r.tokens} | {r.variant.label} | {'full' if r.recompute else 'none'} | "
            f"{_fmt(r.ms, '.1f')} | {_fmt(r.ms_spread, '.1f')} | {_fmt(r.tokens_per_s, ',.0f')} | "
            f"{_fmt(r.tflops, '.1f')} | {_fmt(r.mfu and 100 * r.mfu, '.1f')} | "
            f"{_fmt(r.hfu and 100 * r.hfu, '.1f')} | {_fmt(r.peak_mem_gb, '.1f')} | "
            f"{_fmt(r.est_mem_gb, '.1f')} | {status} |"
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
    if args.tests_summary and Path(args.tests_summary).exists():
        lines += [
            "",
            "## GPU test suite",
            "",
            "```",
            Path(args.tests_summary).read_text().rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def kernel_timings(args, have: dict) -> tuple[list[dict], list[str]]:
    if have["triton"]:
        return [], [f"Triton kernel timings: skipped ({have['triton']})"]
    from lumos_mcore import ops

    rows = []
    _, hidden, heads = SIZES["XL"]
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
    ops.reset_kernel_choices()  # the block rows force their mode (kernel_mode)
    return rows, []


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
    parser.add_argument("--peak-bf16", type=float, default=PEAKS["bf16"])
    parser.add_argument("--peak-fp8", type=float, default=PEAKS["fp8"])
    parser.add_argument("--tests-summary", default=None, help="pytest summary to embed")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="start no new row after this many seconds (0 = no limit); the rows the targets "
        "are read from run first, cut rows are listed as skipped",
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
    peaks = {"bf16": args.peak_bf16, "fp8": args.peak_fp8}
    name = torch.cuda.get_device_name(0)
    if not any(k in name for k in ("H100", "H200", "GH200")) and (
        args.peak_bf16,
        args.peak_fp8,
    ) == (PEAKS["bf16"], PEAKS["fp8"]):
        print(
            f"[benchmark] {name}: peaks are H100/H200 SXM numbers; pass --peak-bf16/--peak-fp8",
            file=sys.stderr,
        )

    env = environment()
    have = available()
    kernel_rows, skipped = kernel_timings(args, have)
    rows, skipped_rows = plan(args, have)
    skipped += skipped_rows
    t0 = time.time()
    for i, row in enumerate(rows):
        if args.budget_s and time.time() - t0 > args.budget_s:
            row.status = "not run (time budget)"
            skipped.append(
                f"{row.size} {row.tokens} tokens {row.variant.label}: not run "
                f"(--budget-s {args.budget_s:.0f} spent)"
            )
            continue
        print(
            f"[benchmark] {i + 1}/{len(rows)} {row.size} {row.tokens} tokens {row.variant.label}",
            flush=True,
        )
        run_row(row, args, peaks)
        print(
            f"[benchmark]   -> {row.status} {_fmt(row.ms, '.1f')} ms, MFU {_fmt(row.mfu and 100 * row.mfu, '.1f')}%",
            flush=True,
        )
    text = report(rows, skipped, env, peaks, kernel_rows, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "env": env,
                    "rows": [{**asdict(r), "variant": asdict(r.variant)} for r in rows],
                    "kernels": kernel_rows,
                    "skipped": skipped,
                },
                indent=1,
            )
        )
    print(text)
    print(f"[benchmark] wrote {out} in {time.time() - t0:.0f} s")
    for s in skipped:
        print(f"[benchmark] SKIPPED: {s}")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())

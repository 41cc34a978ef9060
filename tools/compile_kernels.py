"""Compile the Triton kernels for GPUs that are not here; report registers, spills, shared memory.

    python tools/compile_kernels.py                          # Lumos-XL/2 and 2B, sm_90 + sm_100
    python tools/compile_kernels.py --models Lumos-XL/2 --archs 90 --tokens 65536 \
        --out docs/benchmarks/kernels_aot.md --json /tmp/kernels.json

Captures what one DiT layer's fused ops launch, forward and backward, at each model's width,
head count and tensor-parallel head split (``lumos_kernels.aot.dit_layer_launches``: the real
launchers, with the adaLN chunk views and the strided q view the layer passes), and compiles
every distinct launch with triton's CUDA backend down to a cubin for each architecture. No GPU
or driver is needed: the ``ptxas`` shipped in the triton wheel assembles the binaries, and
``cuobjdump`` reads their resource use. This catches what the CPU interpreter cannot: kernels
that do not compile, and register spills to local memory.

Exit status: 0 when everything compiled, 1 when a kernel failed to compile (the report names it
and triton's message), 2 with ``--fail-on-spill`` when a kernel spills.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
from pathlib import Path

try:
    import lumos_kernels  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.append(str(Path(__file__).resolve().parents[1] / "kernels"))

import torch

from lumos_kernels import aot

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SHAPE = re.compile(r"^(\d+)x(\d+)$")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the kernels see of a model: its width and attention heads."""

    name: str
    hidden: int
    heads: int


def parse_model(spec: str) -> ModelShape:
    """``Lumos-XL/2`` (the registry) or ``WIDTHxHEADS`` (``2048x16``: the 2B configuration)."""
    m = _SHAPE.match(spec)
    if m:
        hidden, heads = int(m.group(1)), int(m.group(2))
        if hidden % heads:
            raise SystemExit(f"--models {spec}: width {hidden} is not divisible by {heads} heads")
        return ModelShape(spec, hidden, heads)
    from lumos_mcore.models.common.registry import get_model_size

    try:
        size = get_model_size(spec)
    except ValueError as exc:
        raise SystemExit(f"--models {spec}: {exc}; or give WIDTHxHEADS, e.g. 2048x16") from None
    return ModelShape(spec, size.hidden_size, size.num_heads)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}={text!r}: give comma-separated integers") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"{flag}={text!r}: give positive integers")
    return values


@dataclasses.dataclass(frozen=True)
class Row:
    """One compiled binary and the (model, TP) layers that launch it."""

    users: tuple[tuple[str, int], ...]  # (model, tp)
    result: aot.CompileResult

    @property
    def used_by(self) -> str:
        """``Lumos-XL/2 TP 1, 8; 2048x16 TP 1`` (one binary serves every width of its block)."""
        by_model: dict[str, list[int]] = {}
        for model, tp in self.users:
            by_model.setdefault(model, []).append(tp)
        return "; ".join(f"{m} TP {', '.join(map(str, t))}" for m, t in by_model.items())


def collect(
    models: list[ModelShape],
    tps: list[int],
    archs: list[int],
    *,
    tokens: int,
    batch: int,
    dtype: torch.dtype,
    norms: list[str],
    sm_count: int,
) -> list[Row]:
    """Compile every distinct launch of every (model, tp) once per architecture."""
    launches: dict[tuple, aot.Launch] = {}
    users: dict[tuple, list[tuple[str, int]]] = {}
    for model in models:
        for tp in tps:
            if model.heads % tp:
                print(f"skip {model.name} tp={tp}: {model.heads} heads do not split {tp} ways")
                continue
            layer = aot.dit_layer_launches(
                model.hidden, model.heads, tokens=tokens, batch=batch, tp=tp, dtype=dtype,
                norms=norms, sm_count=sm_count,
            )  # fmt: skip
            for launch in aot.unique_launches(layer):
                launches.setdefault(launch.key, launch)
                users.setdefault(launch.key, []).append((model.name, tp))
    return [
        Row(tuple(users[key]), aot.compile_launch(launch, arch))
        for key, launch in launches.items()
        for arch in archs
    ]


def _widths(counts: tuple[tuple[int, int], ...]) -> str:
    """``128b x3, 32b x2``: instructions per access width, widest first."""
    return ", ".join(f"{bits}b x{n}" for bits, n in counts) or "-"


def _fmt(v: int | None) -> str:
    return "?" if v is None else str(v)


def report(rows: list[Row], args: argparse.Namespace) -> str:
    """The markdown report: set-up, one table row per binary, the verdict."""
    import triton

    failed = [r for r in rows if not r.result.ok]
    spilled = [r for r in rows if r.result.ok and r.result.spills]
    unread = [r for r in rows if r.result.ok and r.result.registers is None]
    archs = ", ".join(f"sm_{a} ({aot.ARCH_NAMES.get(a, '?')})" for a in args.archs)
    lines = [
        "# Triton kernels compiled ahead of time (no GPU)",
        "",
        f"- Date: {datetime.date.today().isoformat()}; triton {triton.__version__}; "
        f"ptxas: {aot.ptxas_version() or 'not found'}",
        f"- Architectures: {archs}",
        f"- Launches captured from one DiT layer, forward + backward: {args.tokens} tokens x "
        f"batch {args.batch}, {args.dtype}, norms {', '.join(args.norms)}, per-sample and "
        f"per-token modulation, grids sized for {args.sm_count} SMs",
        f"- Command: `python tools/compile_kernels.py {' '.join(args.argv)}`".rstrip(),
        "",
        "Registers are per thread; spills are local-memory bytes per thread (0 wanted); shared "
        "memory is per program. The variant is what the compiler specialised on; 'not 16-divisible' "
        "lists the pointers and integers it could not assume 16-divisible (no 16-byte vector "
        "access through them). Global loads / stores count the SASS instructions per access "
        "width: 128 bits is what a memory-bound kernel wants. One binary serves every model "
        "width that shares its block size.",
        "",
        "| kernel | variant | not 16-divisible | arch | used by | registers | spills (B) "
        "| shared (B) | global loads | global stores | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        res = r.result
        status = "ok" if res.ok else f"**failed**: {res.error}"
        if res.ok and res.spills:
            status = "**spills**"
        unaligned = ", ".join(res.launch.unaligned) or "-"
        lines.append(
            f"| `{res.launch.kernel}` | {res.launch.label} | {unaligned} | sm_{res.arch} "
            f"| {r.used_by} "
            f"| {_fmt(res.registers)} | {_fmt(res.local_bytes)} "
            f"| {_fmt(res.shared_bytes)} | {_widths(res.loads)} | {_widths(res.stores)} "
            f"| {status} |"
        )
    lines += ["", f"**{len(rows)} binaries: {len(rows) - len(failed)} compiled, "
              f"{len(failed)} failed, {len(spilled)} spill.**"]  # fmt: skip
    if unread:
        lines.append(f"{len(unread)} binaries compiled but cuobjdump could not read their use.")
    lines += [
        "",
        "What this proves: the kernels compile for these GPUs with the launchers' real "
        "arguments, and their register / shared-memory use. What it does not: speed or "
        "numerics on the GPU (tests/gpu and tools/benchmark_gpu.py measure those).",
    ]
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        res = r.result
        out.append(
            {
                "used_by": [list(u) for u in r.users],
                "kernel": res.launch.kernel,
                "variant": res.launch.label,
                "unaligned": list(res.launch.unaligned),
                "grid": list(res.launch.grid),
                "arch": res.arch,
                "ok": res.ok,
                "error": res.error,
                "registers": res.registers,
                "local_bytes": res.local_bytes,
                "stack_bytes": res.stack_bytes,
                "shared_bytes": res.shared_bytes,
                "cubin_bytes": res.cubin_bytes,
                "loads": [list(c) for c in res.loads],
                "stores": [list(c) for c in res.stores],
            }
        )
    return out


def _compiler_mode() -> None:
    """Compiling needs triton in compiler mode. triton fixes its mode on its first import, which
    in this process happens only in ``lumos_kernels`` after this, so the variable is dropped here."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit(
            "triton was already imported with TRITON_INTERPRET=1; run this tool in its own process"
        )
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said aloud


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="Lumos-XL/2,2048x16",
                    help="registry names or WIDTHxHEADS, comma-separated")  # fmt: skip
    ap.add_argument("--tp", default="1,8", help="tensor-parallel sizes (split the heads)")
    ap.add_argument("--archs", default="90,100", help="compute capabilities: 90 = H100/H200")
    ap.add_argument("--tokens", type=int, default=16384, help="local tokens per sample")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--norms", default="layernorm,rmsnorm")
    ap.add_argument("--sm-count", type=int, default=132, help="SMs the grids are sized for")
    ap.add_argument("--out", type=Path, help="write the markdown report here")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--fail-on-spill", action="store_true", help="exit 2 when a kernel spills")
    args = ap.parse_args(argv)
    args.argv = argv
    models = [parse_model(m.strip()) for m in args.models.split(",") if m.strip()]
    if not models:
        raise SystemExit("--models: name at least one model")
    args.tps = _ints(args.tp, "--tp")
    args.archs = _ints(args.archs, "--archs")
    if args.tokens <= 0 or args.batch <= 0 or args.sm_count <= 0:
        raise SystemExit("--tokens, --batch and --sm-count must be positive")
    args.norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    from lumos_kernels.adaln import NORMS

    bad = [n for n in args.norms if n not in NORMS]
    if bad or not args.norms:
        raise SystemExit(f"--norms={args.norms}: choose from {', '.join(NORMS)}")
    _compiler_mode()
    from lumos_kernels._triton import has_triton

    if not has_triton():
        raise SystemExit("triton is not importable here: pip install -r requirements.txt")

    rows = collect(
        models, args.tps, args.archs, tokens=args.tokens, batch=args.batch,
        dtype=DTYPES[args.dtype], norms=args.norms, sm_count=args.sm_count,
    )  # fmt: skip
    text = report(rows, args)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(rows), indent=1) + "\n")
    if any(not r.result.ok for r in rows):
        return 1
    if args.fail_on_spill and any(r.result.spills for r in rows):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

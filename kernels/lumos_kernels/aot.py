"""Compile the Triton kernels ahead of time for a GPU that is not here.

The CPU suite runs the kernels in Triton's interpreter, which executes them as Python: it checks
the math, not what only the compiler checks (``constexpr``-ness, loop-carried types, block
shapes, what a ``tl`` call lowers to) nor what the GPU pays for (registers, spills to local
memory, shared memory). Triton's CUDA backend needs no driver to lower a kernel to PTX, and the
``ptxas`` that ships in the triton wheel assembles the cubin for any architecture, so each kernel
can be compiled here for sm_90 (H100 / H200) or sm_100 (B200).

What is compiled is what the launchers really launch: :func:`capture_launches` makes
``lumos_kernels._triton.jit`` hand out recorders, the ``*_triton`` ops run forward and backward on CPU
tensors shaped like a DiT layer's (:func:`dit_layer_launches`), and every recorded launch keeps
the argument types, the 16-byte divisibility and the ``1``-valued integers that Triton
specialises on at a real launch (:func:`arg_spec`). Nothing runs on the recorded tensors: the
outputs stay uninitialised. ``tools/compile_kernels.py`` is the command around this module.

Compiling needs triton imported *without* ``TRITON_INTERPRET=1`` (in its own process, see the
tool); capturing works in either mode.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lumos_kernels import _triton

__all__ = [
    "ARCH_NAMES",
    "CompileResult",
    "Launch",
    "access_widths",
    "arg_spec",
    "capture_launches",
    "compile_launch",
    "dit_layer_launches",
    "grid_error",
    "unique_launches",
]

# Compute capability -> the GPUs it is (for reports; any capability triton knows compiles).
ARCH_NAMES = {80: "A100", 89: "L40S", 90: "H100/H200", 100: "B200/GB200", 120: "RTX 50"}

_POINTER_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
}


def arg_spec(value: Any) -> tuple[str, Any]:
    """``(type, detail)`` of one kernel argument, as Triton specialises it at a launch.

    ``type`` is the signature string (``"*bf16"``, ``"i32"``, ``"fp32"``...) or ``"constexpr"``
    for the values Triton folds into the kernel (an integer equal to 1, ``None``); ``detail`` is
    then that value, else whether the argument is 16-divisible (pointers: the address; integers:
    the value), which lets the compiler vectorise loads and stores.
    """
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER_TYPES:
            raise TypeError(f"tensor argument of dtype {value.dtype} has no Triton pointer type")
        return "*" + _POINTER_TYPES[value.dtype], value.data_ptr() % 16 == 0
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        if -(2**31) <= value < 2**31:
            kind = "i32"
        elif -(2**63) <= value < 2**63:
            kind = "i64"
        else:
            kind = "u64"
        return kind, value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"kernel argument {value!r} ({type(value).__name__}) has no Triton type")


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: everything the compiler sees, and the grid."""

    kernel: str  # "adaln._fwd_kernel"
    grid: tuple[int, ...]
    signature: tuple[tuple[str, str], ...]  # (parameter, type) in parameter order
    constexprs: tuple[tuple[str, Any], ...]  # (parameter, value): declared and specialised ones
    divisible: tuple[str, ...]  # parameters the compiler may assume 16-divisible
    options: tuple[tuple[str, Any], ...]  # num_warps, num_stages, ...
    fn: Callable[..., Any] = field(compare=False, repr=False)

    @property
    def key(self) -> tuple[Any, ...]:
        """Identity for the compiler: two launches with one key compile to one binary."""
        return (self.kernel, self.signature, self.constexprs, self.divisible, self.options)

    @property
    def label(self) -> str:
        """The compile-time choices, e.g. ``RMS=False BLOCK_D=2048 num_warps=8``."""
        declared = _declared_constexprs(self.fn)
        parts = [f"{k}={v}" for k, v in self.constexprs if k in declared]
        parts += [f"{k}={v}" for k, v in self.options]
        return " ".join(parts)

    @property
    def unaligned(self) -> tuple[str, ...]:
        """Pointer / integer parameters the compiler may *not* assume 16-divisible: loads and
        stores through them cannot be vectorised to 16 bytes (e.g. head dim 72 rows)."""
        return tuple(
            name
            for name, kind in self.signature
            if kind not in ("constexpr", "fp32", "u1") and name not in self.divisible
        )


def _declared_constexprs(fn: Callable[..., Any]) -> set[str]:
    """Parameters annotated ``tl.constexpr`` (annotations are strings in the kernel modules)."""
    out = set()
    for p in inspect.signature(fn).parameters.values():
        if "constexpr" in str(p.annotation):
            out.add(p.name)
    return out


def _record(fn: Callable[..., Any], grid: Any, args: Sequence[Any], kwargs: dict) -> Launch:
    params = inspect.signature(fn).parameters
    names = list(params)
    options = {k: v for k, v in kwargs.items() if k not in params}
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    declared = _declared_constexprs(fn)
    signature, constexprs, divisible = [], [], []
    for name in names:
        if name not in bound.arguments:
            raise TypeError(f"{fn.__name__}: launch without a value for {name!r}")
        value = bound.arguments[name]
        if name in declared:
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
            continue
        kind, detail = arg_spec(value)
        signature.append((name, kind))
        if kind == "constexpr":
            constexprs.append((name, detail))
        elif detail:
            divisible.append(name)
    grid = tuple(int(g) for g in (grid if isinstance(grid, tuple | list) else (grid,)))
    module = fn.__module__.rsplit(".", 1)[-1]
    return Launch(
        kernel=f"{module}.{fn.__name__}",
        grid=grid,
        signature=tuple(signature),
        constexprs=tuple(constexprs),
        divisible=tuple(divisible),
        options=tuple(sorted(options.items())),
        fn=fn,
    )


class _Recorder:
    """Stands in for ``triton.jit(fn)`` while capturing: ``rec[grid](*args)`` records."""

    def __init__(self, fn: Callable[..., Any], sink: list[Launch]) -> None:
        self.fn = fn
        self.sink = sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append(_record(self.fn, grid, args, kwargs))

        return launch


@contextlib.contextmanager
def capture_launches(sm_count: int | None = None) -> Iterator[list[Launch]]:
    """Record every kernel launch made inside the block instead of running it.

    ``sm_count``: size the grids as on a GPU with that many streaming multiprocessors (132 on
    H100 SXM); the per-sample reductions split the tokens by it (``_triton.split_rows``).
    """
    if _triton._LAUNCH_HOOK is not None:
        raise RuntimeError("capture_launches() is already active (it does not nest)")
    if sm_count is not None and sm_count <= 0:
        raise ValueError(f"sm_count={sm_count} must be positive")
    sink: list[Launch] = []
    _triton._LAUNCH_HOOK = lambda fn: _Recorder(fn, sink)
    _triton._SM_COUNT = sm_count
    try:
        yield sink
    finally:
        _triton._LAUNCH_HOOK = None
        _triton._SM_COUNT = None


def unique_launches(launches: Sequence[Launch]) -> list[Launch]:
    """One launch per distinct binary, in first-seen order."""
    seen: dict[tuple[Any, ...], Launch] = {}
    for launch in launches:
        seen.setdefault(launch.key, launch)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# What a DiT layer launches
# ---------------------------------------------------------------------------------------------
def dit_layer_launches(
    hidden: int,
    heads: int,
    *,
    tokens: int,
    batch: int = 1,
    tp: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    norms: Sequence[str] = ("layernorm",),
    per_token: bool = True,
    sm_count: int = 132,
    device: torch.device | str = "meta",
) -> list[Launch]:
    """The launches of one DiT layer's fused ops, forward and backward, at this shape.

    ``tokens`` is the local sequence per sample; ``tp`` splits the attention heads (the norm and
    the residual see the full width, tokens split by sequence parallelism). The modulation is
    what the layer passes: chunks of the adaLN output ``[1, B, 6H]`` (one timestep per sample)
    and, with ``per_token``, of ``[S, B, 6H]`` (per-frame timesteps, e.g. a clean condition
    frame). q / k are the strided views megatron splits from the fused QKV projection.
    Grids are sized for ``sm_count`` SMs (132: H100 SXM). The tensors live on the ``meta``
    device by default: no memory at 128K tokens, and addresses are offsets from a 0 base, i.e.
    the alignment of views of a fresh CUDA allocation (256-byte aligned).
    """
    from lumos_kernels.adaln import norm_modulate_triton
    from lumos_kernels.residual import gated_residual_triton
    from lumos_kernels.rope3d import apply_rope3d_triton

    if heads % tp:
        raise ValueError(f"heads={heads} is not divisible by tp={tp}")
    s, b, h = tokens, batch, hidden
    head_dim, local_heads = hidden // heads, heads // tp

    def leaf(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dt, device=device).requires_grad_()

    def backward(out: torch.Tensor) -> None:
        out.backward(torch.empty_like(out))

    mods = [(leaf(1, b, 6 * h),)]
    if per_token:
        mods.append((leaf(s, b, 6 * h),))
    with capture_launches(sm_count) as launches:
        for (mod,) in mods:
            shift, scale, gate = mod.chunk(6, dim=-1)[:3]  # 3 x [1|s, b, h] strided views
            for norm in norms:
                backward(norm_modulate_triton(leaf(s, b, h), shift, scale, 1e-6, norm))
            for bias in (leaf(h), None):
                backward(gated_residual_triton(leaf(s, b, h), leaf(s, b, h), gate, bias))
        qkv = leaf(s, b, local_heads, 3 * head_dim)  # fused QKV: [s, b, np, 3 hn]
        freqs = torch.empty(s, head_dim // 2, dtype=torch.float32, device=device)
        backward(apply_rope3d_triton(qkv[..., :head_dim], freqs))  # q view [s, b, np, hn]
    return launches


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileResult:
    """One kernel compiled for one architecture. Sizes in bytes per thread block / thread."""

    launch: Launch
    arch: int
    registers: int | None = None  # per thread
    local_bytes: int | None = None  # per thread: register spills (0 is what we want)
    stack_bytes: int | None = None
    shared_bytes: int | None = None  # per program, what triton allocates
    cubin_bytes: int | None = None
    loads: tuple[tuple[int, int], ...] = ()  # (bits per access, instructions) of global loads
    stores: tuple[tuple[int, int], ...] = ()  # the same for global stores
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def spills(self) -> bool:
        return bool(self.local_bytes)


def _cuda_tool(name: str) -> str | None:
    """A CUDA binary (``cuobjdump``, ``ptxas``): triton's own copy first, then ``PATH``."""
    try:
        import triton.backends.nvidia as nv

        bundled = os.path.join(os.path.dirname(nv.__file__), "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    return shutil.which(name)


def ptxas_version() -> str | None:
    """``ptxas --version``'s release line, or None without ptxas."""
    ptxas = _cuda_tool("ptxas")
    if ptxas is None:
        return None
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    lines = [ln for ln in out.splitlines() if "release" in ln.lower()]
    return lines[-1].strip() if lines else out.strip().splitlines()[-1]


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


_GLOBAL_ACCESS = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)")
_WIDTH_SUFFIX = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def access_widths(sass: str) -> dict[str, tuple[tuple[int, int], ...]]:
    """``{"loads": ((bits, count), ...), "stores": ...}``, widest first, from SASS text.

    A memory-bound kernel should move 128 bits per global access; ``LDG.E.U16`` (16 bits)
    means the compiler could not prove the addresses aligned for vector access.
    """
    counts: dict[str, dict[int, int]] = {"LDG": {}, "STG": {}}
    for op, suffixes in _GLOBAL_ACCESS.findall(sass):
        bits = 32  # no width suffix: one 32-bit word
        for suffix in suffixes.split(".")[1:]:
            bits = _WIDTH_SUFFIX.get(suffix, bits)
        counts[op][bits] = counts[op].get(bits, 0) + 1
    return {
        "loads": tuple(sorted(counts["LDG"].items(), reverse=True)),
        "stores": tuple(sorted(counts["STG"].items(), reverse=True)),
    }


def _cuobjdump(cubin: bytes, flag: str) -> str | None:
    """``cuobjdump <flag>`` of a cubin (``-sass``, ``-res-usage``), or None without the tool."""
    tool = _cuda_tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, flag, path], capture_output=True, text=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int] | None:
    """``{"registers", "stack", "shared", "local"}`` read from the cubin by ``cuobjdump``."""
    out = _cuobjdump(cubin, "-res-usage")
    m = _RES.search(out) if out else None
    if m is None:
        return None
    reg, stack, shared, local = (int(g) for g in m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


# CUDA's grid limits: x up to 2**31 - 1 blocks, y and z up to 65535 (all architectures here).
_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def grid_error(grid: tuple[int, ...]) -> str | None:
    """Why a launch grid cannot run on a CUDA GPU (None when it can). The interpreter has no
    such limits, so a kernel that puts tokens on grid axis 1 passes on CPU and fails on a GPU
    at 64K tokens."""
    if not 1 <= len(grid) <= 3:
        return f"grid {grid}: CUDA grids have 1 to 3 dimensions"
    for axis, (n, limit) in enumerate(zip(grid, _GRID_LIMITS, strict=False)):
        if n > limit:
            return f"grid {grid}: axis {axis} has {n} programs, CUDA allows at most {limit}"
    return None


def _compilable(fn: Callable[..., Any]) -> Any:
    jitted = _triton.jit(fn)
    if type(jitted).__name__ != "JITFunction":
        raise RuntimeError(
            "triton was imported with TRITON_INTERPRET=1, which cannot compile; run the "
            "compilation in a process without it (python tools/compile_kernels.py)"
        )
    return jitted


def compile_launch(launch: Launch, arch: int) -> CompileResult:
    """Compile one recorded launch for compute capability ``arch`` (90 = sm_90); a compile
    error is returned in ``error`` (first lines of triton's message), not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jitted = _compilable(launch.fn)
    grid_problem = grid_error(launch.grid)
    if grid_problem:
        return CompileResult(launch, arch, error=grid_problem)
    names = [name for name, _ in launch.signature]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in launch.divisible}
    src = ASTSource(
        fn=jitted,
        signature=dict(launch.signature),
        constexprs=dict(launch.constexprs),
        attrs=attrs,
    )
    try:
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options)
        )
    except Exception as exc:  # triton raises CompilationError, RuntimeError, AssertionError...
        msg = " ".join(str(exc).split())
        return CompileResult(launch, arch, error=f"{type(exc).__name__}: {msg[:400]}")
    cubin = compiled.asm["cubin"]
    res = resource_usage(cubin) or {}
    sass = _cuobjdump(cubin, "-sass")
    widths = access_widths(sass) if sass else {"loads": (), "stores": ()}
    return CompileResult(
        launch,
        arch,
        registers=res.get("registers"),
        local_bytes=res.get("local"),
        stack_bytes=res.get("stack"),
        shared_bytes=int(getattr(compiled.metadata, "shared", 0) or res.get("shared", 0)),
        cubin_bytes=len(cubin),
        loads=widths["loads"],
        stores=widths["stores"],
    )

"""Ahead-of-time compilation of the kernels for GPUs that are not here (``lumos_kernels.aot``).

Capturing runs in this process (the recorders never touch triton); compiling needs triton in
compiler mode, which this folder's conftest turned off, so it runs in a subprocess through
``tools/compile_kernels.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lumos_kernels import _triton, aot
from lumos_kernels.adaln import norm_modulate_triton
from lumos_kernels.rope3d import apply_rope3d_triton

REPO = Path(__file__).resolve().parents[2]
KERNELS = {
    "adaln._fwd_kernel",
    "adaln._bwd_kernel",
    "residual._fwd_kernel",
    "residual._bwd_kernel",
    "rope3d._rope_kernel",
}


def _compiler_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_CACHE_DIR", str(Path(env.get("TMPDIR", "/tmp")) / "lumos_aot_cache"))
    return env


def test_arg_spec_matches_triton_launch_specialisation() -> None:
    """The recorded types / divisibility / folded constants are what triton derives at a real
    launch (its own specialiser, where this triton exposes it)."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("this triton has no native_specialize_impl to compare with")
    from triton.backends.compiler import BaseBackend

    base = torch.empty(64, dtype=torch.float32)
    values = [1, 16, 17, -3, 2**31, 2**40, 0.5, True, None, base, base[1:], base.bfloat16()]
    for value in values:
        kind, detail = aot.arg_spec(value)
        want_kind, want_detail = libtriton.native_specialize_impl(
            BaseBackend, value, False, True, True
        )
        assert kind == want_kind, value
        if kind == "constexpr":
            assert detail == want_detail
        else:
            assert detail == (want_detail == "D"), value


def test_arg_spec_refuses_what_triton_cannot_take() -> None:
    with pytest.raises(TypeError, match="complex"):
        aot.arg_spec(torch.empty(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="str"):
        aot.arg_spec("x")


def test_capture_records_the_launch_instead_of_running_it() -> None:
    x = torch.full((8, 2, 48), 3.0, dtype=torch.bfloat16, requires_grad=True)
    mod = torch.zeros(1, 2, 6 * 48, dtype=torch.bfloat16, requires_grad=True)
    shift, scale = mod.chunk(6, dim=-1)[:2]
    with aot.capture_launches(sm_count=2) as launches:
        y = norm_modulate_triton(x, shift, scale, 1e-6, "layernorm")
        assert [launch.kernel for launch in launches] == ["adaln._fwd_kernel"]
        y.backward(torch.ones_like(y))
    assert _triton._LAUNCH_HOOK is None and _triton._SM_COUNT is None
    fwd, bwd = launches
    assert bwd.kernel == "adaln._bwd_kernel"
    sig = dict(fwd.signature)
    assert sig["X"] == "*bf16" and sig["MEAN"] == "*fp32" and sig["eps"] == "fp32"
    assert sig["B"] == "i32" and sig["RMS"] == sig["BLOCK_D"] == "constexpr"
    assert dict(fwd.constexprs) == {"RMS": False, "BLOCK_D": 64}
    assert dict(fwd.options) == {"num_warps": 2}
    assert fwd.grid == (16,)  # one program per token row
    assert "D" in fwd.divisible and "B" not in fwd.divisible  # 48 yes, 2 no
    assert fwd.label == "RMS=False BLOCK_D=64 num_warps=2"
    # Grids of the per-sample reductions follow the SM count: 4 programs per SM over 2 samples.
    assert bwd.grid == (4, 2)
    # Batch 1 is folded into the kernel as triton does at a launch.
    with aot.capture_launches() as launches:
        norm_modulate_triton(x[:, :1], shift[:, :1], scale[:, :1], 1e-6, "rmsnorm")
    assert dict(launches[0].signature)["B"] == "constexpr"
    assert dict(launches[0].constexprs)["B"] == 1


def test_capture_sees_alignment_of_strided_views() -> None:
    """The q view of a fused QKV with head dim 72 has a row stride of 216 elements, which the
    compiler cannot assume 16-divisible; the rope launcher passes it in 8-element units with a
    constexpr head dim, so the alignment is provable. A view off by one element keeps the unit
    (the strides did not change) but loses the base pointer's 16-byte attribute."""
    qkv = torch.empty(4, 1, 2, 3 * 72, dtype=torch.bfloat16)
    freqs = torch.zeros(4, 36)
    with aot.capture_launches() as launches:
        apply_rope3d_triton(qkv[..., :72], freqs)
        apply_rope3d_triton(qkv[..., 1:73], freqs)  # 2-byte offset: misaligned base
    aligned, shifted = launches
    consts = dict(aligned.constexprs)
    assert consts["HD"] == 72 and consts["VEC"] == 8 and consts["P"] == 36
    assert dict(aligned.signature)["xv_stride_h"] == "i32"  # 216 / 8 = 27
    assert "X" in aligned.divisible and "X" in shifted.unaligned
    assert dict(aligned.constexprs)["SIGN"] == 1.0


def test_access_widths_read_from_sass() -> None:
    sass = """
        /*0090*/  LDG.E.128 R4, desc[UR6][R2.64] ;
        /*00a0*/  LDG.E.U16.CONSTANT R8, desc[UR6][R6.64] ;
        /*00b0*/  LDG.E R9, desc[UR6][R6.64+0x4] ;
        /*00c0*/  STG.E.128 desc[UR6][R10.64], R4 ;
        /*00d0*/  STG.E.U16 desc[UR6][R12.64], R8 ;
        /*00e0*/  LDG.E.128 R12, desc[UR6][R2.64+0x10] ;
    """
    assert aot.access_widths(sass) == {
        "loads": ((128, 2), (32, 1), (16, 1)),
        "stores": ((128, 1), (16, 1)),
    }


def test_grid_limits_of_cuda() -> None:
    assert aot.grid_error((2**31 - 1, 65535, 65535)) is None
    assert "axis 1 has 65536" in aot.grid_error((1, 65536))
    assert "1 to 3 dimensions" in aot.grid_error((1, 1, 1, 1))
    # The layer's launches at 128K tokens x batch 8 fit: tokens are on axis 0 everywhere.
    for launch in aot.dit_layer_launches(1152, 16, tokens=131072, batch=8, per_token=False):
        assert aot.grid_error(launch.grid) is None, (launch.kernel, launch.grid)


def test_capture_does_not_nest() -> None:
    outer = aot.capture_launches()
    outer.__enter__()
    try:
        with pytest.raises(RuntimeError, match="already active"), aot.capture_launches():
            pass
    finally:
        outer.__exit__(None, None, None)
    assert _triton._LAUNCH_HOOK is None
    with pytest.raises(ValueError, match="sm_count"), aot.capture_launches(sm_count=0):
        pass


def test_dit_layer_launches_cover_every_kernel_and_variant() -> None:
    launches = aot.dit_layer_launches(
        96, 4, tokens=64, batch=2, tp=2, norms=("layernorm", "rmsnorm")
    )
    unique = aot.unique_launches(launches)
    assert {launch.kernel for launch in unique} == KERNELS
    consts = [dict(launch.constexprs) for launch in unique]
    assert {c.get("PER_TOKEN") for c in consts} >= {True, False}
    assert {c.get("HAS_BIAS") for c in consts} >= {True, False}
    assert {c.get("RMS") for c in consts} >= {True, False}
    assert {c.get("SIGN") for c in consts} >= {1.0, -1.0}
    assert len(unique) < len(launches)  # q-style forward/backward repeats collapse
    rope = next(launch for launch in unique if launch.kernel == "rope3d._rope_kernel")
    assert dict(rope.signature)["X"] == "*bf16"
    assert rope.grid[0] == 64  # one program per token
    with pytest.raises(ValueError, match="tp=3"):
        aot.dit_layer_launches(96, 4, tokens=8, tp=3)


def test_compile_reports_a_kernel_that_does_not_compile(tmp_path: Path) -> None:
    """A kernel the interpreter would run (Python semantics) but the compiler refuses: a block
    size that is not a power of two. The error comes back in the result, named."""
    pytest.importorskip("triton")
    (tmp_path / "bad_kernels.py").write_text(
        textwrap.dedent(
            """
            from __future__ import annotations
            from typing import Any
            tl: Any = None

            def odd_block(X, N, BLOCK: tl.constexpr):
                offs = tl.arange(0, BLOCK)
                tl.store(X + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)
            """
        )
    )
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import bad_kernels
        from lumos_kernels import _triton, aot
        with aot.capture_launches() as launches:
            _triton.jit(bad_kernels.odd_block)[(1,)](torch.empty(8), 6, BLOCK=6)
        res = aot.compile_launch(launches[0], 90)
        assert not res.ok and res.registers is None
        print("ERROR:", res.error)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=_compiler_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR:" in proc.stdout and "power of 2" in proc.stdout.lower().replace("two", "2")


def test_every_kernel_compiles_for_hopper_and_blackwell_without_spills(tmp_path: Path) -> None:
    """The real launches of a Lumos-XL/2 layer (width 1152, head dim 72) compile to sm_90 and
    sm_100 cubins with the triton wheel's ptxas, and none spills registers to local memory."""
    pytest.importorskip("triton")
    out_md, out_json = tmp_path / "kernels.md", tmp_path / "kernels.json"
    cmd = [
        sys.executable, str(REPO / "tools" / "compile_kernels.py"),
        "--models", "Lumos-XL/2", "--tp", "1,8", "--archs", "90,100", "--tokens", "1024",
        "--out", str(out_md), "--json", str(out_json), "--fail-on-spill",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_compiler_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out_json.read_text())
    assert {r["kernel"] for r in rows} == KERNELS
    assert {r["arch"] for r in rows} == {90, 100}
    for r in rows:
        assert r["ok"], r
        assert r["registers"] is not None and 0 < r["registers"] <= 255, r
        assert r["local_bytes"] == 0, r  # no spills
        assert r["cubin_bytes"] > 0
        # Memory-bound kernels: the activations move in 16-byte accesses (head dim 72 included).
        assert dict(map(tuple, r["loads"])).get(128, 0) > 0, r
        assert dict(map(tuple, r["stores"])).get(128, 0) > 0, r
        assert 16 not in dict(map(tuple, r["loads"])), r  # no 2-byte scalar accesses left
    tp8_rope = [
        r
        for r in rows
        if r["kernel"] == "rope3d._rope_kernel" and ["Lumos-XL/2", 8] in r["used_by"]
    ]
    assert tp8_rope and all("BLOCK_R=2" in r["variant"] for r in tp8_rope)  # 2 local heads
    text = out_md.read_text()
    assert f"**{len(rows)} binaries: {len(rows)} compiled, 0 failed, 0 spill.**" in text
    assert "sm_90 (H100/H200)" in text and "ptxas: " in text


def test_tool_refuses_bad_flags() -> None:
    env = _compiler_env()
    tool = str(REPO / "tools" / "compile_kernels.py")
    for flags, msg in [
        (["--models", "2048x15"], "not divisible by 15 heads"),
        (["--models", "Lumos-Huge/2"], "WIDTHxHEADS"),
        (["--archs", "nine"], "--archs"),
        (["--norms", "batchnorm"], "choose from layernorm, rmsnorm"),
    ]:
        proc = subprocess.run(
            [sys.executable, tool, *flags], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode != 0 and msg in proc.stderr, (flags, proc.stderr[-2000:])

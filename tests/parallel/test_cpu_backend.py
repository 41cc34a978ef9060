"""megatron-core's real distributed code on gloo vs single-process torch references.

Two spawned 2-rank jobs keep this file fast: one at TP=2 (parallel linears with and without
sequence parallelism, the RNG tracker, activation recompute, a local-spec TransformerBlock,
dist_checkpointing save at TP=2 / load at TP=1) and one at PP=2 then DP=2 (1F1B and
interleaved pipeline schedules, megatron DDP, the distributed optimizer). Each job returns tensors; the
comparisons against plain torch run here, in the test process.
"""

from __future__ import annotations

import importlib
import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from lumos_mcore.parallel.cpu_backend import PATCH_TARGETS, resolve_target
from tests.dist_utils import run_distributed

H, FFN, S, B = 8, 16, 8, 2  # hidden, ffn, sequence, micro-batch
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _guard(fn, *args: Any) -> Any:
    """Run one check inside a rank; a failure becomes a reported traceback, not a hang."""
    try:
        return fn(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def _ok(part: Any) -> Any:
    if isinstance(part, dict) and "error" in part:
        pytest.fail(part["error"])
    return part


# ----------------------------------------------------------------------------- references


def _mlp_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(FFN, H, generator=g) * 0.3,
        "b1": torch.randn(FFN, generator=g) * 0.1,
        "w2": torch.randn(H, FFN, generator=g) * 0.3,
        "b2": torch.randn(H, generator=g) * 0.1,
        "x": torch.randn(S, B, H, generator=g),  # [s, b, h]
        "dy": torch.randn(S, B, H, generator=g),  # upstream gradient
    }


def _mlp_reference() -> dict[str, torch.Tensor]:
    """Single-process Linear -> GELU -> Linear with the same weights: output and grads."""
    w = _mlp_weights()
    fc1, fc2 = torch.nn.Linear(H, FFN), torch.nn.Linear(FFN, H)
    with torch.no_grad():
        fc1.weight.copy_(w["w1"]), fc1.bias.copy_(w["b1"])
        fc2.weight.copy_(w["w2"]), fc2.bias.copy_(w["b2"])
    x = w["x"].clone().requires_grad_(True)
    y = fc2(torch.nn.functional.gelu(fc1(x)))  # [s, b, h]
    y.backward(w["dy"])
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dw1": fc1.weight.grad,
        "db1": fc1.bias.grad,
        "dw2": fc2.weight.grad,
        "db2": fc2.bias.grad,
    }


# ------------------------------------------------------------------------- TP=2 job (rank)


def _tp_mlp(sp: bool, tp: int, rank: int):
    """Column -> GELU -> Row parallel MLP holding this rank's shards of ``_mlp_weights``."""
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.module import MegatronModule

    cfg = ModelParallelConfig(
        tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True
    )

    class TPMLP(MegatronModule):
        def __init__(self) -> None:
            super().__init__(config=cfg)
            init = torch.nn.init.zeros_
            self.fc1 = ColumnParallelLinear(
                H, FFN, config=cfg, init_method=init, bias=True, gather_output=False
            )
            self.fc2 = RowParallelLinear(
                FFN, H, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                skip_bias_add=False,
            )  # fmt: skip

        def forward(self, x: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            h, _ = self.fc1(x)  # [s, b, ffn/tp]
            h = torch.nn.functional.gelu(h)
            if dropout:
                with get_cuda_rng_tracker().fork():  # per-TP-rank stream, as megatron does
                    h = torch.nn.functional.dropout(h, dropout, training=True)
            y, _ = self.fc2(h)  # [s, b, h] (or [s/tp, b, h] under SP)
            return y

    model = TPMLP()
    w, k = _mlp_weights(), FFN // tp
    with torch.no_grad():
        model.fc1.weight.copy_(w["w1"][rank * k : (rank + 1) * k])
        model.fc1.bias.copy_(w["b1"][rank * k : (rank + 1) * k])
        model.fc2.weight.copy_(w["w2"][:, rank * k : (rank + 1) * k])
        model.fc2.bias.copy_(w["b2"])
    return model


def _check_tp_linears(rank: int, sp: bool) -> dict[str, torch.Tensor]:
    model = _tp_mlp(sp, 2, rank)
    w = _mlp_weights()
    shard = slice(rank * S // 2, (rank + 1) * S // 2)
    x = (w["x"][shard] if sp else w["x"]).clone().requires_grad_(True)  # [s(/tp), b, h]
    y = model(x)
    y.backward(w["dy"][shard] if sp else w["dy"])
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dw1": model.fc1.weight.grad,
        "db1": model.fc1.bias.grad,
        "dw2": model.fc2.weight.grad,
        "db2": model.fc2.bias.grad,
    }


def _check_rng_tracker(rank: int) -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    default = torch.rand(4)  # data-parallel stream: same seed on every rank
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(4)  # model-parallel stream: differs per TP rank
    after = torch.rand(4)  # default stream continues as if the fork never happened
    torch.manual_seed(0)
    return {"default": default, "forked": forked, "after": after}


def _check_recompute(rank: int) -> dict[str, Any]:
    """tensor_parallel.checkpoint with TP dropout: same output and grads as no recompute."""
    from megatron.core import tensor_parallel

    model = _tp_mlp(False, 2, rank)
    w = _mlp_weights()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    cpu_state, tracker_states = torch.get_rng_state(), tracker.get_states()

    def run(mode: str) -> list[torch.Tensor]:
        torch.set_rng_state(cpu_state)
        tracker.set_states(dict(tracker_states))  # set_states keeps the dict it is given
        model.zero_grad()
        x = w["x"].clone().requires_grad_(True)

        def fn(inp: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.dropout(model(inp, dropout=0.5), 0.3, training=True)

        if mode == "plain":
            y = fn(x)
        else:
            y = tensor_parallel.checkpoint(fn, mode == "distributed", x)
        y.backward(w["dy"])
        return [y.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]

    plain = run("plain")
    return {
        "plain": plain,
        "recompute": run("recompute"),
        "distributed": run("distributed"),
        "plain_again": run("plain"),
    }


def _transformer_block(sp: bool, dropout: float):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=H,
        num_attention_heads=4,
        ffn_hidden_size=FFN,
        tensor_model_parallel_size=2,
        sequence_parallel=sp,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        use_cpu_initialization=True,
    )
    torch.manual_seed(7)  # CPU init draws from the default generator: same on both blocks
    return TransformerBlock(cfg, get_gpt_layer_local_spec())


def _check_block(rank: int) -> dict[str, Any]:
    """Local-spec TransformerBlock at TP=2: full recompute == none; SP == no SP."""
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    g = torch.Generator().manual_seed(3)
    x_full, dy_full = torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    cpu_state, tracker_states = torch.get_rng_state(), tracker.get_states()

    def run(block, sp: bool) -> list[torch.Tensor]:
        torch.set_rng_state(cpu_state)
        tracker.set_states(dict(tracker_states))  # set_states keeps the dict it is given
        shard = slice(rank * S // 2, (rank + 1) * S // 2) if sp else slice(None)
        x = x_full[shard].clone().requires_grad_(True)  # [s(/tp), b, h]
        y = block(x, attention_mask=None)
        y.backward(dy_full[shard])
        grads = []
        for p in block.parameters():
            grad = p.grad.clone()
            if getattr(p, "sequence_parallel", False):  # what finalize_model_grads does
                dist.all_reduce(grad)
            grads.append(grad)
        return [y.detach(), x.grad, *grads]

    out: dict[str, Any] = {}
    block = _transformer_block(sp=False, dropout=0.2)
    block.train()
    out["no_recompute"] = run(block, sp=False)
    rc = _transformer_block(sp=False, dropout=0.2)
    rc.config.recompute_granularity = "full"
    rc.config.recompute_method = "uniform"
    rc.config.recompute_num_layers = 1
    rc.load_state_dict(block.state_dict())
    rc.train()
    out["recompute"] = run(rc, sp=False)

    dense = _transformer_block(sp=False, dropout=0.0)
    seqp = _transformer_block(sp=True, dropout=0.0)
    seqp.load_state_dict(dense.state_dict())
    out["sp_norm_marked"] = all(
        getattr(p, "sequence_parallel", False)
        for n, p in seqp.named_parameters()
        if "layernorm" in n
    )
    out["no_sp"] = run(dense, sp=False)
    out["sp"] = run(seqp, sp=True)
    return out


def _check_dist_checkpoint(rank: int, ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Save the TP=2 MLP with dist_checkpointing, reload into a TP=1 MLP (world of 2)."""
    from megatron.core import dist_checkpointing

    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel import initialize_parallel

    model = _tp_mlp(False, 2, rank)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)

    initialize_parallel(ParallelConfig(tp=1), num_attention_heads=4, num_layers=2)
    fresh = _tp_mlp(False, 1, 0)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir)
    fresh.load_state_dict(loaded)
    return {n: p.detach().clone() for n, p in fresh.named_parameters()}


def _tp_job(rank: int, world_size: int, ckpt_dir: str) -> dict[str, Any]:
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel import cpu_backend_active, initialize_parallel

    info = initialize_parallel(ParallelConfig(tp=2), num_attention_heads=4, num_layers=2)
    out: dict[str, Any] = {"info": info, "active": cpu_backend_active()}
    out["threads"] = torch.get_num_threads()
    out["rng"] = _guard(_check_rng_tracker, rank)
    out["linears"] = _guard(_check_tp_linears, rank, False)
    out["linears_sp"] = _guard(_check_tp_linears, rank, True)
    out["recompute"] = _guard(_check_recompute, rank)
    out["block"] = _guard(_check_block, rank)
    out["ckpt"] = _guard(_check_dist_checkpoint, rank, ckpt_dir)  # last: re-inits at TP=1
    return out


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    ckpt = tmp_path_factory.mktemp("tp2_ckpt")
    return run_distributed(_tp_job, 2, str(ckpt), timeout=180)


def test_cpu_backend_active_and_layout(tp_results: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(tp_results):
        assert res["active"] is (not torch.cuda.is_available())
        info = res["info"]
        assert (info.rank, info.tp_rank, info.tp_size, info.dp_size) == (rank, rank, 2, 1)
        # init_distributed shares the cores among the local ranks
        assert res["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)


def test_rng_tracker_streams(tp_results: list[dict[str, Any]]) -> None:
    r0, r1 = (_ok(r["rng"]) for r in tp_results)
    _close(r0["default"], r1["default"], "data-parallel stream equal on TP ranks")
    assert not torch.allclose(r0["forked"], r1["forked"]), "model-parallel stream must differ"
    g = torch.Generator().manual_seed(1234)  # initialize_parallel's default seed
    expected = torch.rand(8, generator=g)
    _close(torch.cat([r0["default"], r0["after"]]), expected, "fork leaves default stream")


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_column_row_linear_matches_torch(tp_results: list[dict[str, Any]], sp: bool) -> None:
    ref = _mlp_reference()
    r0, r1 = (_ok(r["linears_sp" if sp else "linears"]) for r in tp_results)
    cat = torch.cat
    if sp:  # output and input grad are sequence shards; row bias grads are partial sums
        _close(cat([r0["y"], r1["y"]]), ref["y"], "output")
        _close(cat([r0["dx"], r1["dx"]]), ref["dx"], "input grad")
        _close(r0["db2"] + r1["db2"], ref["db2"], "row bias grad")
    else:
        for r in (r0, r1):
            _close(r["y"], ref["y"], "output")
            _close(r["dx"], ref["dx"], "input grad")
            _close(r["db2"], ref["db2"], "row bias grad")
    _close(cat([r0["dw1"], r1["dw1"]]), ref["dw1"], "column weight grad")
    _close(cat([r0["db1"], r1["db1"]]), ref["db1"], "column bias grad")
    _close(cat([r0["dw2"], r1["dw2"]], dim=1), ref["dw2"], "row weight grad")


def test_checkpoint_recompute_matches_no_recompute(tp_results: list[dict[str, Any]]) -> None:
    for res in tp_results:
        r = _ok(res["recompute"])
        for mode in ("recompute", "distributed", "plain_again"):
            for i, (a, b) in enumerate(zip(r[mode], r["plain"])):
                _close(a, b, f"{mode} tensor {i}")
        # dropout was active: the output is not the dropout-free MLP
        assert (r["plain"][0] == 0).any()


def test_transformer_block_full_recompute_and_sp(tp_results: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(tp_results):
        r = _ok(res["block"])
        assert len(r["recompute"]) == len(r["no_recompute"]) > 4
        for i, (a, b) in enumerate(zip(r["recompute"], r["no_recompute"])):
            _close(a, b, f"rank {rank} recompute='full' tensor {i}")
        assert r["sp_norm_marked"], "SP norm params must carry sequence_parallel=True"
    # SP: output / input grads are sequence shards of the no-SP run; param grads equal.
    sp = [_ok(r["block"])["sp"] for r in tp_results]
    no_sp = _ok(tp_results[0]["block"])["no_sp"]
    _close(torch.cat([sp[0][0], sp[1][0]]), no_sp[0], "SP block output")
    _close(torch.cat([sp[0][1], sp[1][1]]), no_sp[1], "SP block input grad")
    for rank, res in enumerate(tp_results):
        for i, (a, b) in enumerate(zip(sp[rank][2:], _ok(res["block"])["no_sp"][2:])):
            _close(a, b, f"rank {rank} SP param grad {i}")


def test_dist_checkpoint_tp2_save_tp1_load(tp_results: list[dict[str, Any]]) -> None:
    w = _mlp_weights()
    expected = {
        "fc1.weight": w["w1"],
        "fc1.bias": w["b1"],
        "fc2.weight": w["w2"],
        "fc2.bias": w["b2"],
    }
    for res in tp_results:
        loaded = _ok(res["ckpt"])
        assert set(loaded) == set(expected)
        for name, tensor in expected.items():
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


# -------------------------------------------------------------------- PP=2 / DP=2 job (rank)

NUM_MB = 4


def _pp_data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(11)
    return {
        "w": [torch.randn(H, H, generator=g) * 0.5 for _ in range(2)],
        "b": [torch.randn(H, generator=g) * 0.1 for _ in range(2)],
        "x": [torch.randn(S, B, H, generator=g) for _ in range(NUM_MB)],  # [s, b, h]
        "y": [torch.randn(S, B, H, generator=g) for _ in range(NUM_MB)],
    }


def _pp_reference() -> dict[str, Any]:
    d = _pp_data()
    fcs = [torch.nn.Linear(H, H) for _ in range(2)]
    with torch.no_grad():
        for fc, w, b in zip(fcs, d["w"], d["b"]):
            fc.weight.copy_(w), fc.bias.copy_(b)
    losses = []
    for x, y in zip(d["x"], d["y"]):
        out = torch.tanh(fcs[1](torch.tanh(fcs[0](x))))  # [s, b, h]
        loss = ((out - y) ** 2).mean()
        (loss / NUM_MB).backward()
        losses.append(loss.detach())
    return {"losses": losses, "grads": [[fc.weight.grad, fc.bias.grad] for fc in fcs]}


def _check_pp(rank: int) -> dict[str, Any]:
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=H,
        num_attention_heads=1,
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )

    class Stage(MegatronModule):
        def __init__(self) -> None:
            super().__init__(config=cfg)
            self.fc = torch.nn.Linear(H, H)
            self.model_type = ModelType.encoder_or_decoder
            self.input_tensor: torch.Tensor | None = None

        def set_input_tensor(self, t: Any) -> None:
            self.input_tensor = t[0] if isinstance(t, list) else t

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inp = x if rank == 0 else self.input_tensor  # [s, b, h]
            return torch.tanh(self.fc(inp))

    d = _pp_data()
    model = Stage()
    with torch.no_grad():
        model.fc.weight.copy_(d["w"][rank]), model.fc.bias.copy_(d["b"][rank])

    def forward_step(data_iterator, model):
        x, y = next(data_iterator)
        out = model(x)

        def loss_func(output: torch.Tensor):
            loss = ((output - y) ** 2).mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

        return out, loss_func

    fb = get_forward_backward_func()
    store = fb(
        forward_step_func=forward_step,
        data_iterator=iter(list(zip(d["x"], d["y"]))),
        model=[model],
        num_microbatches=NUM_MB,
        seq_length=S,
        micro_batch_size=B,
    )
    return {
        "schedule": fb.__name__,
        "losses": [s["loss"] for s in store],
        "grads": [model.fc.weight.grad, model.fc.bias.grad],
    }


def _vpp_data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(13)
    return {
        "w": [torch.randn(H, H, generator=g) * 0.5 for _ in range(4)],  # 4 virtual stages
        "x": [torch.randn(S, B, H, generator=g) for _ in range(NUM_MB)],  # [s, b, h]
        "y": [torch.randn(S, B, H, generator=g) for _ in range(NUM_MB)],
    }


def _vpp_reference() -> dict[str, Any]:
    d = _vpp_data()
    ws = [w.clone().requires_grad_(True) for w in d["w"]]
    losses = []
    for x, y in zip(d["x"], d["y"]):
        h = x
        for w in ws:
            h = torch.tanh(h @ w.T)  # [s, b, h]
        loss = ((h - y) ** 2).mean()
        (loss / NUM_MB).backward()
        losses.append(loss.detach())
    return {"losses": losses, "grads": [w.grad for w in ws]}


def _check_pp_interleaved(rank: int) -> dict[str, Any]:
    """Interleaved 1F1B, PP=2 x VPP=2, default batch_p2p_comm=True (prev == next rank)."""
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=4,
        hidden_size=H,
        num_attention_heads=1,
        pipeline_model_parallel_size=2,
        virtual_pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    assert cfg.batch_p2p_comm
    d = _vpp_data()

    class Chunk(MegatronModule):
        def __init__(self, stage: int) -> None:
            super().__init__(config=cfg)
            self.stage, self.model_type = stage, ModelType.encoder_or_decoder
            self.fc = torch.nn.Linear(H, H, bias=False)
            with torch.no_grad():
                self.fc.weight.copy_(d["w"][stage])

        def set_input_tensor(self, t: Any) -> None:
            self.input_tensor = t[0] if isinstance(t, list) else t

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.fc(x if self.stage == 0 else self.input_tensor))  # [s, b, h]

    chunks = [Chunk(c * 2 + rank) for c in range(2)]  # virtual stage = chunk * pp + rank

    def forward_step(data_iterator, model):
        x, y = next(data_iterator)
        out = model(x)
        return out, lambda o: (((o - y) ** 2).mean(), {"loss": ((o - y) ** 2).mean().detach()})

    fb = get_forward_backward_func()
    store = fb(
        forward_step_func=forward_step,
        data_iterator=[iter(list(zip(d["x"], d["y"]))) for _ in chunks],
        model=chunks,
        num_microbatches=NUM_MB,
        seq_length=S,
        micro_batch_size=B,
    )
    return {
        "schedule": fb.__name__,
        "losses": [s["loss"] for s in store],
        "grads": {c.stage: c.fc.weight.grad for c in chunks},
    }


def _dp_data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    return {
        "w1": torch.randn(FFN, H, generator=g) * 0.4,
        "b1": torch.randn(FFN, generator=g) * 0.1,
        "w2": torch.randn(4, FFN, generator=g) * 0.4,
        "b2": torch.randn(4, generator=g) * 0.1,
        "x": [torch.randn(8, H, generator=g) for _ in range(2)],  # two steps, full batch 8
        "y": [torch.randn(8, 4, generator=g) for _ in range(2)],
    }


def _dp_torch_module() -> torch.nn.Module:
    d = _dp_data()
    m = torch.nn.Sequential(torch.nn.Linear(H, FFN), torch.nn.Tanh(), torch.nn.Linear(FFN, 4))
    with torch.no_grad():
        m[0].weight.copy_(d["w1"]), m[0].bias.copy_(d["b1"])
        m[2].weight.copy_(d["w2"]), m[2].bias.copy_(d["b2"])
    return m


ADAM = {"lr": 0.05, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "clip": 0.5}


def _dp_reference() -> dict[str, Any]:
    """Full-batch grads of step 1, and params after two clipped AdamW steps."""
    d, m = _dp_data(), _dp_torch_module()
    decay = [p for p in m.parameters() if p.dim() > 1]
    no_decay = [p for p in m.parameters() if p.dim() == 1]  # megatron: no wd on biases
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=ADAM["lr"], betas=ADAM["betas"], eps=ADAM["eps"], weight_decay=ADAM["weight_decay"],
    )  # fmt: skip
    grads, norms = None, []
    for x, y in zip(d["x"], d["y"]):
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        if grads is None:
            grads = [p.grad.clone() for p in m.parameters()]
        norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), ADAM["clip"])))
        opt.step()
    return {"grads": grads, "norms": norms, "params": [p.detach() for p in m.parameters()]}


def _megatron_ddp(use_distributed_optimizer: bool, overlap: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1)

    class Net(MegatronModule):
        def __init__(self) -> None:
            super().__init__(config=cfg)
            self.net = _dp_torch_module()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)  # [b, 4]

    ddp_cfg = DistributedDataParallelConfig(
        overlap_grad_reduce=overlap,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=40 if overlap else None,  # several buckets: exercises async bucketing
    )
    return DistributedDataParallel(cfg, ddp_cfg, Net())


def _check_ddp(rank: int, overlap: bool) -> list[torch.Tensor]:
    d = _dp_data()
    model = _megatron_ddp(False, overlap)
    half = slice(rank * 4, (rank + 1) * 4)
    model.zero_grad_buffer()
    ((model(d["x"][0][half]) - d["y"][0][half]) ** 2).mean().backward()
    model.finish_grad_sync()
    return [p.main_grad.clone() for p in model.module.parameters()]


def _check_distributed_optimizer(rank: int, overlap: bool) -> dict[str, Any]:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    d = _dp_data()
    model = _megatron_ddp(True, overlap)
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=ADAM["lr"],
            weight_decay=ADAM["weight_decay"],
            adam_beta1=ADAM["betas"][0],
            adam_beta2=ADAM["betas"][1],
            adam_eps=ADAM["eps"],
            clip_grad=ADAM["clip"],
            use_distributed_optimizer=True,
        ),
        [model],
    )
    # megatron keeps wd_mult per group and leaves applying it to its lr/wd scheduler
    for group in opt.param_groups:
        group["weight_decay"] = ADAM["weight_decay"] * group["wd_mult"]
    half = slice(rank * 4, (rank + 1) * 4)
    norms = []
    for x, y in zip(d["x"], d["y"]):
        model.zero_grad_buffer()
        opt.zero_grad()
        ((model(x[half]) - y[half]) ** 2).mean().backward()
        model.finish_grad_sync()
        ok, norm, _ = opt.step()
        assert ok
        norms.append(norm)
    inner = getattr(opt, "chained_optimizers", [opt])  # one per param-group kind
    return {
        "types": sorted({type(o).__name__ for o in inner}),
        "norms": norms,
        "params": [p.detach().clone() for p in model.module.parameters()],
    }


def _pp_dp_job(rank: int, world_size: int) -> dict[str, Any]:
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel import initialize_parallel

    out: dict[str, Any] = {}
    info = initialize_parallel(ParallelConfig(pp=2), num_attention_heads=4, num_layers=2)
    out["pp_info"] = info
    out["pp"] = _guard(_check_pp, rank)
    initialize_parallel(ParallelConfig(pp=2, vpp=2), num_attention_heads=4, num_layers=4)
    out["vpp"] = _guard(_check_pp_interleaved, rank)
    info = initialize_parallel(ParallelConfig(), num_attention_heads=4, num_layers=2)
    out["dp_info"] = info
    out["ddp"] = _guard(_check_ddp, rank, False)
    out["ddp_overlap"] = _guard(_check_ddp, rank, True)
    out["distopt"] = _guard(_check_distributed_optimizer, rank, False)
    out["distopt_overlap"] = _guard(_check_distributed_optimizer, rank, True)
    return out


@pytest.fixture(scope="module")
def pp_dp_results() -> list[dict[str, Any]]:
    return run_distributed(_pp_dp_job, 2, timeout=180)


def test_pp2_1f1b_matches_single_process(pp_dp_results: list[dict[str, Any]]) -> None:
    ref = _pp_reference()
    r0, r1 = (_ok(r["pp"]) for r in pp_dp_results)
    assert pp_dp_results[1]["pp_info"].is_last_stage and pp_dp_results[0]["pp_info"].is_first_stage
    assert r0["schedule"] == "forward_backward_pipelining_without_interleaving"
    assert r0["losses"] == []  # only the last stage computes the loss
    _close(torch.stack(r1["losses"]), torch.stack(ref["losses"]), "microbatch losses")
    for stage, r in enumerate((r0, r1)):
        for g, ref_g in zip(r["grads"], ref["grads"][stage]):
            _close(g, ref_g, f"stage {stage} grad")


def test_pp2_vpp2_interleaved_matches_single_process(pp_dp_results: list[dict[str, Any]]):
    ref = _vpp_reference()
    r0, r1 = (_ok(r["vpp"]) for r in pp_dp_results)
    assert r0["schedule"] == "forward_backward_pipelining_with_interleaving"
    _close(torch.stack(r1["losses"]), torch.stack(ref["losses"]), "microbatch losses")
    grads = {**r0["grads"], **r1["grads"]}
    for stage in range(4):
        _close(grads[stage], ref["grads"][stage], f"virtual stage {stage} grad")


@pytest.mark.parametrize("key", ["ddp", "ddp_overlap"])
def test_megatron_ddp_dp2_matches_full_batch(pp_dp_results: list[dict[str, Any]], key: str):
    ref = _dp_reference()["grads"]
    for rank, res in enumerate(pp_dp_results):
        assert res["dp_info"].dp_size == 2
        grads = _ok(res[key])
        assert len(grads) == len(ref)
        for g, ref_g in zip(grads, ref):
            _close(g, ref_g, f"rank {rank} {key} grad")


@pytest.mark.parametrize("key", ["distopt", "distopt_overlap"])
def test_distributed_optimizer_matches_torch_adamw(
    pp_dp_results: list[dict[str, Any]], key: str
) -> None:
    ref = _dp_reference()
    for rank, res in enumerate(pp_dp_results):
        r = _ok(res[key])
        assert r["types"] == ["DistributedOptimizer"]
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-5)
        assert min(ref["norms"]) > ADAM["clip"]  # clipping was exercised
        for p, ref_p in zip(r["params"], ref["params"]):
            _close(p, ref_p, f"rank {rank} param after 2 steps")


# ----------------------------------------------------------------------- patch target check


@pytest.mark.parametrize("target", PATCH_TARGETS)
def test_patch_target_resolves(target: str) -> None:
    """Fails loudly if megatron-core renamed or removed a symbol the CPU backend patches."""
    obj = resolve_target(target)
    module_name, _, qualname = target.partition(":")
    if qualname == "torch":  # the module must still use torch.cuda through its global `torch`
        src = Path(importlib.import_module(module_name).__file__).read_text()
        assert "torch.cuda" in src or 'device="cuda"' in src or "device='cuda'" in src
    else:
        assert callable(obj)

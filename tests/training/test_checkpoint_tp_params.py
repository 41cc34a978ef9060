"""Per-head parameters of the DiT's own modules survive a distributed checkpoint under TP.

The tanh gate of the gated cross-attention has one entry per attention head, split over the
tensor-parallel ranks like the heads. Saved at TP=2, it must come back on every rank as that
rank's heads, and as all heads at TP=1 (megatron's resharding on load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.dist_utils import run_distributed

MODEL = dict(
    name="Lumos-Tiny/2", latent_size=4, cond_tokens=4, cond_channels=16, cross_attn_gate=True
)
GATE = "decoder.layers.{}.cross_attention.core_attention.gate"


def _gates(model, depth: int) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    return [params[GATE.format(i)].detach().clone() for i in range(depth)]


def _save_or_load(rank: int, world: int, path: str, mode: str) -> list[torch.Tensor]:
    from megatron.core import dist_checkpointing, parallel_state

    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.checkpoint import _model_sharded_state_dict
    from lumos_mcore.training.setup import build_model, unwrap

    mcfg, pcfg = ModelConfig(**MODEL), ParallelConfig(tp=world)
    initialize_parallel(pcfg, num_attention_heads=mcfg.num_heads_, num_layers=mcfg.depth_, seed=3)
    chunks, _ = build_model(mcfg, pcfg, seed=3)
    model = unwrap(chunks[0])
    heads = mcfg.num_heads_ // world
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for i, gate in enumerate(_gates(model, mcfg.depth_)):
            p = dict(model.named_parameters())[GATE.format(i)]
            if mode == "save":  # global head h of layer i holds 100 * i + h + 1
                first = tp_rank * heads
                p.copy_(100 * i + 1 + torch.arange(first, first + heads, dtype=gate.dtype))
            else:
                p.zero_()
    if mode == "save":
        dist_checkpointing.save(_model_sharded_state_dict(chunks), path)
    else:
        loaded = dist_checkpointing.load(_model_sharded_state_dict(chunks), path)
        model.load_state_dict(loaded["model"], strict=True)
    return _gates(model, mcfg.depth_)


def test_gate_saved_at_tp2_loads_per_rank_and_resharded_to_tp1(tmp_path: Path) -> None:
    from lumos_mcore.config.model import ModelConfig

    cfg = ModelConfig(**MODEL)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    saved = run_distributed(_save_or_load, 2, str(ckpt), "save", timeout=300)
    full = [
        100 * i + 1 + torch.arange(cfg.num_heads_, dtype=saved[0][0].dtype)
        for i in range(cfg.depth_)
    ]
    half = cfg.num_heads_ // 2
    for rank, gates in enumerate(saved):  # what was set on each rank before the save
        for i, g in enumerate(gates):
            assert torch.equal(g, full[i][rank * half : (rank + 1) * half])

    back = run_distributed(_save_or_load, 2, str(ckpt), "load", timeout=300)
    for rank, gates in enumerate(back):  # each rank gets its own heads back, not rank 0's
        for i, g in enumerate(gates):
            assert torch.equal(g, full[i][rank * half : (rank + 1) * half])

    ((one,),) = [run_distributed(_save_or_load, 1, str(ckpt), "load", timeout=300)]
    for i, g in enumerate(one):
        assert torch.equal(g, full[i])

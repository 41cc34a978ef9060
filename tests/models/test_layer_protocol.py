"""The DiT layer meets megatron's layer protocol: it is a ``TransformerLayer`` to megatron.

From megatron-core 0.19 the full-recompute loop hands ``context`` / ``context_mask`` only to
``TransformerLayer`` instances; any other layer is called as a Mamba layer, without them, and a
DiT block would lose its condition tokens (``tests/models/test_video_model.py`` and the
full-recompute layout test fail on 0.19 when this does not hold).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.dist_utils import run_distributed

MODEL = dict(name="Lumos-Tiny/2", latent_size=8, cond_tokens=3, cond_channels=48)


def _rank_fn(rank, world):
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.models.dit.layer import DiTLayer
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.setup import build_model

    mcfg = ModelConfig(**MODEL)
    initialize_parallel(ParallelConfig(), num_attention_heads=mcfg.num_heads_, num_layers=2)
    (model,), _ = build_model(mcfg, ParallelConfig(), seed=0, wrap_ddp=False)
    layer = model.decoder.layers[1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    h = layer.config.hidden_size
    x = torch.randn(16, 2, h, generator=g)  # [s, b, h]
    c = torch.randn(1, 2, h, generator=g)  # adaLN conditioning, in the attention_mask slot
    cond = torch.randn(3, 2, h, generator=g)  # condition tokens [Lc, b, h]
    with torch.no_grad():
        direct, _ = layer(x, attention_mask=c, context=cond)
        # exactly the keyword set megatron-core 0.19's recompute passes to a TransformerLayer
        via_protocol, ctx_out = layer(
            hidden_states=x,
            attention_mask=c,
            context=cond,
            context_mask=None,
            rotary_pos_emb=None,
            attention_bias=None,
            inference_context=None,
            packed_seq_params=None,
            padding_mask=None,
        )
        without_cond, _ = layer(x, attention_mask=c, context=torch.zeros_like(cond))
    keys = sorted(layer.sharded_state_dict(prefix="decoder.layers.1.").keys())
    module_keys = sorted(
        MegatronModule.sharded_state_dict(layer, prefix="decoder.layers.1.").keys()
    )
    refused = None
    bad = copy.copy(layer.config)  # set after __post_init__: its graph-scope checks vary
    bad.cuda_graph_impl = "local"
    try:
        DiTLayer(bad, layer.submodules_config, layer_number=1)
    except ValueError as exc:
        refused = str(exc)
    return {
        "is_tl": isinstance(layer, TransformerLayer),
        "direct": direct,
        "via_protocol": via_protocol,
        "context_back": ctx_out is cond,
        "cond_matters": not torch.allclose(direct, without_cond),
        "keys": keys,
        "module_keys": module_keys,
        "refused": refused,
    }


@pytest.fixture(scope="module")
def result():
    (res,) = run_distributed(_rank_fn, 1)
    return res


def test_dit_layer_takes_megatrons_transformer_layer_call(result):
    assert result["is_tl"]
    torch.testing.assert_close(result["via_protocol"], result["direct"], rtol=0, atol=0)
    assert result["context_back"]  # the block threads context on to the next layer
    assert result["cond_matters"]  # the condition tokens do reach the cross-attention


def test_checkpoint_keys_are_the_submodules_own(result):
    assert result["keys"] == result["module_keys"]
    assert any(k.startswith("decoder.layers.1.cross_attention.") for k in result["keys"])


def test_cuda_graphs_are_refused_by_name(result):
    assert result["refused"] is not None and "cuda_graph_impl='none'" in result["refused"]

"""The analytic FLOP count against PyTorch's own FLOP counter and against hand counts.

``torch.utils.flop_counter.FlopCounterMode`` counts every matmul / convolution a real forward
(and backward) executes; with SDPA forced onto its math path the attention cores are counted
too. The pure-PyTorch ``LumosTransformer2DModel`` and diffusers' ``PixArtTransformer2DModel`` at
tiny sizes must match the analytic count exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lumos_mcore.hf import LumosTransformer2DModel
from lumos_mcore.perf.flops import DiTShape, count_flops, pixart_shape, recomputed_share

B, LATENT, P, D, HEADS, DEPTH, LC, CC = 2, 8, 2, 48, 2, 2, 3, 16
TOKENS = (LATENT // P) ** 2


def _counted(fn) -> int:
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _inputs(g: torch.Generator):
    x = torch.randn(B, 4, LATENT, LATENT, generator=g)
    t = torch.tensor([10.0, 500.0])
    cond = torch.randn(B, LC, CC, generator=g)
    return x, t, cond


@pytest.mark.parametrize(
    "kw",
    [
        dict(adaln_type="zero"),
        dict(adaln_type="single", use_size_conditioning=True),
    ],
    ids=["adaln_zero", "adaln_single_size_cond"],
)
def test_forward_and_backward_match_torch_flop_counter(kw):
    torch.manual_seed(0)
    model = LumosTransformer2DModel(
        sample_size=LATENT,
        patch_size=P,
        in_channels=4,
        hidden_size=D,
        depth=DEPTH,
        num_heads=HEADS,
        cond_channels=CC,
        cond_tokens=LC,
        **kw,
    )
    x, t, cond = _inputs(torch.Generator().manual_seed(0))
    extra = {}
    if kw.get("use_size_conditioning"):
        extra["added_cond_kwargs"] = {
            "resolution": torch.tensor([[64.0, 64.0]]).repeat(B, 1),
            "aspect_ratio": torch.ones(B, 1),
        }
    shape = DiTShape(
        depth=DEPTH, hidden_size=D, num_heads=HEADS, cond_tokens=LC, cond_channels=CC, **kw
    )
    count = count_flops(shape, TOKENS)
    fwd = _counted(lambda: model(x, t, cond, **extra))
    assert fwd == B * count.forward
    # Backward is twice the forward, except the input gradients nobody needs: the patch conv
    # (latents) and the first timestep / size-embedder linears (sinusoidal features).
    train = _counted(lambda: model(x, t, cond, **extra).sample.sum().backward())
    skipped = 2 * TOKENS * 4 * P * P * D + 2 * 256 * D
    if kw.get("use_size_conditioning"):
        skipped += 3 * 2 * 256 * (D // 3)  # (h, w) and aspect ratio through their first layers
    assert train == B * (count.model_train - skipped)


def test_full_recompute_repeats_the_blocks_forward():
    torch.manual_seed(0)
    model = LumosTransformer2DModel(
        sample_size=LATENT,
        patch_size=P,
        hidden_size=D,
        depth=DEPTH,
        num_heads=HEADS,
        cond_channels=CC,
        cond_tokens=LC,
    )
    x, t, cond = _inputs(torch.Generator().manual_seed(1))
    plain = _counted(lambda: model(x, t, cond).sample.sum().backward())
    model.enable_gradient_checkpointing()
    model.train()
    recomputed = _counted(lambda: model(x, t, cond).sample.sum().backward())
    shape = DiTShape(depth=DEPTH, hidden_size=D, num_heads=HEADS, cond_tokens=LC, cond_channels=CC)
    full = count_flops(shape, TOKENS, recompute="full")
    assert recomputed - plain == B * (full.hardware_train - full.model_train)
    assert full.hardware_train - full.model_train == full.blocks_forward


def test_block_recompute_re_runs_the_first_layers_of_each_chunk():
    """megatron's ``block`` method recomputes only ``recompute_num_layers`` of each (virtual)
    stage chunk: HFU counts that share of the blocks' forward, ``uniform`` all of it."""
    from lumos_mcore.config.model import ModelConfig

    def share(method: str, k: int, pp: int = 1, vpp: int | None = None) -> float:
        cfg = ModelConfig(
            name="Lumos-XL/2", recompute="full", recompute_method=method, recompute_num_layers=k
        )
        return recomputed_share(cfg, pp, vpp)

    assert share("uniform", 1) == 1.0
    assert share("block", 1) == pytest.approx(1 / 28)
    assert share("block", 7, pp=2) == pytest.approx(7 / 14)
    assert share("block", 9, pp=2, vpp=2) == 1.0  # more than a 7-layer chunk: all of it
    assert recomputed_share(ModelConfig(name="Lumos-XL/2")) == 1.0  # no recompute
    shape = DiTShape(depth=DEPTH, hidden_size=D, num_heads=HEADS, cond_tokens=LC, cond_channels=CC)
    part = count_flops(shape, TOKENS, recompute="full", recompute_share=0.25)
    assert part.hardware_train - part.model_train == pytest.approx(0.25 * part.blocks_forward)
    with pytest.raises(ValueError, match="recompute_share=1.5"):
        count_flops(shape, TOKENS, recompute="full", recompute_share=1.5)


def test_pixart_at_equal_dims_matches_its_count():
    """The diffusers reference of the benchmark is counted as an adaLN-single DiT."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    pixart = PixArtTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=D // HEADS,
        in_channels=4,
        out_channels=8,
        num_layers=DEPTH,
        cross_attention_dim=D,
        caption_channels=CC,
        sample_size=LATENT,
        patch_size=P,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    x, t, cond = _inputs(torch.Generator().manual_seed(2))
    fwd = _counted(
        lambda: pixart(
            x,
            encoder_hidden_states=cond,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    )
    lumos = DiTShape(depth=DEPTH, hidden_size=D, num_heads=HEADS, cond_tokens=LC, cond_channels=CC)
    pix = count_flops(pixart_shape(lumos), TOKENS)
    assert fwd == B * pix.forward
    # Lumos' per-block adaLN-Zero costs 12 D^2 per block; PixArt's shared t_block 12 D^2 once.
    assert count_flops(lumos, TOKENS).forward - pix.forward == 12 * D * D * (DEPTH - 1)


def test_hand_count_of_a_tiny_block():
    """One layer, D = 4, L = 3 tokens, Lc = 2, every matmul written out."""
    shape = DiTShape(
        depth=1,
        hidden_size=4,
        num_heads=2,
        patch_size=1,
        in_channels=2,
        out_channels=2,
        cond_tokens=2,
        cond_channels=5,
        frequency_embedding_size=6,
    )
    c = count_flops(shape, 3)

    def mm(m, k, n):
        return 2 * m * k * n

    hd, heads = 2, 2
    assert c.linear == mm(3, 4, 12) + mm(3, 4, 4) + mm(3, 4, 16) + mm(3, 16, 4)
    assert c.self_attention == heads * (mm(3, hd, 3) + mm(3, 3, hd))
    assert c.cross_attention_core == heads * (mm(3, hd, 2) + mm(3, 2, hd))
    assert c.cross_attention_proj == mm(3, 4, 4) + mm(2, 4, 8) + mm(3, 4, 4)
    assert c.adaln == mm(1, 4, 24)
    assert c.embed == mm(3, 2, 4) + mm(1, 6, 4) + mm(1, 4, 4) + mm(2, 5, 4) + mm(2, 4, 4)
    assert c.final == mm(3, 4, 2)
    assert c.model_train == 3 * c.forward


def test_spatial_temporal_video_attention_by_hand():
    """T frames of S tokens: attention inside each frame plus, per position, across frames."""
    t_frames, s, d, heads = 4, 6, 8, 2
    shape = DiTShape(depth=1, hidden_size=d, num_heads=heads, cond_tokens=1, cond_channels=8)
    st = count_flops(shape, t_frames * s, frames=t_frames, attention="spatial_temporal")
    full = count_flops(shape, t_frames * s, frames=t_frames)
    hd = d // heads
    per_frame = t_frames * heads * 2 * (2 * s * hd * s)  # QK^T and AV inside each frame
    per_position = s * heads * 2 * (2 * t_frames * hd * t_frames)  # across frames
    assert st.self_attention == per_frame + per_position
    assert full.self_attention == heads * 2 * (2 * (t_frames * s) ** 2 * hd)
    temporal_proj = 2 * t_frames * s * d * 3 * d + 2 * t_frames * s * d * d  # QKV + out
    assert st.linear - full.linear == temporal_proj


def test_attention_overtakes_linear_layers_near_8k_tokens_at_xl_width():
    """DESIGN.md §4: at D = 1152 the L^2 attention term equals the linear FLOPs near 8K."""
    xl = DiTShape(depth=28, hidden_size=1152, num_heads=16)

    def ratio(tokens: int) -> float:
        c = count_flops(xl, tokens)
        return c.self_attention / (c.linear + c.cross_attention_proj)

    assert ratio(4096) < 1.0 < ratio(16384)
    crossover = next(n for n in range(1024, 20000, 64) if ratio(n) >= 1.0)
    assert 6500 <= crossover <= 8500


def test_invalid_arguments_name_the_problem():
    shape = DiTShape(depth=1, hidden_size=8, num_heads=2)
    with pytest.raises(ValueError, match="frames=3"):
        count_flops(shape, 16, frames=3)
    with pytest.raises(ValueError, match="recompute='some'"):
        count_flops(shape, 16, recompute="some")
    with pytest.raises(ValueError, match="adaln_type"):
        DiTShape(depth=1, hidden_size=8, num_heads=2, adaln_type="x")


def _megatron_forward_flops(rank, world):
    from lumos_mcore.config.model import ModelConfig
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.setup import build_model

    cfg = ModelConfig(
        name="Lumos-Tiny/2", latent_size=LATENT, cond_tokens=1, cond_channels=CC, depth=DEPTH
    )
    initialize_parallel(ParallelConfig(), num_attention_heads=cfg.num_heads_, num_layers=DEPTH)
    (model,), _ = build_model(cfg, ParallelConfig(), seed=0, wrap_ddp=False)
    x, t, _ = _inputs(torch.Generator().manual_seed(0))
    cond = torch.randn(B, 1, CC)
    with torch.no_grad():
        fwd = _counted(lambda: model(x, t, cond))
    shape = DiTShape.from_model_config(cfg)
    return fwd, count_flops(shape, TOKENS, single_token_cross=True).forward


def test_single_token_cross_attention_count_matches_the_megatron_model():
    """One DINO token: the count of what the DiT executes (K/V + one out-projection row)."""
    from tests.dist_utils import run_distributed

    ((counted, expected),) = run_distributed(_megatron_forward_flops, 1)
    assert counted == B * expected

"""Unit checks of the video / packing building blocks against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.models.common.embeddings import (
    concat_token_channels,
    get_2d_sincos_pos_embed,
    get_3d_sincos_pos_embed,
    patchify,
    patchify_video,
    sincos_pos_embed_from_coords,
    token_coords,
    unpatchify_video,
)
from lumos_mcore.models.common.rope import rope_axes_dims, rope_freqs
from lumos_mcore.models.dit.layout import Segment, SequenceLayout
from lumos_mcore.models.dit.packing import balance_packs, pack_by_tokens, plan_packs
from lumos_mcore.training.step import NOISE_BLOCK, draw_token_noise


def test_patchify_video_is_frame_major_and_inverts():
    x = torch.randn(2, 3, 4, 6, 8)  # [B, C, T, H, W]
    tok = patchify_video(x, 2)  # [B, T*3*4, 12]
    for f, i, j in [(0, 0, 0), (1, 2, 3), (3, 1, 0)]:
        n = (f * 3 + i) * 4 + j
        patch = x[:, :, f, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # [B, C, p, q]
        torch.testing.assert_close(tok[:, n], patch.permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(unpatchify_video(tok, 2, 4, 3, 4, 3), x)
    coords = token_coords(4, 3, 4)
    assert coords[(2 * 3 + 1) * 4 + 3].tolist() == [2, 1, 3]
    y = torch.randn(2, 5, 6, 8)
    both = patchify(torch.cat([x[:, :, 0], y], dim=1), 2)
    torch.testing.assert_close(
        concat_token_channels(patchify(x[:, :, 0], 2), patchify(y, 2), 2), both
    )


def test_sincos_rows_match_full_tables():
    coords = token_coords(3, 4, 6)
    table2d = get_2d_sincos_pos_embed(64, (4, 6), base_size=8, interpolation_scale=2.0)
    rows = sincos_pos_embed_from_coords(
        64, coords[:24], (4, 6), base_size=8, interpolation_scale=2.0
    )
    torch.testing.assert_close(rows.float(), table2d, rtol=0, atol=0)
    table3d = get_3d_sincos_pos_embed(64, (3, 4, 6), base_size=8, temporal_interpolation_scale=0.5)
    rows = sincos_pos_embed_from_coords(
        64, coords, (4, 6), base_size=8, temporal_interpolation_scale=0.5, video=True
    )
    torch.testing.assert_close(rows.float(), table3d, rtol=0, atol=0)


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Reference: adjacent channel pairs as complex numbers times exp(i * angle)."""
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    out = z * torch.polar(torch.ones_like(angles.double()), angles.double())
    return torch.view_as_real(out).reshape(x.shape).to(x.dtype)


def test_rope_in_megatron_layout_rotates_axis_bands():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    hd = 24
    dt, dh, dw = rope_axes_dims(hd)
    assert (dt, dh, dw) == (8, 8, 8) and rope_axes_dims(72) == (24, 24, 24)
    assert rope_axes_dims(64) == (24, 20, 20)
    coords = token_coords(3, 4, 5)
    freqs = rope_freqs(coords, hd, theta=100.0)  # [N, hd]
    x = torch.randn(coords.shape[0], 2, 3, hd)  # [s, b, heads, hd]
    got = _apply_rotary_pos_emb_bshd(x, freqs[:, None, None], rotary_interleaved=True)
    # Independent angles: band of axis a, pair k: coord_a * 100 ** (-2k / d_a).
    angles = torch.cat(
        [
            coords[:, a, None].double() * 100.0 ** (-torch.arange(0, d, 2).double() / d)
            for a, d in enumerate((dt, dh, dw))
        ],
        dim=1,
    )  # [N, hd/2]
    torch.testing.assert_close(got, _rotate_pairs(x, angles[:, None, None]), rtol=1e-5, atol=1e-5)
    # Relative: scores depend only on the offset between tokens.
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def score(cq, ck):
        fq, fk = rope_freqs(torch.tensor([cq]), hd), rope_freqs(torch.tensor([ck]), hd)
        rq = _rotate_pairs(q[None], fq[:, ::2].double())
        rk = _rotate_pairs(k[None], fk[:, ::2].double())
        return float((rq * rk).sum())

    assert math.isclose(score([1, 2, 3], [0, 1, 1]), score([3, 4, 7], [2, 3, 5]), rel_tol=1e-6)


def test_rope_matches_kernel_convention_and_ntk_scaling():
    coords = token_coords(2, 3, 3)
    hd = 72
    base = rope_freqs(coords, hd)
    try:
        from lumos_kernels.rope3d import rope3d_freqs
    except ImportError:
        rope3d_freqs = None
    if rope3d_freqs is not None:  # same convention as the fused kernel
        torch.testing.assert_close(base[:, ::2], rope3d_freqs(coords.float(), hd))
    ntk = rope_freqs(coords, hd, ntk_factor=4.0)
    step = coords.double()[-1]  # a token with nonzero (t, h, w)
    for a, (lo, d) in enumerate(zip((0, 24, 48), rope_axes_dims(hd))):
        band = slice(lo, lo + d, 2)
        f0 = base[-1, band].double() / step[a]
        f1 = ntk[-1, band].double() / step[a]
        torch.testing.assert_close(f1[0], f0[0])  # the highest frequency is kept
        torch.testing.assert_close(f0[-1] / f1[-1], torch.tensor(4.0, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["contiguous", "zigzag"])
def test_layout_shards_partition_the_sequence(mode):
    shapes = [(2, 2, 4), (1, 4, 4), (3, 2, 2)]  # 16, 16, 12 tokens
    layouts = [
        SequenceLayout.for_pack(shapes, [1, 2, 3], cp_size=2, cp_rank=r, cp_mode=mode)
        for r in range(2)
    ]
    total = layouts[0].total
    idx = torch.cat([lay.local_index for lay in layouts])
    assert sorted(idx.tolist()) == list(range(total))
    assert all(lay.local_tokens == total // 2 for lay in layouts)
    if mode == "zigzag":  # TransformerEngine's THD split: chunks r and 2cp-1-r of every sample
        assert layouts[0].chunks == [(0, 4), (12, 16), (16, 20), (28, 32), (32, 35), (41, 44)]
        assert layouts[0].kv_order is not None
        gathered = idx  # what an all-gather in rank order produces
        assert gathered[layouts[0].kv_order].tolist() == list(range(total))
    else:
        assert layouts[1].chunks == [(22, 44)]
        assert [(p.segment, p.start, p.end) for p in layouts[1].pieces] == [
            (1, 22, 32),
            (2, 32, 44),
        ]
    for lay in layouts:  # coordinates and segment ids agree with the global token order
        for n, g in enumerate(lay.local_index.tolist()):
            seg = max(i for i, off in enumerate(lay.offsets[:-1]) if off <= g)
            assert lay.local_segment[n] == seg
            rel = g - lay.offsets[seg]
            assert lay.local_coords[n].tolist() == token_coords(*shapes[seg])[rel].tolist()


@pytest.mark.parametrize("mode, cp", [("contiguous", 1), ("contiguous", 3), ("zigzag", 2)])
def test_host_rows_and_first_frame_counts_match_the_token_tensors(mode, cp):
    """The loss regroups a pack's tokens per sample from host-side counts; they equal what the
    per-token tensors say on every rank (so no GPU value is read back per sample)."""
    shapes = [(3, 2, 4), (1, 4, 4), (2, 2, 2)]  # 24, 16, 8 tokens: pieces cut frames under CP
    for r in range(cp):
        lay = SequenceLayout.for_pack(shapes, [1, 2, 3], cp_size=cp, cp_rank=r, cp_mode=mode)
        for i in range(len(lay.segments)):
            want = torch.nonzero(lay.local_segment == i).flatten().tolist()
            assert lay.local_rows(i) == want
            first = (lay.local_segment == i) & (lay.local_coords[:, 0] == 0)
            assert lay.local_first_frame_tokens(i) == int(first.sum())


def test_pack_is_padded_for_even_shares():
    lay = SequenceLayout.for_pack([(1, 3, 3)], [1], cp_size=2, sp_size=2)
    assert lay.total == 12 and lay.segments[-1] == Segment(1, 1, 3, pad=True)
    assert lay.num_real_segments == 1
    lay = SequenceLayout.for_pack([(1, 3, 3)], [1], pad_to=16)
    assert lay.total == 16
    with pytest.raises(ValueError, match="parallel.cp=2"):
        SequenceLayout([Segment(1, 3, 3)], cp_size=2)


def test_token_noise_does_not_depend_on_sharding():
    full = draw_token_noise(5, 17, [(0, 3 * NOISE_BLOCK)], 8)
    parts = draw_token_noise(5, 17, [(300, 520), (10, 40)], 8)
    torch.testing.assert_close(parts, torch.cat([full[300:520], full[10:40]]), rtol=0, atol=0)
    other = draw_token_noise(5, 18, [(0, 10)], 8)
    assert not torch.equal(other, full[:10])


def test_pack_planner_fills_and_balances():
    lengths = [900, 700, 600, 500, 400, 300, 300, 200, 200, 100, 64, 36]
    packs = pack_by_tokens(lengths, 1024)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 1024 for p in packs)
    assert len(packs) == math.ceil(sum(lengths) / 1024)  # nearly full packs
    ranks, left = plan_packs(lengths, 1024, num_ranks=2)  # 5 packs: the lightest waits
    assert len(ranks[0]) == len(ranks[1]) == 2
    placed = sorted([i for r in ranks for p in r for i in p] + left)
    assert placed == list(range(len(lengths)))
    assert sum(lengths[i] for i in left) == min(sum(lengths[i] for i in p) for p in packs)
    loads = [sum(lengths[i] for p in r for i in p) for r in ranks]
    assert max(loads) - min(loads) <= 100
    assert balance_packs([5, 4, 3, 3, 2, 1], 3) == [[0, 5], [1, 4], [2, 3]]
    with pytest.raises(ValueError, match="more than the pack capacity"):
        pack_by_tokens([2000], 1024)


def test_video_config_validation():
    cfg = ModelConfig(variant="i2v", num_frames=16, latent_size=32)
    assert cfg.num_tokens == 16 * 16 * 16 and cfg.temporal_attention
    assert ModelConfig(variant="nvs").model_in_channels == 8
    with pytest.raises(ValueError, match="model.num_frames=4"):
        ModelConfig(num_frames=4)
    with pytest.raises(ValueError, match="model.first_frame_condition"):
        ModelConfig(variant="i2v", num_frames=1)
    with pytest.raises(ValueError, match="model.video_attention"):
        ModelConfig(variant="i2v", num_frames=2, video_attention="axial")
    with pytest.raises(ValueError, match="model.rope_ntk_factor"):
        ModelConfig(pos_embed="rope", rope_ntk_factor=0.5)


def test_te_packed_seq_params_once_per_forward_and_unpadded():
    """TransformerEngine's THD parameters of a pack: global cu_seqlens for self-attention, the
    rank's queries per sample against each sample's condition tokens for cross-attention;
    built once per bound layout (all layers share them), padded cu_seqlens the same tensors."""
    shapes = [(2, 2, 4), (1, 4, 4), (3, 2, 2)]  # 16, 16, 12 tokens
    lay = SequenceLayout.for_pack(shapes, [1, 2, 3], cp_size=2, cp_rank=0, cp_mode="zigzag")
    bound = lay.bind(context_valid=torch.ones(6, dtype=torch.bool))
    psp = bound.te_packed_seq_params()
    assert bound.te_packed_seq_params() is psp
    assert psp.cu_seqlens_q.tolist() == [0, 16, 32, 44] and psp.max_seqlen_q == 16
    assert psp.cu_seqlens_q_padded is psp.cu_seqlens_q is psp.cu_seqlens_kv
    assert psp.cu_seqlens_kv_padded is psp.cu_seqlens_kv
    cross, rows = bound.te_cross_packed_seq_params()
    assert bound.te_cross_packed_seq_params()[0] is cross
    assert rows == 22  # every local query attends
    assert cross.cu_seqlens_q.tolist() == [0, 8, 16, 22]  # this rank's half of each sample
    assert cross.cu_seqlens_kv.tolist() == [0, 1, 3, 6] and cross.max_seqlen_kv == 3
    assert cross.cu_seqlens_q_padded is cross.cu_seqlens_q
    assert lay.bind().te_packed_seq_params() is not psp  # a new forward builds its own
    padded = lay.bind(context_valid=torch.tensor([True, True, False, True, True, True]))
    with pytest.raises(NotImplementedError, match="unpadded condition tokens"):
        padded.te_cross_packed_seq_params()
    # A pad segment (no condition tokens) is left out of the cross-attention: its queries
    # would attend to nothing; the caller gives them zeros.
    shapes = [(1, 2, 4), (1, 2, 2)]  # 8 + 4 tokens, padded to 16 (pad segment of 4)
    for rank in range(2):
        lay = SequenceLayout.for_pack(
            shapes, [2, 3], cp_size=2, cp_rank=rank, cp_mode="zigzag", pad_to=16
        )
        assert lay.segments[-1].pad and lay.segments[-1].cond_len == 0
        cross, rows = lay.bind().te_cross_packed_seq_params()
        assert rows == 6  # 4 + 2 real local queries, then the pad segment's 2
        assert cross.cu_seqlens_q.tolist() == [0, 4, 6]
        assert cross.cu_seqlens_kv.tolist() == [0, 2, 5]


def test_fp8_packs_are_padded_to_16_rows_per_rank():
    from lumos_mcore.models.dit.model import fp8_pack_length

    shapes = [(2, 2, 4), (1, 3, 3)]  # 16 + 9 = 25 tokens
    assert fp8_pack_length(shapes, None, 1) == 32
    assert fp8_pack_length(shapes, None, 4) == 64  # 16 rows on each of cp x sp = 4 ranks
    assert fp8_pack_length(shapes, 128, 4) == 128
    with pytest.raises(ValueError, match="multiple of 64"):
        fp8_pack_length(shapes, 96, 4)
    assert fp8_pack_length(shapes, None, 4, rows=32) == 128  # MXFP8: 32-row blocks
    lay = SequenceLayout.for_pack(shapes, [1, 1], pad_to=fp8_pack_length(shapes, None, 1))
    assert lay.total == 32 and lay.segments[-1].pad and lay.num_real_segments == 2

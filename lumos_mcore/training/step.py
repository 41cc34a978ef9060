"""The diffusion training step as megatron's ``forward_step_func``.

megatron's schedules call ``forward_step(data_iterator, model)`` once per micro-batch on every
pipeline stage, and ``loss_func(output)`` on the last stage. Every stage of a model replica must
therefore draw *the same* timesteps, noise and condition-dropout decisions for a micro-batch
without talking to each other. We seed a generator per sample from ``(seed, global position)``,
where the global position of a sample is its index in the stream of training samples
(``step * global_batch + offset``). The draws are then identical on all TP/PP/CP ranks of a
replica, independent of the data-parallel size (DP=2 sees the noise DP=1 sees), and reproduced
exactly after a resume.

The step works in token space (``patchify`` of the latents, frame-major for video) on this
rank's context-parallel share of the sequence (:class:`SequenceLayout`):

* **noise** is drawn per block of ``NOISE_BLOCK`` tokens of a sample from a generator seeded by
  ``(seed, position, block)``, so a CP rank draws only its own blocks and CP=2 sees exactly the
  noise CP=1 sees; the **timestep** and **dropout** of a sample come from its own generator and
  are identical on all its shards;
* **first-frame conditioning** (I2V): frame 0 stays clean, gets timestep 0 (per-frame adaLN)
  and is masked out of the loss;
* **loss on the local share**: each CP rank's loss is the sum of its tokens' share of every
  sample's mean, ``local_mean * kept_local / kept_total``, so the CP ranks' losses add up to the
  CP=1 loss exactly (equal shares, masks included). megatron multiplies a 2-tuple loss by the CP
  size and DDP averages gradients over DP x CP, so gradients equal the CP=1 ones; the reported
  loss is scaled by the CP size so that its DP x CP average is the full loss.

Micro-batch formats (``"position"`` ``[n]`` long is always required, see :func:`with_positions`):

* dense: ``"latent"`` ``[B, C, H, W]`` or ``[B, C, T, H, W]``, ``"cond"`` ``[B, Lc, Cc]``, optional
  ``"cond_mask"`` ``[B, Lc]``, ``"resolution"``/``"aspect_ratio"`` (T2I), ``"input_latent"`` and
  ``"camera"`` ``[B, 12]`` (NVS);
* packed (one sequence of samples of different sizes): ``"latent"`` a list of ``[C, (T,) H, W]``,
  ``"cond"`` a list of ``[Lc_i, Cc]``, optional ``"input_latent"`` list, ``"camera"`` ``[n, 12]``,
  ``"resolution"`` ``[n, 2]`` / ``"aspect_ratio"`` ``[n, 1]``, and ``"pack_length"`` (int: pad
  every pack to this many tokens; needed with pipeline parallelism, whose activations have a
  fixed size). The pack loss is the mean over its samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from lumos_mcore.diffusion.objective import DiffusionObjective
from lumos_mcore.models.common.embeddings import concat_token_channels, patchify, patchify_video
from lumos_mcore.models.dit.layout import SequenceLayout

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: decorrelates neighbouring seeds
NOISE_BLOCK = 256  # tokens per noise generator


def sample_seed(seed: int, position: int) -> int:
    """Seed of the generator for one training sample (stable across layouts and resumes)."""
    return (seed * _MIX + position * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def noise_seed(seed: int, position: int, block: int) -> int:
    """Seed of the noise of tokens ``[block * NOISE_BLOCK, (block + 1) * NOISE_BLOCK)``."""
    return (sample_seed(seed, position) * _MIX + (block + 1) * 0x94D049BB133111EB) % (2**63 - 1)


def draw_token_noise(
    seed: int, position: int, ranges: list[tuple[int, int]], token_dim: int
) -> Tensor:
    """Noise ``[n, token_dim]`` of one sample's tokens in ``ranges`` (positions in the sample).

    Draws only the blocks the ranges touch, so any sharding of a sample sees the same noise.
    """
    blocks: dict[int, Tensor] = {}
    parts = []
    for a, b in ranges:
        for k in range(a // NOISE_BLOCK, (b - 1) // NOISE_BLOCK + 1):
            if k not in blocks:
                g = torch.Generator().manual_seed(noise_seed(seed, position, k))
                blocks[k] = torch.randn(NOISE_BLOCK, token_dim, generator=g)
            lo = max(a, k * NOISE_BLOCK) - k * NOISE_BLOCK
            hi = min(b, (k + 1) * NOISE_BLOCK) - k * NOISE_BLOCK
            parts.append(blocks[k][lo:hi])
    if not parts:
        return torch.zeros(0, token_dim)
    return torch.cat(parts)  # [n, token_dim]


@dataclass
class DiffusionDraws:
    """Per-sample random draws (timestep and condition dropout) of one micro-batch."""

    t: Tensor  # [n] objective timesteps
    drop: Tensor  # [n] bool: use the null condition (classifier-free guidance training)


def draw_for_positions(
    objective: DiffusionObjective, positions: list[int], *, seed: int, cond_dropout: float
) -> DiffusionDraws:
    """Timestep and dropout for each sample, from its own seeded generator."""
    ts, drops = [], []
    for pos in positions:
        g = torch.Generator().manual_seed(sample_seed(seed, pos))
        ts.append(objective.sample_timesteps(1, generator=g))  # [1]
        drops.append(torch.rand(1, generator=g) < cond_dropout)  # [1]
    return DiffusionDraws(torch.cat(ts), torch.cat(drops))


def with_positions(
    batches: Iterator[dict],
    *,
    start_step: int,
    num_microbatches: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    first_sample: int = 0,
) -> Iterator[dict]:
    """Attach each sample's global position (``"position"`` ``[B]`` long) to the micro-batches.

    Micro-batch ``m`` of step ``s`` on DP rank ``r`` covers positions
    ``first_sample + s * GB + r * GB / dp + m * mbs + [0, mbs)`` — the same layout the data
    sampler uses (``first_sample``: position of step 0, nonzero after a resume at another GB).
    Batches that already carry ``"position"`` (packs, whose sample count varies) keep it.
    """
    per_rank = global_batch_size // dp_size
    k = start_step * num_microbatches
    for batch in batches:
        if "position" not in batch:
            step, m = divmod(k, num_microbatches)
            b = (
                len(batch["latent"])
                if isinstance(batch["latent"], list)
                else batch["latent"].shape[0]
            )
            start = first_sample + step * global_batch_size + dp_rank * per_rank + m * b
            batch["position"] = torch.arange(start, start + b)
        k += 1
        yield batch


@dataclass
class PreparedBatch:
    """One micro-batch in token space on this rank (CP share of ``layout``)."""

    layout: SequenceLayout
    model_inputs: dict
    x0: Tensor  # [B', s, F] latent tokens (B' = samples; a pack is regrouped for the loss)
    x_t: Tensor
    noise: Tensor
    t: Tensor  # [B'] objective timesteps
    mask: Tensor | None  # broadcastable to [B', C, s, p*p]: 1 = token counts in the loss
    weight: Tensor  # [B'] kept_local / kept_total per sample
    patch_area: int  # p * p: token channels are (p, q, c)
    regroup: list[Tensor] | None = field(default=None)  # pack: local token rows per sample
    # pack: the loss is sum_i(loss_i) * loss_scale instead of the mean (see collate_pack)
    loss_scale: float | None = None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "model_cfg") and hasattr(model, "module"):
        model = model.module
    return model


class DiffusionForwardStep:
    """Callable ``forward_step_func`` for megatron's ``get_forward_backward_func()``.

    Micro-batches must carry ``"position"`` (see :func:`with_positions`).
    """

    def __init__(
        self,
        objective: DiffusionObjective,
        *,
        seed: int,
        cond_dropout: float,
        device: torch.device,
    ) -> None:
        self.objective = objective
        self.seed = seed
        self.cond_dropout = cond_dropout
        self.device = device

    def __call__(self, data_iterator: Iterator[dict], model: torch.nn.Module, *args):
        batch = next(data_iterator)
        core = _unwrap(model)
        if isinstance(batch["latent"], (list, tuple)):
            prep = self.prepare_packed(batch, core)
        else:
            prep = self.prepare_dense(batch, core)
        output = model(**prep.model_inputs)  # last stage: [B, s, p*p*C_out]; else hidden states
        return output, partial(self.loss_func, prep=prep)

    # -- dense batches ----------------------------------------------------------------------
    def prepare_dense(self, batch: dict, core) -> PreparedBatch:
        """Tokens, draws and loss weights of an image / video micro-batch."""
        cfg, dev = core.model_cfg, self.device
        p = cfg.patch_size
        x0 = batch["latent"].to(dev, non_blocking=True).float()  # [B, C, (T,) H, W]
        video = x0.ndim == 5
        frames = x0.shape[2] if video else 1
        h, w = x0.shape[-2] // p, x0.shape[-1] // p
        layout = core.make_layout((frames, h, w), device=dev)
        to_tokens = patchify_video if video else patchify
        x0 = layout.shard(to_tokens(x0, p), dim=1)  # [B, s, p*p*C]
        positions = batch["position"].tolist()
        draws = draw_for_positions(
            self.objective, positions, seed=self.seed, cond_dropout=self.cond_dropout
        )
        t = draws.t.to(dev)  # [B]
        noise = torch.stack(
            [draw_token_noise(self.seed, pos, layout.chunks, x0.shape[-1]) for pos in positions]
        ).to(dev)  # [B, s, p*p*C]
        x_t = self.objective.add_noise(x0, noise, t)  # [B, s, p*p*C]

        model_t = self.objective.model_timesteps(t)  # [B]
        mask, kept_local, kept_total = None, layout.local_tokens, layout.total
        if cfg.is_video and cfg.first_frame_condition and frames > 1:
            # Frame 0 is the condition: clean latent, timestep 0, no loss.
            is_cond = layout.local_coords[:, 0] == 0  # [s]
            x_t = torch.where(is_cond[None, :, None], x0, x_t)
            t0 = self.objective.model_timesteps(torch.zeros_like(t))  # [B]
            model_t = torch.cat([t0[:, None], model_t[:, None].expand(-1, frames - 1)], dim=1)
            mask = (~is_cond).float()[None, None, :, None]  # [1, 1, s, 1]
            first = sum(layout.local_first_frame_tokens(i) for i in range(len(layout.segments)))
            kept_local = layout.local_tokens - first  # host arithmetic: no GPU read-back
            kept_total = layout.total - h * w
        weight = torch.full((x0.shape[0],), kept_local / kept_total, device=dev)

        tokens = x_t
        if cfg.variant == "nvs":
            view = batch["input_latent"].to(dev, non_blocking=True).float()  # [B, C, H, W]
            tokens = concat_token_channels(x_t, layout.shard(patchify(view, p), dim=1), p)
        cond_mask = batch.get("cond_mask")
        if cond_mask is not None:
            if bool(cond_mask.all()):  # checked before the copy: no GPU read-back
                cond_mask = None  # no padding: skip masking work
            else:
                cond_mask = cond_mask.to(dev, non_blocking=True)  # [B, Lc]
        inputs = dict(
            tokens=tokens,
            layout=layout,
            timesteps=model_t,
            cond=batch["cond"].to(dev, non_blocking=True),  # [B, Lc, Cc]
            cond_mask=cond_mask,
            force_drop_ids=draws.drop.to(dev),
        )
        inputs.update(self._extras(batch))
        return PreparedBatch(layout, inputs, x0, x_t, noise, t, mask, weight, p * p)

    # -- packed batches ---------------------------------------------------------------------
    def prepare_packed(self, batch: dict, core) -> PreparedBatch:
        """Tokens, draws and loss weights of a pack of samples of different sizes."""
        cfg, dev = core.model_cfg, self.device
        p = cfg.patch_size
        latents = [x.to(dev, non_blocking=True).float() for x in batch["latent"]]
        conds = [c.to(dev, non_blocking=True) for c in batch["cond"]]
        shapes = []
        full = []
        for x in latents:
            video = x.ndim == 4
            frames = x.shape[1] if video else 1
            shapes.append((frames, x.shape[-2] // p, x.shape[-1] // p))
            full.append((patchify_video(x[None], p) if video else patchify(x[None], p))[0])
        n = len(latents)
        layout = core.make_layout(
            packed_shapes=shapes,
            cond_lens=[c.shape[0] for c in conds],
            pad_to=batch.get("pack_length"),
            device=dev,
        )
        dim = full[0].shape[-1]
        pad = layout.total - sum(f.shape[0] for f in full)
        x0_full = torch.cat(full + [full[0].new_zeros(pad, dim)])  # [S, p*p*C]
        x0 = layout.shard(x0_full, dim=0)  # [s, F]

        positions = batch["position"].tolist()
        draws = draw_for_positions(
            self.objective, positions, seed=self.seed, cond_dropout=self.cond_dropout
        )
        t = draws.t.to(dev)  # [n]
        noise = x0.new_zeros(x0.shape)  # [s, F]
        seg_t = torch.zeros(len(layout.segments), dtype=t.dtype, device=dev)
        seg_t[:n] = t
        for pc in layout.pieces:
            if pc.segment < n:
                off = layout.offsets[pc.segment]
                noise[pc.local : pc.local + pc.size] = draw_token_noise(
                    self.seed, positions[pc.segment], [(pc.start - off, pc.end - off)], dim
                ).to(dev)
        tok_seg = layout.local_segment  # [s]
        x_t = self.objective.add_noise(x0, noise, seg_t[tok_seg])  # tokens as the batch dim

        conditioned = [cfg.is_video and cfg.first_frame_condition and s[0] > 1 for s in shapes]
        is_cond = torch.zeros_like(tok_seg, dtype=torch.bool)
        model_t_frames = []
        zero_t = self.objective.model_timesteps(torch.zeros(1, dtype=t.dtype, device=dev))
        for i, seg in enumerate(layout.segments):
            ti = self.objective.model_timesteps(seg_t[i : i + 1]) if i < n else zero_t
            ft = ti.expand(seg.frames).clone()
            if i < n and conditioned[i]:
                ft[0] = zero_t[0]
            model_t_frames.append(ft)
        if any(conditioned):
            flag = torch.tensor(conditioned + [False] * (len(layout.segments) - n), device=dev)
            is_cond = flag[tok_seg] & (layout.local_coords[:, 0] == 0)
            x_t = torch.where(is_cond[:, None], x0, x_t)
        model_t = torch.cat(model_t_frames)[None]  # [1, F]

        # Regroup the local tokens per sample for the per-sample loss (from the layout on the
        # host: reading token masks back would stall the GPU once per sample).
        host_rows = [layout.local_rows(i) for i in range(n)]
        rows = [torch.tensor(r, dtype=torch.long).to(dev, non_blocking=True) for r in host_rows]
        kept = [
            len(r) - (layout.local_first_frame_tokens(i) if conditioned[i] else 0)
            for i, r in enumerate(host_rows)
        ]
        kept_local = torch.tensor(kept, dtype=torch.float32, device=dev)
        kept_total = torch.tensor(
            [
                s.num_tokens - (s.frame_tokens if conditioned[i] else 0)
                for i, s in enumerate(layout.segments[:n])
            ],
            dtype=torch.float32,
            device=dev,
        )
        keep = (~is_cond).float()

        tokens = x_t[None]  # [1, s, F]
        if cfg.variant == "nvs":
            views = [
                patchify(v.to(dev, non_blocking=True).float()[None], p)[0]
                for v in batch["input_latent"]
            ]
            views_full = torch.cat(views + [views[0].new_zeros(pad, dim)])
            tokens = concat_token_channels(tokens, layout.shard(views_full, dim=0)[None], p)
        cond_mask = batch.get("cond_mask")
        if cond_mask is not None:
            cond_mask = torch.cat([m.to(dev) for m in cond_mask])[None]  # [1, Lc_total]
        inputs = dict(
            tokens=tokens,
            layout=layout,
            timesteps=model_t,
            cond=torch.cat(conds)[None],  # [1, Lc_total, Cc]
            cond_mask=cond_mask,
            force_drop_ids=draws.drop.to(dev),
        )
        inputs.update(self._extras(batch))
        prep = PreparedBatch(
            layout,
            inputs,
            _regroup(x0, rows),
            _regroup(x_t, rows),
            _regroup(noise, rows),
            t,
            _regroup(keep[:, None], rows).transpose(1, 2)[..., None],  # [n, 1, L, 1]
            kept_local / kept_total,
            p * p,
            rows,
            batch.get("loss_scale"),
        )
        return prep

    def _extras(self, batch: dict) -> dict:
        extra = {}
        for key in ("resolution", "aspect_ratio", "camera"):
            if key in batch:
                extra[key] = batch[key].to(self.device)
        return extra

    # -- loss -------------------------------------------------------------------------------
    def loss_func(self, output: Tensor, *, prep: PreparedBatch):
        """This rank's share of the mean per-sample loss (module docstring)."""
        out = output.float()  # [B, s, p*p*C_out] (a pack: [1, s, ...])
        if prep.regroup is not None:
            out = _regroup(out[0], prep.regroup)  # [n, L, p*p*C_out]
        pp = prep.patch_area
        terms = self.objective.loss_terms(
            _channels_first(out, pp),
            x0=_channels_first(prep.x0, pp),
            x_t=_channels_first(prep.x_t, pp),
            noise=_channels_first(prep.noise, pp),
            t=prep.t,
            mask=prep.mask,
        )
        w = prep.weight

        def reduce(v: Tensor) -> Tensor:  # [B'] -> this micro-batch's share of the step mean
            if prep.loss_scale is None:
                return (v * w).mean()
            return (v * w).sum() * prep.loss_scale  # a pack: samples weigh equally in the step

        loss = reduce(terms["loss"])
        cp = prep.layout.cp_size
        reported = {k: reduce(v.detach()) * cp for k, v in terms.items()}
        return loss, reported


def _channels_first(x: Tensor, pp: int) -> Tensor:
    """Token tensors ``[B, s, p*p*C]`` -> ``[B, C, s, p*p]`` (channel axis first, for the
    objective's learned-sigma split and per-sample means)."""
    b, s, f = x.shape
    return x.reshape(b, s, pp, f // pp).permute(0, 3, 1, 2)


def _regroup(x: Tensor, rows: list[Tensor]) -> Tensor:
    """Local pack tokens ``[s, ...]`` -> per sample ``[n, L_max, ...]`` (zero padded)."""
    longest = max((len(r) for r in rows), default=0)
    out = x.new_zeros((len(rows), longest, *x.shape[1:]))
    for i, r in enumerate(rows):
        out[i, : len(r)] = x[r]
    return out

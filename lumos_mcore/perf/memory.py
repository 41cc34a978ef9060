"""Per-rank memory of a Lumos train step, counted from the config (no model is built).

Why: a 64K-token video sample either fits an 80 GiB GPU or it does not, and finding out by
launching a multi-node job is slow and costly. This module answers it up front, and the trainer
logs the same estimate next to the measured peak so the two can be compared on every run.

What is counted, per rank (the first pipeline stage, which holds the most in-flight work):

- **static**: the rank's parameters (its TP / PP shard) in the training dtype; megatron DDP's
  fp32 gradient buffer; the Adam state (fp32 moments, plus fp32 master weights when training in
  bf16), divided over the data-parallel ranks with the distributed optimizer; the fp32 EMA copy.
- **activations**: the bytes autograd keeps for backward, term by term as the DiT layer creates
  them (:func:`layer_activation_terms`), times the layers of a stage, times the micro-batches a
  1F1B pipeline keeps in flight; full recompute keeps only each recompute chunk's input.
  On CPU this equals the bytes measured with ``saved_tensors_hooks`` (tests/perf/test_memory.py
  checks every parallel layout and model variant to a few per cent). On GPU the fused-attention
  backends (flash-attn, cuDNN / TE fused attention, SDPA flash / memory-efficient) keep the same
  tensors as PyTorch's CPU flash kernel: q, k, v, the output and fp32 log-sum-exp rows.
- **working**: what backward allocates on top — the activations of the one recompute chunk being
  re-run under full recompute, and the gradient buffers of one layer. This part is an estimate
  (allocator caching and fragmentation are not modelled); the GPU benchmark prints it next to
  ``torch.cuda.max_memory_allocated``.

Counts use ``[s, b, h]`` terms: ``s`` is the rank's token count after context parallelism
(``tokens / cp``), and tensors that megatron keeps sequence-parallel are a further ``1 / tp``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from lumos_mcore.config.media import MediaDataConfig
from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig

__all__ = [
    "KERNELS",
    "MemoryEstimate",
    "ParamCount",
    "SavedTensorBytes",
    "estimate_job_memory",
    "estimate_memory",
    "layer_activation_terms",
    "param_count",
]

KERNELS = ("torch", "triton")  # which norm + modulate implementation runs (lumos_mcore.ops)
GIB = 1024**3
_STAT = 4  # norm statistics and attention log-sum-exp rows are fp32 in every dtype


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one rank, split by whether tensor parallelism shards them."""

    per_layer: int  # one DiT block on one TP rank
    embed: int  # patch embedder (first stage only)
    cond: int  # timestep / condition / size / camera embedders, t_block (every stage)
    final: int  # final layer (last stage only)
    layers: int  # blocks on the rank's stage

    @property
    def total(self) -> int:
        return self.per_layer * self.layers + self.embed + self.cond + self.final


def _mlp_params(d_in: int, d: int) -> int:
    """``Linear(d_in, d) -> SiLU/GELU -> Linear(d, d)`` with biases (the embedders' MLP)."""
    return d_in * d + d + d * d + d


def param_count(model: ModelConfig, parallel: ParallelConfig, *, stage: int = 0) -> ParamCount:
    """Parameters held by a rank of pipeline ``stage`` (all virtual chunks of that stage)."""
    d, tp, p = model.hidden_size_, parallel.tp, model.patch_size
    f = int(d * model.mlp_ratio)
    hd = d // model.num_heads_

    def attention(qk_norm: bool) -> int:
        qkv = (3 * d * d + 3 * d) // tp  # column-parallel weight + bias
        proj = d * d // tp + d  # row-parallel weight; its bias is replicated
        return qkv + proj + (4 * hd if qk_norm else 0)  # q/k norms: weight + bias per head dim

    block = 6 * d * d + 6 * d if model.adaln_type == "zero" else 6 * d
    block += attention(model.qk_norm)
    if model.temporal_attention:
        block += attention(model.qk_norm)
    block += (d * d + d) // tp + (2 * d * d + 2 * d) // tp + d * d // tp + d  # cross q, kv, out
    block += model.num_heads_ // tp if model.cross_attn_gate else 0  # tanh gate per head
    block += (f * d + f) // tp + f * d // tp + d  # MLP fc1 (col), fc2 (row, replicated bias)

    cond = _mlp_params(256, d)  # timestep embedder
    cond += _mlp_params(model.cond_channels, d) + model.cond_tokens * model.cond_channels
    if model.use_size_conditioning:
        cond += 2 * _mlp_params(256, d // 3)
    if model.variant == "nvs":
        cond += _mlp_params(model.camera_dim, d)
    if model.adaln_type == "single":
        cond += 6 * d * d + 6 * d

    # the final layer's scale_shift_table [2, D] (both block styles) + its output linear
    final = 2 * d + d * p * p * model.out_channels + p * p * model.out_channels
    layers = _stage_layers(model.depth_, parallel)
    pp = parallel.pp
    return ParamCount(
        per_layer=block,
        embed=(p * p * model.model_in_channels * d + d) if stage == 0 else 0,
        cond=cond,
        final=final if stage == pp - 1 else 0,
        layers=layers,
    )


def _stage_layers(depth: int, parallel: ParallelConfig) -> int:
    return math.ceil(depth / parallel.pp)


def layer_activation_terms(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    micro_batch_size: int = 1,
    act_bytes: int = 2,
    kernels: str = "torch",
    tokens: int | None = None,
) -> dict[str, int]:
    """Bytes one DiT block keeps for backward for one micro-batch, by term (no recompute).

    Each term names the tensor autograd holds; tensors shared between consumers are counted
    once (the qkv projection's output stays alive as one storage for q, k and v).
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(KERNELS)}")
    b, a = micro_batch_size, act_bytes
    d, tp, cp = model.hidden_size_, parallel.tp, parallel.cp
    heads = model.num_heads_ // tp
    hd = d // model.num_heads_
    d_tp = d // tp
    f_tp = int(d * model.mlp_ratio) // tp
    s = math.ceil((tokens or model.num_tokens) / cp)  # tokens of this CP rank
    s_sp = math.ceil(s / tp) if parallel.sequence_parallel else s  # sequence-parallel shards
    fp8 = model.fp8 is not None
    lin_in = 1 if fp8 else a  # TE keeps FP8 copies of the linears' inputs under FP8
    lse = heads * _STAT  # per token: one fp32 log-sum-exp row per head (fused attention)
    frames = model.num_frames

    def norm_modulate() -> int:
        keep_normed = kernels == "torch" or _row_modulation(model)
        per_token = d * a * (2 if keep_normed else 1) + 2 * _STAT  # input (+ normalized) + stats
        return b * s_sp * per_token

    def self_attention(cp_sharded: bool) -> int:
        t = b * s_sp * d * lin_in  # the qkv projection's input
        t += b * s * 3 * d_tp * a  # q, k, v (one storage)
        if model.pos_embed == "rope" or model.qk_norm:
            t += b * s * 2 * d_tp * a  # rotated / normalised q and k: new tensors
        if model.pos_embed == "rope" and kernels == "torch":
            t += 4 * s * (hd // 2) * _STAT  # the reference RoPE's cos / sin tables
        if model.qk_norm:
            t += b * s * 4 * heads * _STAT  # q / k norm statistics
        if not cp_sharded:
            t += b * s * lse  # context parallelism recomputes the softmax in backward instead
        t += b * s * d_tp * a  # the attention output (input of the output projection)
        if fp8:
            t += b * s * d_tp  # its FP8 copy for the output projection
        return t

    cp_sharded = cp > 1 and _cp_attention(model)
    terms = {
        "norm1_modulate": norm_modulate(),
        "self_attention": self_attention(cp_sharded),
        "self_out_gated": b * s_sp * d * a,  # projection output, kept for the gate's gradient
    }
    if model.temporal_attention:
        terms["temporal_norm"] = b * s_sp * (d * a + 2 * _STAT)
        # Under CP the temporal attention runs on frame-gathered tokens without lse rows
        # (all-to-all layout) — same counting rule as the CP-sharded self-attention.
        terms["temporal_attention"] = self_attention(cp > 1)
    if model.cond_tokens > 1:
        lc = model.cond_tokens
        t = b * s_sp * d * lin_in  # q projection input
        t += b * s * d_tp * a  # q
        t += b * lc * 2 * d_tp * a  # k, v of the condition tokens (one storage)
        t += b * s * lse + b * s * d_tp * a  # lse rows, output
        if model.cross_attn_gate:
            t += b * s * d_tp * a  # the ungated output, for the tanh gate's gradient
        terms["cross_attention"] = t
    terms["norm2_modulate"] = norm_modulate()
    terms["mlp"] = b * s_sp * d * lin_in + b * s * f_tp * (a + lin_in)  # fc1 in, GELU in / out
    terms["mlp_out_gated"] = b * s_sp * d * a
    # adaLN rows (one per sample, or per frame with per-frame timesteps): input + 6 vectors
    rows = frames if _per_frame_timesteps(model) else 1
    terms["adaln_rows"] = b * rows * 7 * d * a
    return terms


def _per_frame_timesteps(model: ModelConfig) -> bool:
    return model.is_video and model.first_frame_condition


def _row_modulation(model: ModelConfig) -> bool:
    """Per-frame adaLN rows go through the row-indexed modulation, which keeps the normalized
    input whatever kernel is selected (:func:`lumos_mcore.models.dit.layer.modulate_rows`)."""
    return _per_frame_timesteps(model)


def _cp_attention(model: ModelConfig) -> bool:
    """Whether the self-attention itself is context-parallel (full 3-D or image attention);
    spatial attention of the spatial + temporal video mode runs on whole frames."""
    return not model.temporal_attention


def _nonlayer_activations(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    micro_batch_size: int,
    act_bytes: int,
    tokens: int | None = None,
) -> tuple[int, int]:
    """(first stage, last stage) activation bytes outside the blocks: the patchified input,
    the final layer's norm / modulation / linear input and the loss inputs."""
    b, a = micro_batch_size, act_bytes
    d, p = model.hidden_size_, model.patch_size
    s = math.ceil((tokens or model.num_tokens) / parallel.cp)
    s_sp = math.ceil(s / parallel.tp) if parallel.sequence_parallel else s
    first = b * s * p * p * model.model_in_channels * a
    # condition embedder: its input tokens and the MLP's hidden / output rows (the output is the
    # cross-attention K/V input of every block, one storage); every pipeline stage runs it
    first += b * model.cond_tokens * (model.cond_channels + 3 * d) * a
    if _per_frame_timesteps(model):
        first += s * 8  # the per-token adaLN row index (int64)
    final_tensors = 4 if _per_frame_timesteps(model) else 3
    last = b * s_sp * (final_tensors * d * a + 2 * _STAT)
    if parallel.sequence_parallel:
        last += b * s_sp * d * a  # the final layer's input before the sequence gather
    last += b * s * p * p * model.in_channels * _STAT  # the fp32 noise-prediction error
    return first, last


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank at the peak of one train step (first pipeline stage)."""

    params: int
    grads: int
    optimizer: int
    ema: int
    activations: int  # kept for backward by all in-flight micro-batches
    working: int  # backward's extra: one recomputed chunk + one layer's gradient buffers
    in_flight: int  # micro-batches (x virtual chunks) whose activations are held at once
    layers: int  # blocks on the stage
    num_params: int
    layer_terms: dict[str, int] = field(default_factory=dict)
    encoders: int = 0  # frozen encoders' weights on the device (raw-media jobs)
    encode_working: int = 0  # peak of one encode call (perf/encoder_memory.py)

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer + self.ema

    @property
    def total(self) -> int:
        # Encoding runs when no DiT activations are alive (between micro-batches, or before
        # the step under pipeline parallelism): the two peaks do not add up.
        step = max(self.activations + self.working, self.encode_working)
        return self.static + self.encoders + step

    def fits(self, capacity_bytes: int, reserve: float = 0.9) -> bool:
        """Whether the total stays within ``reserve`` of the device memory (the rest is left
        for the CUDA context, library workspaces and allocator fragmentation)."""
        return self.total <= reserve * capacity_bytes

    def rows(self) -> list[tuple[str, float]]:
        """(component, GiB) rows for logs and reports."""
        rows = [
            ("params", self.params / GIB),
            ("grads (fp32 buffer)", self.grads / GIB),
            ("optimizer", self.optimizer / GIB),
            ("ema", self.ema / GIB),
            ("activations", self.activations / GIB),
            ("backward working set", self.working / GIB),
        ]
        if self.encoders or self.encode_working:
            rows += [
                ("frozen encoders", self.encoders / GIB),
                ("encode working set", self.encode_working / GIB),
            ]
        return rows + [("total", self.total / GIB)]

    def summary(self) -> str:
        """One log line; MiB for small (test / CPU) models, where GiB would read 0.00."""
        scale, unit = (1, "GiB") if self.total >= GIB else (1024, "MiB")
        return ", ".join(f"{name} {v * scale:.2f}" for name, v in self.rows()) + f" {unit}"


def estimate_memory(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    dp: int = 1,
    micro_batch_size: int = 1,
    num_microbatches: int = 1,
    bf16: bool = True,
    kernels: str = "torch",
    ema: bool = True,
    tokens: int | None = None,
) -> MemoryEstimate:
    """Peak memory of one rank of the first pipeline stage for a train step.

    ``bf16`` is the training dtype (bf16 weights / activations with fp32 master weights and
    grads), else fp32 throughout; ``kernels`` is the norm + modulate implementation
    (``lumos_mcore.ops``: ``triton`` keeps one tensor fewer per norm). ``num_microbatches`` is
    per step and data-parallel rank; it bounds how many a pipeline keeps in flight. ``tokens``
    is the sequence length of one micro-batch sample (default ``model.num_tokens``; a pack's
    capacity with ``data.pack``).
    """
    if dp < 1 or micro_batch_size < 1 or num_microbatches < 1:
        raise ValueError(
            f"dp={dp}, micro_batch_size={micro_batch_size}, num_microbatches="
            f"{num_microbatches}: all must be >= 1"
        )
    a = 2 if bf16 else 4
    pc = param_count(model, parallel, stage=0)
    n = pc.total
    params = n * a
    grads = n * 4  # megatron DDP keeps fp32 main grads (grad_reduce_in_fp32)
    opt_per_param = (4 + 4 + 4) if bf16 else (4 + 4)  # (+ fp32 master weights) + Adam m, v
    optimizer = n * opt_per_param
    if parallel.use_distributed_optimizer:  # sharded over the DP x CP ranks, as megatron does
        optimizer = math.ceil(optimizer / (dp * parallel.cp))
    ema_bytes = n * 4 if ema else 0

    terms = layer_activation_terms(
        model,
        parallel,
        micro_batch_size=micro_batch_size,
        act_bytes=a,
        kernels=kernels,
        tokens=tokens,
    )
    full_layer = sum(terms.values())
    s = math.ceil((tokens or model.num_tokens) / parallel.cp)
    s_sp = math.ceil(s / parallel.tp) if parallel.sequence_parallel else s
    chunk_input = micro_batch_size * s_sp * model.hidden_size_ * a  # a recompute chunk's input
    if model.recompute == "selective":
        # megatron recomputes the core attention: its inputs stay, the lse rows do not.
        heads = model.num_heads_ // parallel.tp
        lse_rows = micro_batch_size * s * heads * _STAT
        n_attn = 1 + (1 if model.temporal_attention else 0)
        full_layer -= n_attn * lse_rows if not (parallel.cp > 1 and _cp_attention(model)) else 0

    layers = pc.layers
    vpp = parallel.vpp or 1
    chunk_layers = math.ceil(layers / vpp)
    recompute_chunk = 0
    if model.recompute == "full":
        k = model.recompute_num_layers
        if model.recompute_method == "uniform":
            n_chunks = math.ceil(chunk_layers / k)
            per_chunk_mb = n_chunks * chunk_input
            recompute_chunk = min(k, chunk_layers) * full_layer
        else:  # block: the first k layers of each chunk recompute, the rest store everything
            k = min(k, chunk_layers)
            per_chunk_mb = k * chunk_input + (chunk_layers - k) * full_layer
            recompute_chunk = (1 if k else 0) * full_layer
    else:
        per_chunk_mb = chunk_layers * full_layer

    first, last = _nonlayer_activations(
        model, parallel, micro_batch_size=micro_batch_size, act_bytes=a, tokens=tokens
    )
    in_flight = _in_flight(parallel, num_microbatches)
    nonlayer = first + last if parallel.pp == 1 else first  # the first stage has no final layer
    activations = in_flight * (per_chunk_mb + nonlayer // vpp)

    # Backward of one layer allocates the gradients of its widest tensors (GELU in / out, the
    # q/k/v gradient) while the layer's own activations are still held.
    grads_one_layer = (
        micro_batch_size
        * s
        * (
            2 * int(model.hidden_size_ * model.mlp_ratio) // parallel.tp
            + 3 * model.hidden_size_ // parallel.tp
        )
        * a
    )
    working = recompute_chunk + grads_one_layer
    return MemoryEstimate(
        params=params,
        grads=grads,
        optimizer=optimizer,
        ema=ema_bytes,
        activations=activations,
        working=working,
        in_flight=in_flight,
        layers=layers,
        num_params=n,
        layer_terms=terms,
    )


def estimate_job_memory(
    model: ModelConfig,
    parallel: ParallelConfig,
    train,
    world_size: int,
    *,
    pack_capacity: int | None = None,
    bf16: bool | None = None,
    kernels: str = "torch",
    media: MediaDataConfig | None = None,
) -> MemoryEstimate:
    """:func:`estimate_memory` for a job's ``model`` / ``parallel`` / ``train`` sections on
    ``world_size`` ranks: data parallelism, micro-batches per step and EMA from the job.
    ``pack_capacity``: tokens per pack with ``data.pack`` (one pack per micro-batch); ``bf16``
    None resolves ``model.precision`` as the trainer does (auto: bf16 on CUDA). ``media``: a
    raw-media job's data section; its frozen encoders' weights and encode working set are
    added (:func:`lumos_mcore.perf.encoder_memory.estimate_encoder_memory`)."""
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tp*pp*cp={model_parallel}"
        )
    dp = world_size // model_parallel
    micro = 1 if pack_capacity else train.micro_batch_size
    if bf16 is None:
        precision = model.precision
        bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_available())
    est = estimate_memory(
        model,
        parallel,
        dp=dp,
        micro_batch_size=micro,
        num_microbatches=max(1, train.global_batch_size // (micro * dp)),
        bf16=bf16,
        kernels=kernels,
        ema=train.ema_decay > 0,
        tokens=pack_capacity,
    )
    if media is None:
        return est
    from lumos_mcore.perf.encoder_memory import estimate_media_encoder_memory

    enc = estimate_media_encoder_memory(media, micro_batch_size=micro, patch_size=model.patch_size)
    return dataclasses.replace(est, encoders=enc.weight_bytes, encode_working=enc.working)


def _in_flight(parallel: ParallelConfig, num_microbatches: int) -> int:
    """Micro-batch chunks whose activations the first stage holds at the 1F1B peak."""
    pp, vpp = parallel.pp, parallel.vpp or 1
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp, num_microbatches)
    # megatron's interleaved warm-up: (pp - 1) * 2 + (vpp - 1) * pp chunks, plus the one in
    # its steady-state forward.
    return min(num_microbatches * vpp, (pp - 1) * 2 + (vpp - 1) * pp + 1)


class SavedTensorBytes:
    """Measure what autograd keeps for backward: a ``saved_tensors_hooks`` pack hook that adds
    up the storages of saved tensors, each storage once, parameters excluded (the weights a
    linear saves are not activations). Device-independent and exact, unlike a peak-memory
    reading; used to check :func:`estimate_memory` and by ``tools/benchmark_cp_memory.py``.

    Use as ``with SavedTensorBytes(model.parameters()) as saved: loss = forward(...)``.
    """

    def __init__(self, params: Iterable[torch.Tensor] = ()) -> None:
        self.storages: dict[int, int] = {}
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def __call__(self, x: object) -> object:
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            if st.data_ptr() not in self._params:
                self.storages[st.data_ptr()] = st.nbytes()
        return x

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self, lambda x: x)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None

    @property
    def total(self) -> int:
        return sum(self.storages.values())

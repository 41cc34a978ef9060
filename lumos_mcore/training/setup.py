"""Build this rank's model chunks, megatron DDP wrapper, optimizer and lr schedule."""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import OptimConfig
from lumos_mcore.models.dit.model import LumosDiT, build_lumos_dit, build_transformer_config


def use_bf16(model_cfg: ModelConfig) -> bool:
    """bf16 on CUDA (``precision: auto``), fp32 on CPU where bf16 matmuls are slow."""
    if model_cfg.precision == "auto":
        return torch.cuda.is_available()
    return model_cfg.precision == "bf16"


def unwrap(module: nn.Module) -> LumosDiT:
    """Strip DDP / Float16Module wrappers."""
    while isinstance(module, (DistributedDataParallel, Float16Module)):
        module = module.module
    return module


def build_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    seed: int,
    wrap_ddp: bool = True,
) -> tuple[list[nn.Module], TransformerConfig]:
    """This rank's model chunks (one per virtual pipeline stage), ready for megatron schedules.

    Weights depend only on ``seed`` and the model config, not on the parallel layout (CPU
    initialisation of full matrices), so runs at different layouts start from the same model.
    """
    bf16 = use_bf16(model_cfg)
    config = build_transformer_config(
        model_cfg,
        tp=parallel_cfg.tp,
        pp=parallel_cfg.pp,
        cp=parallel_cfg.cp,
        vpp=parallel_cfg.vpp,
        sequence_parallel=parallel_cfg.sequence_parallel,
        bf16=bf16,
        cp_comm_type=parallel_cfg.cp_comm_type,
    )
    if parallel_cfg.vpp and parallel_cfg.pp == 2:
        # With two stages both p2p neighbours are the same rank; batched isend/irecv then
        # mixes up messages on gloo and NCCL alike (measured: silently wrong gradients).
        config.batch_p2p_comm = False
    torch.manual_seed(seed)
    stages = range(parallel_cfg.vpp) if parallel_cfg.vpp else [None]
    chunks: list[nn.Module] = []
    for vp_stage in stages:
        model = build_lumos_dit(model_cfg, config, vp_stage=vp_stage)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(Float16Module(config, model) if bf16 else model)
    if wrap_ddp:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
            use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
            # The trainer's NonFiniteGuard checks every step on all ranks together instead
            # (megatron's check raises on one rank, mid-collective, with no step or checkpoint).
            check_for_nan_in_grad=False,
        )
        chunks = [
            DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        config.finalize_model_grads_func = finalize_model_grads
        if parallel_cfg.overlap_grad_reduce:
            no_sync = [c.no_sync for c in chunks]
            config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            grad_sync = [c.start_grad_sync for c in chunks]
            config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    return chunks, config


def build_optimizer(
    chunks: list[nn.Module],
    optim_cfg: OptimConfig,
    *,
    bf16: bool,
    use_distributed_optimizer: bool,
    total_steps: int,
):
    """megatron AdamW (decoupled weight decay, no decay on biases / 1-D params) + schedule."""
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr if optim_cfg.min_lr is not None else optim_cfg.lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.beta1,
        adam_beta2=optim_cfg.beta2,
        adam_eps=optim_cfg.eps,
        clip_grad=optim_cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    use_fused_torch_adamw(optimizer)
    decay_steps = optim_cfg.lr_decay_steps or total_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim_cfg.warmup_steps else optim_cfg.lr,
        max_lr=optim_cfg.lr,
        min_lr=opt_config.min_lr,
        lr_warmup_steps=optim_cfg.warmup_steps,
        lr_decay_steps=max(decay_steps, optim_cfg.warmup_steps + 1),
        lr_decay_style=optim_cfg.lr_decay_style,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def use_fused_torch_adamw(optimizer) -> int:
    """Run megatron's torch ``AdamW`` fallback (no TE / Apex) as torch's fused kernel.

    Without TransformerEngine or Apex megatron builds ``torch.optim.AdamW`` with default
    options, which on CPU is the per-tensor Python loop: measured 2.5x slower than the fused
    kernel (one pass per tensor) on Lumos-S/2, about 2 % of a CPU train step. Same update rule,
    same state; call again after loading optimizer state (a checkpoint's param-group options
    replace the current ones). Returns the number of torch optimizers switched.
    """
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) not in (torch.optim.AdamW, torch.optim.Adam):
            continue  # TE FusedAdam / Apex: fused already
        params = [p for g in inner.param_groups for p in g["params"]]
        devices = {p.device.type for p in params}
        if not params or len(devices) != 1 or not devices <= {"cpu", "cuda"}:
            continue
        if any(not p.is_floating_point() for p in params):
            continue
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False
        switched += 1
    return switched


def select_kernels(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, micro_batch_size: int
) -> dict:
    """Choose Triton kernel or PyTorch for each fused DiT op at this run's shape (collective).

    On CUDA every rank times both paths (:func:`lumos_mcore.ops.autoselect`) on the local
    sequence shard (after context and sequence parallelism), and all ranks adopt the same
    choice; without it a multi-process run keeps the PyTorch references. Call on every rank
    after the parallel state is set up; a no-op (empty result) without CUDA.
    """
    if not torch.cuda.is_available():
        return {}
    from lumos_mcore import ops

    cp_tokens = max(model_cfg.num_tokens // parallel_cfg.cp, 1)
    sp_tokens = cp_tokens // parallel_cfg.tp if parallel_cfg.sequence_parallel else cp_tokens
    shape = {
        "batch": micro_batch_size,
        "hidden_size": model_cfg.hidden_size_,
        "num_heads": model_cfg.num_heads_ // parallel_cfg.tp,
        "head_dim": model_cfg.hidden_size_ // model_cfg.num_heads_,
        "dtype": torch.bfloat16 if use_bf16(model_cfg) else torch.float32,
        "norm": model_cfg.norm,
    }
    # The norm / residual ops see the sequence-parallel shard; RoPE rotates q and k after the
    # QKV projection has gathered it (this rank's context-parallel tokens, its TP heads).
    elementwise = ("norm_modulate", "gated_residual")
    choices = ops.autoselect(seq_len=max(sp_tokens, 1), ops=elementwise, **shape)
    if model_cfg.pos_embed == "rope":
        choices.update(ops.autoselect(seq_len=cp_tokens, ops=("rope3d",), **shape))
    return choices

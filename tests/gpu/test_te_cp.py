"""TransformerEngine context parallelism (2 GPUs): CP=2 equals CP=1 for every comm type.

Each rank first runs the whole batch at CP=1 (the reference), then the same weights at CP=2
with TE's ``cp_comm_type`` p2p / all_gather / a2a; the model gathers its prediction over CP,
and the parameter gradients (each CP rank's share of the tokens) are summed over the CP group.
"""

from __future__ import annotations

import torch

from tests.dist_utils import run_distributed
from tests.gpu.helpers import requires_2_gpus, requires_te, tiny_model_kwargs

pytestmark = [requires_te, requires_2_gpus]

KW = tiny_model_kwargs()
COMM_TYPES = ("p2p", "all_gather", "a2a")


def _run(model, batch, grad_out):
    model.zero_grad(set_to_none=True)
    out = model(batch["latents"], batch["timesteps"], batch["cond"])
    out.backward(grad_out.to(out.dtype))
    return out.detach().float(), {
        n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None
    }


def _cp_rank(rank, world, comm_types):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.parallel.state import initialize_parallel
    from tests.gpu.helpers import build_dit, randomize_, rel_err, tiny_batch

    # The parallel state sets this rank's CUDA device: build the inputs after it.
    initialize_parallel(ParallelConfig(), num_attention_heads=4, num_layers=3)
    batch = tiny_batch(KW)
    grad_out = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(9)).cuda()
    ref_model, _ = build_dit(KW, "te")
    randomize_(ref_model)
    out_ref, g_ref = _run(ref_model, batch, grad_out)
    state = ref_model.state_dict()
    errors = {}
    for comm in comm_types:
        initialize_parallel(
            ParallelConfig(cp=2, cp_comm_type=comm), num_attention_heads=4, num_layers=3
        )
        model, _ = build_dit(KW, "te", cp=2, cp_comm_type=comm)
        model.load_state_dict(state)
        out, grads = _run(model, batch, grad_out)
        group = parallel_state.get_context_parallel_group()
        for g in grads.values():
            dist.all_reduce(g, group=group)
        errors[comm] = (
            rel_err(out, out_ref),
            max(rel_err(grads[n], g_ref[n]) for n in g_ref),
        )
    return errors


def test_te_context_parallel_matches_cp1():
    results = run_distributed(_cp_rank, 2, COMM_TYPES, timeout=600)
    for rank, errors in enumerate(results):
        for comm, (out_err, grad_err) in errors.items():
            assert out_err < 2e-2, f"rank {rank} cp_comm_type={comm}: output rel err {out_err:.3g}"
            assert grad_err < 5e-2, f"rank {rank} cp_comm_type={comm}: grad rel err {grad_err:.3g}"

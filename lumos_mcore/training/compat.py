"""Narrow fixes for megatron-core paths that only break without Apex / TransformerEngine.

Without Apex/TE, megatron's distributed optimizer wraps ``torch.optim.AdamW``, whose state
carries a per-parameter ``step``. Loading a *fully reshardable* distributed-optimizer
checkpoint then fails: ``load_state_dict`` first restores ``step`` itself, and
``_set_main_param_and_optimizer_states`` afterwards copies every state key — ``step``
included — from the checkpoint tensors, which hold only ``param``/``exp_avg``/``exp_avg_sq``
(KeyError). With TE/Apex (GPU clusters) the fused Adam keeps no per-param step and nothing is
patched. The fix copies only the keys the checkpoint provides.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)
_APPLIED = False


def apply_optimizer_checkpoint_fix() -> bool:
    """Patch once when megatron runs on torch's AdamW; returns whether a patch is active."""
    global _APPLIED
    if _APPLIED:
        return True
    from megatron.core.optimizer import distrib_optimizer as dopt

    if getattr(dopt, "HAVE_APEX_OR_TE", True):
        return False
    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            step = state.pop("step")  # already restored by load_state_dict
            try:
                return original(self, model_param, tensors)
            finally:
                state["step"] = step
        return original(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _APPLIED = True
    log.debug("patched DistributedOptimizer._set_main_param_and_optimizer_states (torch AdamW)")
    return True

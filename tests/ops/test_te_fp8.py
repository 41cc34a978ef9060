"""FP8 weight caches are refreshed for forwards outside megatron's schedules.

megatron's TE linears keep an ``is_first_microbatch`` flag (cleared after each forward; while it
is clear TE reuses its cached FP8 weights). A stand-in linear with that flag shows what a
forward would see after the EMA weights are swapped in and out.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from lumos_mcore.ops.te_fp8 import refresh_fp8_weight_cache
from lumos_mcore.training.ema import EMA


class CachingLinear(nn.Linear):
    """Records whether each forward would re-cast its weight, then clears the flag (as TE)."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.is_first_microbatch = True
        self.recast: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.recast.append(self.is_first_microbatch)
        self.is_first_microbatch = False
        return super().forward(x)


class Model(MegatronModule):
    def __init__(self, fp8: str | None) -> None:
        config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
        config.fp8 = fp8  # set after validation: no TransformerEngine on CPU machines
        super().__init__(config=config)
        self.linear = CachingLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_ema_swap_recasts_the_fp8_weights_in_and_out() -> None:
    model = Model("hybrid")
    x = torch.randn(2, 4)
    model(x)  # the training step's first micro-batch
    model(x)  # a later micro-batch: cached weights
    ema = EMA([model], decay=0.9)
    with ema.swapped_in([model]):
        model(x)  # EMA weights: must be cast anew
    model(x)  # training weights again
    assert model.linear.recast == [True, False, True, True]


def test_refresh_is_a_no_op_without_fp8() -> None:
    model = Model(None)
    model(torch.randn(2, 4))
    refresh_fp8_weight_cache([model])
    assert model.linear.is_first_microbatch is False

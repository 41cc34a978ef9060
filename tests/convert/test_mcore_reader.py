"""The one-process checkpoint reader on both layouts of megatron-core's non-sharded state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from lumos_mcore.convert import McoreCheckpointReader

COMMON = {"train_state": {"model_config": {"hidden_size": 4, "depth": 2}, "step": 7}}


def _write(folder: Path, tensors: dict[str, torch.Tensor], common_inside: bool) -> None:
    """A torch_dist folder as megatron-core writes it: up to 0.18 the common state is a
    ``common.pt`` beside the DCP files, from 0.19 one ``common_state`` object inside them."""
    state: dict = dict(tensors)
    if common_inside:
        state["common_state/shard_0_1"] = [COMMON]  # a ShardedObject's data, as 0.19 saves it
    dcp.save(
        state,
        checkpoint_id=str(folder),
        no_dist=True,
        planner=DefaultSavePlanner(flatten_state_dict=False),
    )
    if not common_inside:
        torch.save(COMMON, folder / "common.pt")
    meta = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    (folder / "metadata.json").write_text(json.dumps(meta))


def test_both_common_state_layouts_read_the_same(tmp_path):
    tensors = {
        "decoder.layers.mlp.linear_fc1.weight": torch.randn(2, 6, 4),  # stacked over 2 layers
        "final_layer.linear.weight": torch.randn(3, 4),
    }
    _write(tmp_path / "legacy", tensors, common_inside=False)
    _write(tmp_path / "current", tensors, common_inside=True)
    legacy, current = (
        McoreCheckpointReader(tmp_path / "legacy"),
        McoreCheckpointReader(tmp_path / "current"),
    )
    assert legacy.model_config == current.model_config == COMMON["train_state"]["model_config"]
    assert current.common["train_state"]["step"] == 7
    # the common-state bytes are not mistaken for a weight
    assert (
        [s.name for s in current.specs()]
        == [s.name for s in legacy.specs()]
        == [
            "decoder.layers.0.mlp.linear_fc1.weight",
            "decoder.layers.1.mlp.linear_fc1.weight",
            "final_layer.linear.weight",
        ]
    )
    got = dict(current.tensors())
    assert torch.equal(
        got["decoder.layers.1.mlp.linear_fc1.weight"],
        tensors["decoder.layers.mlp.linear_fc1.weight"][1],
    )
    assert torch.equal(got["final_layer.linear.weight"], tensors["final_layer.linear.weight"])


def test_a_folder_without_common_state_is_refused_by_name(tmp_path):
    _write(tmp_path / "ckpt", {"final_layer.linear.weight": torch.randn(3, 4)}, common_inside=False)
    (tmp_path / "ckpt" / "common.pt").unlink()
    with pytest.raises(FileNotFoundError, match="neither common.pt nor a 'common_state' object"):
        McoreCheckpointReader(tmp_path / "ckpt")

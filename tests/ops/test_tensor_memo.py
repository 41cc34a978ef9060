"""memo_on: one build per tensor as it is, rebuilt after in-place writes, forgotten with it."""

from __future__ import annotations

import gc

import torch

from lumos_mcore.ops.tensor_memo import memo_on, memo_size


def test_builds_once_per_tensor_and_tag():
    builds = []

    def build(tag):
        builds.append(tag)
        return len(builds)

    a, b = torch.zeros(3), torch.zeros(3)
    assert memo_on((a,), "x", lambda: build("x")) == 1
    assert memo_on((a,), "x", lambda: build("x")) == 1  # same tensor, same tag: no build
    assert memo_on((a,), "y", lambda: build("y")) == 2  # another tag
    assert memo_on((b,), "x", lambda: build("x")) == 3  # an equal but different tensor
    assert memo_on((a, b), "x", lambda: build("x")) == 4  # keyed on every tensor
    assert builds == ["x", "y", "x", "x"]


def test_in_place_writes_rebuild():
    a = torch.zeros(4)
    assert memo_on((a,), "sum", lambda: float(a.sum())) == 0.0
    a[1] = 2.0
    assert memo_on((a,), "sum", lambda: float(a.sum())) == 2.0
    a.add_(1.0)
    assert memo_on((a,), "sum", lambda: float(a.sum())) == 6.0


def test_freed_tensors_take_their_entries_and_recycled_ids_miss():
    before = memo_size()
    a = torch.ones(2)
    memo_on((a,), "n", lambda: 1)
    memo_on((a,), "m", lambda: 2)
    assert memo_size() == before + 2
    stale = id(a)
    del a
    gc.collect()
    assert memo_size() == before
    for _ in range(50):  # new tensors, some at the freed address: never the old value
        t = torch.ones(2)
        assert memo_on((t,), "n", lambda: "fresh") == "fresh"
        if id(t) == stale:
            break
        del t


def test_inference_tensors_are_built_every_time():
    """Made under torch.inference_mode, a tensor has no version counter to notice in-place
    writes: no memo (and no crash reading it)."""
    with torch.inference_mode():
        a = torch.zeros(2)
        assert memo_on((a,), "n", lambda: float(a.sum())) == 0.0
        a += 1.0
        assert memo_on((a,), "n", lambda: float(a.sum())) == 2.0

"""Bucketing samples of different sizes into packs, and packs onto data-parallel ranks.

A pack is one sequence of several samples (images, videos of any length and resolution; see
:class:`~lumos_mcore.models.dit.layout.SequenceLayout`). Context-parallel ranks always get equal
shares of a pack (the layout splits every pack evenly), so balance is only a question across
data-parallel ranks: every rank must run the same number of micro-batches (megatron's schedules
and DDP assume it), and the step time is set by the rank with the most work. Hence:

1. :func:`pack_by_tokens` — first-fit decreasing: samples sorted by token count, each put in the
   first pack it fits (``capacity`` tokens), so packs come out nearly full;
2. :func:`balance_packs` — longest-processing-time assignment of packs to ranks under the
   constraint that every rank gets the same number of packs.

Work is counted in tokens by default (linear layers dominate below ~8K tokens per sample at
D = 1152, see the design notes); ``cost="attention"`` counts ``tokens + tokens**2 / knee`` per
sample for long-video buckets where attention dominates.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["balance_packs", "pack_by_tokens", "plan_packs", "sample_cost"]


def sample_cost(tokens: int, cost: str = "tokens", knee: int = 8192) -> float:
    """Work of one sample: its tokens, or tokens plus the attention term ``tokens^2 / knee``."""
    if cost == "tokens":
        return float(tokens)
    if cost == "attention":
        return tokens + tokens * tokens / knee
    raise ValueError(f"cost={cost!r}: choose 'tokens' or 'attention'")


def pack_by_tokens(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into packs of at most ``capacity`` tokens (first-fit
    decreasing); a sample longer than ``capacity`` is an error."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"sample {i} has {lengths[i]} tokens, more than the pack capacity {capacity}"
        )
    packs: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for p, room in enumerate(free):
            if lengths[i] <= room:
                packs[p].append(i)
                free[p] -= lengths[i]
                break
        else:
            packs.append([i])
            free.append(capacity - lengths[i])
    return packs


def balance_packs(costs: Sequence[float], num_ranks: int) -> list[list[int]]:
    """Pack indices per rank: ``len(costs) / num_ranks`` packs each, loads balanced (LPT: the
    costliest pack goes to the least-loaded rank that still has room)."""
    if num_ranks < 1 or len(costs) % num_ranks:
        raise ValueError(
            f"{len(costs)} packs do not split evenly over {num_ranks} data-parallel ranks"
        )
    per_rank = len(costs) // num_ranks
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    load = [0.0] * num_ranks
    for p in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min((r for r in range(num_ranks) if len(ranks[r]) < per_rank), key=lambda r: load[r])
        ranks[r].append(p)
        load[r] += costs[p]
    return ranks


def plan_packs(
    lengths: Sequence[int],
    capacity: int,
    num_ranks: int,
    *,
    cost: str = "tokens",
) -> tuple[list[list[list[int]]], list[int]]:
    """Packs of sample indices for each DP rank, plus the samples left for a later step.

    The packs of :func:`pack_by_tokens` are trimmed to a multiple of ``num_ranks`` (the
    lightest packs' samples are returned as left over) and balanced with
    :func:`balance_packs`. Returns ``(per_rank_packs, leftover)``.
    """
    packs = pack_by_tokens(lengths, capacity)
    pack_cost = [sum(sample_cost(lengths[i], cost) for i in p) for p in packs]
    keep = len(packs) - len(packs) % num_ranks
    order = sorted(range(len(packs)), key=lambda p: (-pack_cost[p], p))
    kept, dropped = order[:keep], order[keep:]
    leftover = sorted(i for p in dropped for i in packs[p])
    assignment = balance_packs([pack_cost[p] for p in kept], num_ranks)
    return [[packs[kept[k]] for k in rank] for rank in assignment], leftover

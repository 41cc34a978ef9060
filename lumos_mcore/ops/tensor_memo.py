"""Values derived from a tensor, computed once while that tensor lives unchanged.

Every layer of a forward (and its recompute) receives the *same* condition mask and
``cu_seqlens`` objects. What the attention derives from them -- the gather index of the valid
keys, the longest sequence, a bounds check -- reads a GPU value back to the host, which stalls
the stream; 28 layers x (forward + recompute) would stall it 56+ times a step for one answer.
:func:`memo_on` keys a result on the tensors' identity and version counter (in-place writes
bump it), holds them only weakly and drops the entry when one of them is freed, so a new
tensor at a recycled address never sees an old result.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

from torch import Tensor

__all__ = ["memo_on", "memo_size"]

T = TypeVar("T")

# key -> (weak refs to the key tensors, value)
_ENTRIES: dict[tuple, tuple[tuple[weakref.ref, ...], object]] = {}


def _drop(key: tuple) -> Callable[[weakref.ref], None]:
    def callback(_ref: weakref.ref) -> None:
        _ENTRIES.pop(key, None)

    return callback


def memo_on(tensors: tuple[Tensor, ...], tag: Hashable, build: Callable[[], T]) -> T:
    """``build()`` once per (``tensors`` as they are now, ``tag``); later calls return it.

    ``build`` must not keep a reference to ``tensors`` in its result (the entry would keep them
    alive until the process ends). ``tag`` names what is derived and any ints it depends on.
    Tensors made under ``torch.inference_mode`` track no version, so they are never memoised.
    """
    if any(t.is_inference() for t in tensors):  # no version counter: in-place writes unseen
        return build()
    key = (tag, *((id(t), t._version) for t in tensors))
    hit = _ENTRIES.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], tensors)):
        return hit[1]  # type: ignore[return-value]
    value = build()
    _ENTRIES[key] = (tuple(weakref.ref(t, _drop(key)) for t in tensors), value)
    return value


def memo_size() -> int:
    """Entries held (tests check that freed tensors take their entries with them)."""
    return len(_ENTRIES)

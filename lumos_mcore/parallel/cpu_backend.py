"""Run megatron-core's real distributed code paths on CPU (gloo) when CUDA is absent.

megatron-core hard-codes CUDA in a handful of places (device literals, ``torch.cuda``
calls, CUDA RNG state, ``torch.cuda.*Tensor`` type names). On a machine without CUDA,
``apply_cpu_backend()`` redirects exactly those places so that TP/SP/PP/DP, megatron DDP,
the distributed optimizer, activation recompute and dist_checkpointing run unmodified on
gloo and can be checked against single-process references. megatron-core is never copied
or edited on disk; on a CUDA machine nothing is touched.

Two kinds of patch are used, both listed in ``PATCH_TARGETS`` so that a test fails loudly
if megatron-core renames or removes a symbol:

* **Namespace shim** (``"<module>:torch"``): the module-global name ``torch`` of one
  megatron module is replaced by a proxy of the real ``torch`` whose ``torch.cuda`` answers
  ``current_device()`` with the CPU device, makes ``synchronize``/streams no-ops and serves
  RNG state from the CPU default generator, and whose tensor factories (``zeros``,
  ``empty``, ``tensor``, ...) map a CUDA ``device=`` to CPU. Everything else forwards to
  the real module, so unknown CUDA calls still fail as loudly as before. Torch itself and
  every other module keep the real ``torch``.
* **Function / method wrap** (``"<module>:<qualname>"``): a narrow wrapper around one
  megatron callable.

What is patched and why (one line each):

- ``utils:torch`` -- ``GlobalMemoryBuffer.get_tensor`` and ``local_multi_tensor_l2_norm``
  allocate on the CUDA device (SP gather buffers, grad norm without apex/TE).
- ``tensor_parallel.mappings:torch`` -- SP all-gather / reduce-scatter outputs are
  allocated on ``torch.cuda.current_device()``.
- ``tensor_parallel.layers:torch`` -- SP input gathers and weight-grad buffers in the
  Column/RowParallelLinear autograd function use ``torch.cuda.current_device()``.
- ``tensor_parallel.utils:torch`` -- ``split_tensor_into_1d_equal_chunks`` /
  ``gather_split_1d_tensor`` (distributed saved activations) allocate on CUDA.
- ``tensor_parallel.random:torch`` -- ``CudaRNGStatesTracker.add`` and
  ``model_parallel_cuda_manual_seed`` seed/read ``torch.cuda`` RNG; the shim serves the
  CPU default generator, so the stock tracker becomes a CPU-generator tracker.
- ``tensor_parallel.random:_get_cuda_rng_state`` / ``_set_cuda_rng_state`` -- read and
  write CUDA generator state in ``fork()`` and in ``CheckpointFunction`` (recompute);
  redirected to the CPU default generator, which is what CPU dropout draws from.
- logger ``megatron.core.tensor_parallel.random`` -- a filter drops the "CPU RNG state changed
  within GPU RNG context" warning of ``fork()``, which is always true when the forked stream
  *is* the CPU generator.
- ``pipeline_parallel.schedules:torch`` -- ``device="cuda"`` token counters in every
  ``forward_backward_*`` function.
- ``pipeline_parallel.p2p_communication:torch`` -- receive buffers on
  ``torch.cuda.current_device()`` and ``torch.cuda.synchronize()`` after batched p2p.
- ``pipeline_parallel.p2p_communication:_batched_p2p_ops`` -- with two pipeline stages the
  previous and next stage are the same rank, and gloo pairs the batched isend/irecv of a
  ``send_forward_backward_recv_forward_backward`` (interleaved schedule) by order, which
  silently swaps the forward and backward tensors; such calls go through megatron's own
  non-batched ``_p2p_ops`` (parity-ordered, one direction on another group) instead.
- ``parallel_state:torch`` -- ``torch.cuda.synchronize()`` in group set-up / timeouts.
- ``distributed.param_and_grad_buffer:torch`` -- megatron DDP buffers on the CUDA device,
  communication streams (``torch.cuda.stream`` / ``default_stream``).
- ``distributed.distributed_data_parallel:torch`` -- ``torch.cuda.Stream`` for partial
  distributed-optimizer instances, ``synchronize`` / ``empty_cache`` around buffer offload.
- ``optimizer.clip_grads:torch`` -- grad-norm / clip / zero-count scratch tensors with
  ``device='cuda'``.
- ``optimizer.clip_grads:clip_grad_by_total_norm_fp32`` (and its import in
  ``optimizer.optimizer``) -- asserts ``grad.type() == 'torch.cuda.FloatTensor'``.
- ``optimizer.optimizer:torch`` -- found-inf / loss-scale tensors with ``device='cuda'``.
- ``optimizer.grad_scaler:torch`` -- loss-scale tensors with ``device='cuda'`` (fp16).
- ``optimizer.distrib_optimizer:torch`` -- shard buffers on ``torch.cuda.current_device()``.
- ``optimizer.distrib_optimizer:DistributedOptimizer.__init__`` -- accepts only
  ``torch.cuda.{Float,Half,BFloat16}Tensor`` params (``Tensor.type()`` check).
- ``optimizer.distrib_optimizer:DistributedOptimizer.get_parameter_state_dp_zero`` -- its
  non-gloo branch calls ``Tensor.cuda()`` (fully reshardable checkpoints); forced to gloo.
- ``optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__`` -- same type check
  for the non-distributed mixed-precision optimizer.
- ``rerun_state_machine:torch`` -- result-validation tensors with ``device='cuda'``.
- ``timers:torch`` -- ``torch.cuda.synchronize()`` and the CUDA all-gather buffer.
- ``dist_checkpointing.strategies.{filesystem_async,async_utils,fully_parallel,
  state_dict_saver}:torch`` -- ``torch.cuda.synchronize()`` and CUDA flag tensors around
  (async) saves, and the all-reduced liveness / call-index tensors of ``AsyncCallsQueue``.
- ``dist_checkpointing.exchange_utils:torch`` and ``tensor_aware_state_dict:torch`` --
  CUDA buffers when shards are exchanged between ranks.
- ``transformer.dot_product_attention:torch`` -- ``softmax_offset`` allocated on CUDA.
- ``transformer.utils:torch`` -- default causal / sliding-window masks on ``"cuda"``.
- ``transformer.module:torch`` / ``transformer.transformer_layer:torch`` /
  ``transformer.attention:torch`` -- static inputs and KV caches on the CUDA device.
- ``models.common.embeddings.rotary_pos_embedding:torch`` -- RoPE frequencies on CUDA.
- ``transformer.torch_norm:WrappedTorchNorm.__new__`` -- refuses ``sequence_parallel``;
  without TE we build the plain torch norm and mark its params ``sequence_parallel=True``
  so ``finalize_model_grads`` all-reduces their grads over the TP group.

Limitations: the ``Tensor.type()`` rewrite is scoped to the duration of the wrapped call
(single-threaded construction); ``.cuda()`` *tensor method* calls (``tensor_parallel.data``,
fully-parallel checkpoint exchange) are not redirected.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["PATCH_TARGETS", "apply_cpu_backend", "cpu_backend_active", "resolve_target"]

_MC = "megatron.core"

# Modules whose global ``torch`` is replaced by the CPU proxy.
_SHIMMED_MODULES: tuple[str, ...] = (
    f"{_MC}.utils",
    f"{_MC}.tensor_parallel.mappings",
    f"{_MC}.tensor_parallel.layers",
    f"{_MC}.tensor_parallel.utils",
    f"{_MC}.tensor_parallel.random",
    f"{_MC}.pipeline_parallel.schedules",
    f"{_MC}.pipeline_parallel.p2p_communication",
    f"{_MC}.parallel_state",
    f"{_MC}.distributed.param_and_grad_buffer",
    f"{_MC}.distributed.distributed_data_parallel",
    f"{_MC}.optimizer.clip_grads",
    f"{_MC}.optimizer.optimizer",
    f"{_MC}.optimizer.grad_scaler",
    f"{_MC}.optimizer.distrib_optimizer",
    f"{_MC}.rerun_state_machine",
    f"{_MC}.timers",
    f"{_MC}.dist_checkpointing.strategies.filesystem_async",
    f"{_MC}.dist_checkpointing.strategies.async_utils",
    f"{_MC}.dist_checkpointing.strategies.fully_parallel",
    f"{_MC}.dist_checkpointing.strategies.state_dict_saver",
    f"{_MC}.dist_checkpointing.exchange_utils",
    f"{_MC}.dist_checkpointing.tensor_aware_state_dict",
    f"{_MC}.transformer.dot_product_attention",
    f"{_MC}.transformer.utils",
    f"{_MC}.transformer.module",
    f"{_MC}.transformer.transformer_layer",
    f"{_MC}.transformer.attention",
    f"{_MC}.models.common.embeddings.rotary_pos_embedding",
)

# Callables that are replaced by a narrow wrapper (or a CPU implementation).
_WRAPPED_CALLABLES: tuple[str, ...] = (
    f"{_MC}.tensor_parallel.random:_get_cuda_rng_state",
    f"{_MC}.tensor_parallel.random:_set_cuda_rng_state",
    f"{_MC}.tensor_parallel.random:CudaRNGStatesTracker.add",
    f"{_MC}.tensor_parallel.random:CudaRNGStatesTracker.fork",
    f"{_MC}.tensor_parallel.random:model_parallel_cuda_manual_seed",
    f"{_MC}.tensor_parallel.random:CheckpointFunction.forward",
    f"{_MC}.tensor_parallel.random:CheckpointFunction.backward",
    f"{_MC}.pipeline_parallel.p2p_communication:_batched_p2p_ops",
    f"{_MC}.pipeline_parallel.p2p_communication:_p2p_ops",
    f"{_MC}.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
    f"{_MC}.optimizer.optimizer:clip_grad_by_total_norm_fp32",
    f"{_MC}.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
    f"{_MC}.optimizer.distrib_optimizer:DistributedOptimizer.get_parameter_state_dp_zero",
    f"{_MC}.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
    f"{_MC}.transformer.torch_norm:WrappedTorchNorm.__new__",
)

#: Every megatron-core symbol this module relies on, as ``"module:qualname"``. A few are
#: used rather than replaced (``CudaRNGStatesTracker``, ``CheckpointFunction`` and
#: ``model_parallel_cuda_manual_seed`` reach the patched RNG helpers; ``_p2p_ops`` is where
#: two-stage gloo p2p is routed): they must keep existing for the patches to mean anything.
PATCH_TARGETS: list[str] = [f"{m}:torch" for m in _SHIMMED_MODULES] + list(_WRAPPED_CALLABLES)

_ACTIVE = False
_REAL_TORCH = torch


def resolve_target(target: str) -> Any:
    """Import ``"module:qualname"`` and return the object; raises if it does not exist."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def cpu_backend_active() -> bool:
    """True once ``apply_cpu_backend`` has redirected megatron-core to CPU."""
    return _ACTIVE


# --------------------------------------------------------------------------- torch proxy


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal in torch's factory APIs.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a tensor factory so that a CUDA ``device=`` argument lands on CPU."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for a CUDA stream: CPU kernels run synchronously in program order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> None:
        return event


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by a shimmed megatron module when CUDA is absent."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")
        self.Stream = _NullStream

    def __getattr__(self, name: str) -> Any:
        return getattr(_REAL_TORCH.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    @staticmethod
    def default_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    # RNG: the CPU default generator plays the role of the CUDA default generator.
    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.default_generator.get_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = None) -> None:
        torch.default_generator.set_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))


_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "arange",
    "rand",
    "randn",
    "randint",
)


class _CpuTorch(types.ModuleType):
    """The real ``torch`` with CUDA device requests mapped to CPU (see module docstring)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(_REAL_TORCH, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(_REAL_TORCH, name)


# ------------------------------------------------------------------------ narrow wrappers


def _cpu_get_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    """CPU replacement of ``random._get_cuda_rng_state``: the default CPU generator state."""
    return torch.default_generator.get_state()  # a fresh ByteTensor, already a copy


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """CPU replacement of ``random._set_cuda_rng_state``."""
    torch.default_generator.set_state(new_state)


def _cpu_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
    """``Tensor.type()`` that reports CPU tensors with their ``torch.cuda.*`` name."""
    if dtype is None and not kw:
        name = _ORIG_TENSOR_TYPE(self)
        if not self.is_cuda and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name
    return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kw)


_ORIG_TENSOR_TYPE = torch.Tensor.type


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """Let megatron's ``param.type() == 'torch.cuda.FloatTensor'`` checks accept CPU params."""
    if torch.Tensor.type is _cpu_type:  # nested call
        yield
        return
    torch.Tensor.type = _cpu_type  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = _ORIG_TENSOR_TYPE  # type: ignore[method-assign]


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper.__lumos_cpu_patched__ = True  # type: ignore[attr-defined]
    return wrapper


def _unbatched_when_neighbours_coincide(
    batched: Callable[..., Any], unbatched: Callable[..., dict]
) -> Callable[..., Any]:
    """Route two-stage (prev == next) gloo p2p through megatron's non-batched ops."""

    @functools.wraps(batched)
    def wrapper(**kwargs: Any) -> Any:
        same_peer = kwargs["prev_pipeline_rank"] == kwargs["next_pipeline_rank"]
        if same_peer and torch.distributed.get_backend(kwargs["group"]) == "gloo":
            return list(unbatched(**kwargs).values())  # callers wait on every request
        return batched(**kwargs)

    return wrapper


class _DropCpuRngWarning(logging.Filter):
    """``fork()`` warns when the CPU RNG moved inside it; on CPU that is the forked stream."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_torch_norm(cls: type) -> None:
    orig_new = cls.__new__

    def __new__(klass: type, config: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:  # noqa: N807
        if not getattr(config, "sequence_parallel", False):
            return orig_new(klass, config, *args, **kwargs)
        cfg = copy.copy(config)  # shallow: avoid re-running TransformerConfig validation
        cfg.sequence_parallel = False
        norm = orig_new(klass, cfg, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True  # grads differ per TP rank under SP -> all-reduce them
        return norm

    cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]


def _gather_over_gloo(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Force the gloo branch of the distributed optimizer's DP-rank-0 state gather.

    The non-gloo branch moves each shard to the GPU with ``Tensor.cuda()`` before gathering
    (used by the fully reshardable checkpoint format); on CPU every group is gloo anyway.
    """

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            args = (True, *args[1:])
        else:
            kwargs["use_gloo_comm"] = True
        return fn(self, *args, **kwargs)

    return wrapper


def apply_cpu_backend() -> bool:
    """Redirect megatron-core's CUDA-only code to CPU. Idempotent.

    Returns False (and changes nothing) when CUDA is available, True when the CPU backend
    is (now or already) active. Call before building models or optimizers.
    """
    global _ACTIVE
    if torch.cuda.is_available():
        return False
    if _ACTIVE:
        return True
    for target in PATCH_TARGETS:  # fail before patching anything if mcore moved underneath
        resolve_target(target)

    proxy = _CpuTorch()
    for module_name in _SHIMMED_MODULES:
        importlib.import_module(module_name).torch = proxy

    rnd = importlib.import_module(f"{_MC}.tensor_parallel.random")
    rnd._get_cuda_rng_state = _cpu_get_rng_state
    rnd._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(rnd.__name__).addFilter(_DropCpuRngWarning())

    p2p = importlib.import_module(f"{_MC}.pipeline_parallel.p2p_communication")
    p2p._batched_p2p_ops = _unbatched_when_neighbours_coincide(p2p._batched_p2p_ops, p2p._p2p_ops)

    clip = importlib.import_module(f"{_MC}.optimizer.clip_grads")
    opt = importlib.import_module(f"{_MC}.optimizer.optimizer")
    wrapped_clip = _with_cuda_type_names(clip.clip_grad_by_total_norm_fp32)
    clip.clip_grad_by_total_norm_fp32 = wrapped_clip
    opt.clip_grad_by_total_norm_fp32 = wrapped_clip
    opt.Float16OptimizerWithFloat16Params.__init__ = _with_cuda_type_names(
        opt.Float16OptimizerWithFloat16Params.__init__
    )
    dopt = importlib.import_module(f"{_MC}.optimizer.distrib_optimizer")
    dopt.DistributedOptimizer.__init__ = _with_cuda_type_names(dopt.DistributedOptimizer.__init__)
    dopt.DistributedOptimizer.get_parameter_state_dp_zero = _gather_over_gloo(
        dopt.DistributedOptimizer.get_parameter_state_dp_zero
    )

    _patch_torch_norm(importlib.import_module(f"{_MC}.transformer.torch_norm").WrappedTorchNorm)

    _ACTIVE = True
    return True

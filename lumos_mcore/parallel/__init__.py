"""Distributed foundation: process groups, parallel layout and the CPU (gloo) backend."""

from lumos_mcore.parallel.cpu_backend import PATCH_TARGETS, apply_cpu_backend, cpu_backend_active
from lumos_mcore.parallel.state import (
    ParallelInfo,
    destroy_parallel,
    find_free_port,
    init_distributed,
    initialize_parallel,
)

__all__ = [
    "PATCH_TARGETS",
    "ParallelInfo",
    "apply_cpu_backend",
    "cpu_backend_active",
    "destroy_parallel",
    "find_free_port",
    "init_distributed",
    "initialize_parallel",
]

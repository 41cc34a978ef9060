"""Throughput accounting: analytic FLOP counts, hardware peaks, and the train-step benchmark."""

from lumos_mcore.perf.flops import DiTShape, FlopCount, count_flops, pixart_shape

__all__ = ["DiTShape", "FlopCount", "count_flops", "pixart_shape"]

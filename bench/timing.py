"""Helpers shared by the component benchmarks (vq_bench.py, vision_bench.py, cpu_decode_floor.py)."""
from __future__ import annotations

import statistics
import time

import numpy as np


def median_seconds(call, rounds: int) -> float:
    """Median wall time of `rounds` calls, after one warm-up call."""
    call()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fill_random(layer, rule, seed: int = 0) -> None:
    """Random float32 parameters from numpy (Paddle's initialisers are slow on full-size layers):
    each parameter gets base + scale * N(0, 1), with (scale, base) = rule(shape)."""
    rng = np.random.default_rng(seed)
    for _, param in layer.named_parameters():
        scale, base = rule(param.shape)
        param.set_value((base + scale * rng.standard_normal(param.shape)).astype(np.float32))

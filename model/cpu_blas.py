"""Thread counts of numpy's BLAS (OpenBLAS) for the CPU numpy paths.

numpy's BLAS runs two kinds of work here: the small products of the CPU attention
(model/cpu_attention.py), which the worker keeps to one thread (a second BLAS pool would
fight Paddle's OpenMP threads for the cores), and the large products of `llama.linear`,
which need every core the decode loop may use. `gemm()` raises the count for one large
product and sets it back after. The worker sets both counts (`configure`) as it shares the
cores out; elsewhere (tests, benchmarks) nothing changes OpenBLAS's own setting.

Setting the count is a plain library call (about 0.5 us). It is process-wide, like
Paddle's own thread count, so concurrent callers share one value.
"""
from __future__ import annotations

import contextlib

_libs: list | None = None
_gemm_threads: int | None = None  # None: leave the library's setting alone
_small_threads: int | None = None


def _controllers() -> list:
    global _libs
    if _libs is None:
        import numpy  # noqa: F401 - loads the BLAS library threadpoolctl looks for
        from threadpoolctl import ThreadpoolController

        _libs = ThreadpoolController().select(user_api="blas").lib_controllers
    return _libs


def _set(threads: int) -> None:
    for lib in _controllers():
        lib.set_num_threads(threads)


def configured() -> bool:
    """Whether this process has set its counts (the worker does; tests and benchmarks need not)."""
    return _gemm_threads is not None


def configure(*, gemm_threads: int, small_threads: int) -> None:
    """Threads for large products (inside gemm()) and for everything else (set now)."""
    global _gemm_threads, _small_threads
    _gemm_threads, _small_threads = max(1, gemm_threads), max(1, small_threads)
    _set(_small_threads)


@contextlib.contextmanager
def gemm():
    """Around one large product: the configured gemm thread count, then back to the small count."""
    if _gemm_threads is None or _gemm_threads == _small_threads:
        yield
        return
    _set(_gemm_threads)
    try:
        yield
    finally:
        _set(_small_threads)

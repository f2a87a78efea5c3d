"""Giving the eager copy of weights back to the OS once OpenVINO holds its own (CPU).

OpenVINO's CPU plugin packs every weight of a program into its own memory when it compiles, and
never reads the original again; but it keeps the original constant alive for the program's
lifetime: with a constant sharing the eager model's memory, that memory can then never be freed
(measured: 0.74 GB of float32 weights take 1.55 GB once compiled, shared or copied). So the pages
of such memory are dropped instead (madvise MADV_DONTNEED): the allocation stays, its physical
memory goes back to the OS, and reading it would give zeros. Each user checks that its programs'
outputs are unchanged after the drop (`snapshot`, `same_outputs`), so a program that did read its
original weights again would fail at start, loudly. (model/cpu_decoder.py does so; the image encoder
reads its constants in place, so it is built from copies instead.)

The worker makes glibc keep freed memory in its heap (loader.keep_freed_memory); `trim_heap` gives
back the free pages there (the freed eager tensors), so that the KV cache, sized from the memory
the OS reports free, can have them.

`lazy_zeros` makes the KV cache: memory the OS hands over page by page as it is first written.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

import numpy as np

MADV_DONTNEED = 4
# The row counts snapshot() runs every program at. OpenVINO may pick another kernel for more rows and reorder a
# weight for it on its first call, from the original constant: janus-tiny's 64 x 64 image-head weights, compiled
# as the decoder's layers are, read the dropped memory from 7 rows on (never the layers' weights: checked at
# Janus-1.3B's widths for every row count from 1 to 32 and every 8th to 136, on a 2-core AVX-512 EPYC, in exact,
# int8 and bf16). 16 rows catches such a switch if it comes early.
PROBE_ROWS = (1, 5, 16)


@functools.cache
def libc():
    """The C library, opened once. By its usual name first: ctypes.util.find_library runs `ldconfig -p` in a
    child process, a fork of this one, whose resident memory (the whole worker's, shared) then shows in every
    sum over the worker's processes."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def drop_pages(arrays: list[np.ndarray]) -> int:
    """Give back the whole pages inside each array's memory (never to be read again); the bytes given."""
    c = libc()
    c.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, dropped = mmap.PAGESIZE, 0
    for array in arrays:
        start = array.ctypes.data
        first, last = -(-start // page) * page, (start + array.nbytes) // page * page
        if last > first:
            if c.madvise(first, last - first, MADV_DONTNEED) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")
            dropped += last - first
    return dropped


def lazy_zeros(shape, dtype) -> np.ndarray:
    """A zeroed array in its own anonymous mapping: nothing is resident until a page is first written.

    For the KV cache, sized from the memory the OS reports free: zeroing all of it at start
    (paddle.zeros) took 13.2 s for Janus-1.3B's 9.3 GB on a 2-core EPYC VM; here each page costs its
    first write instead, in the step that first fills that part of the cache (about 0.4 s per GB
    written, measured on the same VM). Reading a page never written reads zeros without taking memory.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)


def trim_heap() -> bool:
    """glibc's malloc_trim(0): free pages in its heaps go back to the OS. False where unavailable."""
    try:
        return bool(libc().malloc_trim(0))
    except (OSError, AttributeError, TypeError):
        return False


def probe_inputs(request, rows: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Random float32 inputs for an OpenVINO infer request, its dynamic dimensions set to `rows`."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for index, port in enumerate(request.model_inputs):
        shape = [rows if dim.is_dynamic else dim.get_length() for dim in port.get_partial_shape()]
        inputs[index] = rng.standard_normal(shape).astype(np.float32)
    return inputs


def outputs(request, inputs: dict) -> list[np.ndarray]:
    return [np.array(out, copy=True) for out in request.infer(inputs).values()]


def same_outputs(requests: list, before: list) -> bool:
    """Whether each request gives now what it gave before (`before`: snapshot(requests), here or in an earlier
    process)."""
    now = snapshot(requests)
    return len(now) == len(before) and all(np.array_equal(a, b) for a, b in zip(now, before))


def snapshot(requests: list) -> list[np.ndarray]:
    """Every output of every request on probe inputs of each of PROBE_ROWS rows: what same_outputs compares."""
    return [out for request in requests for n in PROBE_ROWS for out in outputs(request, probe_inputs(request, n))]

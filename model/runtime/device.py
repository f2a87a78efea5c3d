"""The device side of a model worker: which device, the model on it, its memory, and its runtime.

Importing this module imports Paddle (the worker imports it first, then sets its signal handlers:
Paddle installs its own).
"""
from __future__ import annotations

import ctypes

import paddle

from ..loader import load_model


def pick_device(requested: str) -> str:
    """"cpu", "auto" (the first GPU if this Paddle build sees one) or a GPU index -> Paddle's device name."""
    if requested == "cpu":
        return "cpu"
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "auto":
        return "gpu:0" if has_gpu else "cpu"
    if not has_gpu:
        raise RuntimeError(f"device {requested!r} asked for, but this Paddle build sees no GPU")
    return f"gpu:{int(requested)}"


def load(model_path: str, dtype: str, device: str, skip: tuple[str, ...] = ()):
    """Paddle on `device` and the model on it (`dtype` "auto": bfloat16 on GPU, float32 on CPU); `skip`:
    parameters not to read (held_parameters)."""
    paddle.set_device(device)
    return load_model(model_path, dtype=None if dtype == "auto" else dtype, device=device, skip=skip)


def program_stores(device: str, model_path: str, folder: str | None, *, cpu_engine: str, cpu_precision: str,
                   cpu_vision: str, cpu_vq: str) -> dict:
    """Where the CPU runtime's compiled programs for this checkpoint and settings are kept between starts
    (model/cpu_programs.py), by program: none off CPU, without a folder, or without OpenVINO."""
    if device != "cpu" or not folder:
        return {}
    from ..cpu_engine import openvino_runtime_available

    if not openvino_runtime_available():
        return {}
    from .cpu import program_stores as cpu_program_stores

    return cpu_program_stores(model_path, folder, cpu_engine=cpu_engine, cpu_precision=cpu_precision,
                              cpu_vision=cpu_vision, cpu_vq=cpu_vq)


def held_parameters(stores: dict) -> tuple[str, ...]:
    """The parameters the loader need not read: those of programs `stores` already holds."""
    if not stores:
        return ()
    from .cpu import held_parameters as held

    return held(stores)


def gpu_memory(device: str) -> tuple[int, int]:
    """(bytes free on the GPU, bytes this process's tensors hold there). Free is what CUDA reports
    (cudaMemGetInfo: other processes' use counted) plus what Paddle's allocator holds unused; where
    the CUDA runtime library cannot be found, the card's total less what Paddle holds."""
    index = int(device.split(":")[1])
    allocated = int(paddle.device.cuda.memory_allocated(index))
    reserved = int(paddle.device.cuda.memory_reserved(index))
    free = cuda_free_bytes(index)
    if free is None:
        return int(paddle.device.cuda.get_device_properties(index).total_memory) - reserved, allocated
    return free + reserved - allocated, allocated


def cuda_free_bytes(index: int) -> int | None:
    """cudaMemGetInfo's free bytes on GPU `index`, through the CUDA runtime Paddle has loaded."""
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0"):
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if cudart.cudaSetDevice(index) == 0 and cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
            return int(free.value)
    return None


def make_runtime(model, device: str, *, eos_id: int, pad_id: int, cpu_engine: str = "auto",
                 cpu_precision: str = "exact", cpu_vq: str = "auto", cpu_vision: str = "auto", program_stores=None,
                 prefill_chunk: int | None = None):
    """The CPU runtime on CPU (model/runtime/cpu.py), the GPU runtime elsewhere (model/runtime/gpu.py: eager
    Paddle with a static decode step); its cache comes later (runtime.open_cache). `prefill_chunk`: prompt tokens
    per piece beside running requests (None: the runtime's own; 0: every prompt whole)."""
    chunk = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk or None}
    if device == "cpu":
        from .cpu import CpuRuntime

        return CpuRuntime(model, eos_id=eos_id, pad_id=pad_id, cpu_engine=cpu_engine, cpu_precision=cpu_precision,
                          cpu_vq=cpu_vq, cpu_vision=cpu_vision, program_stores=program_stores, **chunk)
    from .gpu import GpuRuntime

    return GpuRuntime(model, eos_id=eos_id, pad_id=pad_id, **chunk)

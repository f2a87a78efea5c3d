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


def program_store(device: str, model_path: str, folder: str | None, *, cpu_engine: str, cpu_precision: str):
    """Where the CPU decoder's compiled programs for this checkpoint and precision are kept between starts
    (model/cpu_programs.py): None off CPU, without a folder, or without the OpenVINO decoder."""
    if device != "cpu" or not folder or cpu_engine == "eager":
        return None
    from ..cpu_engine import openvino_runtime_available

    if not openvino_runtime_available():
        return None
    from .cpu import decoder_store

    return decoder_store(model_path, folder, cpu_precision)


def held_parameters(store) -> tuple[str, ...]:
    """The parameters the loader need not read: those of programs `store` already holds."""
    if store is None or not store.complete():
        return ()
    from ..cpu_decoder import HELD_PARAMETERS

    return HELD_PARAMETERS


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
                 cpu_precision: str = "exact", cpu_vq: str = "auto", cpu_vision: str = "auto", program_store=None):
    """The CPU runtime on CPU (model/runtime/cpu.py), eager Paddle elsewhere; its cache comes later
    (runtime.open_cache)."""
    if device == "cpu":
        from .cpu import CpuRuntime

        return CpuRuntime(model, eos_id=eos_id, pad_id=pad_id, cpu_engine=cpu_engine, cpu_precision=cpu_precision,
                          cpu_vq=cpu_vq, cpu_vision=cpu_vision, program_store=program_store)
    from .eager import EagerRuntime

    return EagerRuntime(model, eos_id=eos_id, pad_id=pad_id)

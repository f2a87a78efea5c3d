"""The model worker: a spawned process that owns one Janus on one device.

It loads the model, builds the device's runtime (model/runtime/: the CPU runtime's OpenVINO
programs and background threads, or eager Paddle on a GPU), sizes the KV cache from the memory
that is left (server/engine/memory.py), says "ready", then runs the scheduler
(server/engine/scheduler.py) until it is told to stop. How the device runs is the runtime's;
who runs when is the scheduler's; this module only puts them together.

Messages in:  ("understand", rid, payload) | ("generate", rid, payload) | ("cancel", rid) | ("stop",)
Messages out: ("ready", info) | ("fatal", message) | ("events", [event, ...], stats)
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import time

from model.cpu_programs import ProgramStoreError
from server.engine.memory import (
    CacheDoesNotFit, CachePlan, bytes_per_position, gb, host_available_bytes, plan_cache, resident_bytes,
)
from server.engine.scheduler import Scheduler
from server.engine.types import DEFAULT_MEMORY_FRACTION

log = logging.getLogger("janus.worker")


@dataclasses.dataclass
class WorkerConfig:
    model_path: str
    device: str  # "cpu", "auto", or a GPU index
    dtype: str
    max_batch_rows: int  # upper bounds: the cache is sized from the memory free after loading (memory.py)
    max_cache_tokens: int | None
    max_new_tokens: int = 2048  # the longest answer a request may ask for: every cache row must hold one
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    max_running_requests: int = 0
    cpu_engine: str = "auto"
    cpu_precision: str = "exact"
    cpu_vq: str = "auto"
    cpu_vision: str = "auto"
    prefill_chunk: int | None = None
    program_cache: str | None = None  # a folder for the CPU decoder's compiled programs (model/cpu_programs.py)
    threads: int | None = None
    eos_id: int = 0
    pad_id: int = 0


def device_memory(device: str, support) -> tuple[int, int]:
    """(bytes free on `device` now, bytes this worker holds there): host RAM and this process's resident
    memory on CPU; `support`: model.runtime.device."""
    if device == "cpu":
        return host_available_bytes(), resident_bytes() or 0
    return support.gpu_memory(device)


def plan_worker_cache(config: WorkerConfig, model, free: int, loaded: int) -> CachePlan:
    """The KV cache for `free` bytes of the device (the worker holding `loaded`), within the configured bounds;
    the cache takes the model's dtype."""
    lm = model.config.language
    element_bytes = model.language_model.lm_head.weight.element_size()
    return plan_cache(
        free_bytes=free, loaded_bytes=loaded, fraction=config.memory_fraction,
        bytes_per_position=bytes_per_position(lm.num_hidden_layers, lm.num_key_value_heads, lm.head_dim,
                                              element_bytes),
        max_new_tokens=config.max_new_tokens, max_context=lm.max_position_embeddings,
        max_rows=config.max_batch_rows, max_positions=config.max_cache_tokens)


class Outbox:
    """The worker's end of its pipe to the API process.

    Each message is pickled and written by the loop itself, under a lock. A multiprocessing.Queue
    would hand it to a feeder thread instead, which then takes the GIL from the loop at every
    step: measured with janus-tiny, 8 concurrent understanding requests, the loop's empty inbox
    check took over 0.2 ms in half the steps.
    Once the API process is gone, messages are dropped; the loop notices and exits.
    """

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()

    def put(self, message) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except OSError:  # BrokenPipeError: nobody reads it any more
                pass


def see_one_gpu(device: str, environ) -> str:
    """Make a worker's process see only its own GPU (CUDA_VISIBLE_DEVICES, before Paddle is imported), so that
    nothing it does can touch another worker's; returns the device to ask Paddle for then. A GPU index counts
    among the GPUs the server itself sees: with CUDA_VISIBLE_DEVICES=2,3, device 1 is the machine's GPU 3.
    "auto" keeps the first GPU; "cpu" hides every GPU."""
    if device == "cpu":
        environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    index = 0 if device == "auto" else int(device)
    if "CUDA_VISIBLE_DEVICES" in environ:
        if index >= len(visible):
            raise RuntimeError(f"device {device!r} asked for, but CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r} "
                               f"shows {len(visible)} GPU(s)")
        environ["CUDA_VISIBLE_DEVICES"] = visible[index]
    else:
        environ["CUDA_VISIBLE_DEVICES"] = str(index)
    return "auto" if device == "auto" else "0"


def run_worker(config: WorkerConfig, inbox, outbox) -> None:
    """Process entry point (spawned, so nothing from the parent's memory leaks in); `outbox`: the write end
    of a pipe to the API process."""
    outbox = Outbox(outbox)
    if config.threads:
        os.environ["OMP_NUM_THREADS"] = str(config.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        requested = see_one_gpu(config.device, os.environ)
        from model.runtime import device as support  # imports Paddle: before ignore_stop_signals

        ignore_stop_signals()  # after Paddle's import, which installs its own SIGTERM handler
        device = support.pick_device(requested)
        started = time.monotonic()
        stores = support.program_stores(device, config.model_path, config.program_cache, cpu_engine=config.cpu_engine,
                                        cpu_precision=config.cpu_precision, cpu_vision=config.cpu_vision,
                                        cpu_vq=config.cpu_vq)
        model = support.load(config.model_path, config.dtype, device, skip=support.held_parameters(stores))
        loaded = time.monotonic()
        weights_bytes = device_memory(device, support)[1]
        try:
            runtime = make_runtime(config, support, model, device, stores)
        except ProgramStoreError as error:  # the entry is gone, and the weights it held were not read
            log.warning("compiled programs not used (%s); loading the weights and building them", error)
            runtime = None
        if runtime is None:  # out of the except block: its traceback no longer holds the programs made so far
            del model
            gc.collect()
            model = support.load(config.model_path, config.dtype, device)
            loaded = time.monotonic()
            weights_bytes = device_memory(device, support)[1]
            runtime = make_runtime(config, support, model, device, stores)
        # Everything but the cache is in memory now: what is left decides its size.
        built = time.monotonic()
        plan = plan_worker_cache(config, model, *device_memory(device, support))
        runtime.open_cache(plan.rows, plan.row_length)
        startup = {"load_s": round(loaded - started, 1), "runtime_s": round(built - loaded, 1),
                   "cache_s": round(time.monotonic() - built, 1)}
    except CacheDoesNotFit as error:
        outbox.put(("fatal", str(error)))
        return
    except Exception as error:  # noqa: BLE001 - the parent reports it and stops retrying
        outbox.put(("fatal", f"{type(error).__name__}: {error}"))
        return
    described = runtime.describe()
    if device.startswith("gpu"):  # the worker's gpu:0 is this one of the machine's (see_one_gpu)
        described["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    startup["programs_s"] = described.pop("programs_s", {})  # the runtime's part, program by program
    outbox.put(("ready", {**described, "cache": {**plan.info(), "weights_bytes": weights_bytes},
                          "cache_summary": f"{plan.describe()} (the weights alone {gb(weights_bytes)})",
                          "startup": startup, "pid": os.getpid()}))
    Scheduler(runtime, inbox, outbox, max_running_requests=config.max_running_requests).run()


def make_runtime(config: WorkerConfig, support, model, device: str, stores: dict):
    return support.make_runtime(model, device, eos_id=config.eos_id, pad_id=config.pad_id,
                                cpu_engine=config.cpu_engine, cpu_precision=config.cpu_precision, cpu_vq=config.cpu_vq,
                                cpu_vision=config.cpu_vision, program_stores=stores,
                                prefill_chunk=config.prefill_chunk)


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM are for the API process, which stops its workers itself.

    A Ctrl-C in the terminal reaches the whole process group: the worker used to die with a
    KeyboardInterrupt while the API process was still letting running requests finish. A
    SIGTERM to every process (systemd's control-group stop) would do the same; and Paddle's
    own SIGTERM handler is not async-signal-safe (seen here: it deadlocked in malloc, called
    from the handler while the interrupted thread held malloc's lock). The API process stops
    a worker with a "stop" message, then SIGKILL; a worker whose API process died exits on
    its own (Scheduler.orphaned).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

"""The model worker: a spawned process that owns one Janus on one device.

It loads the model once, says "ready", then loops: take new work and
cancellations from its inbox, admit what fits into the running batch
(prefill), run one decode step over every running row, and send what each
request produced to its outbox. Sequences join and leave between steps.

Messages in:  ("understand", rid, payload) | ("generate", rid, payload) | ("cancel", rid) | ("stop",)
Messages out: ("ready", info) | ("fatal", message) | ("events", [event, ...], stats)
An event is (rid, kind, data): kind "token" (id), "progress" (step),
"text_done" / "images_done" (result dict), "error" (message).

Finished image codes are VQ-decoded inline (GPU, or eager on CPU), or on CPU by a
thread running the OpenVINO VQ decoder, which releases the GIL: the loop keeps
stepping the other rows meanwhile, and the thread posts its own "events" messages.
On CPU, understanding prompts are prefilled by another thread in the same way, into
cache rows reserved for them, and join the batch at the next step once done. For a
small model that thread hands each prompt to a child process (server/engine/prefill.py),
which writes the same rows through shared memory and holds no GIL of the worker's.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import multiprocessing
import os
import queue
import threading
import time
import traceback
from typing import Any

from server.engine.memory import DEFAULT_MEMORY_FRACTION, CacheDoesNotFit, CachePlan, gb
from server.engine.prefill import PrefillProcessDied

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
    cpu_engine: str = "eager"
    cpu_vq: str = "auto"
    cpu_vision: str = "auto"
    cpu_prefill: str = "auto"  # "thread", "process" or "auto" (server/engine/prefill.py)
    threads: int | None = None
    eos_id: int = 0
    pad_id: int = 0


@dataclasses.dataclass
class Decoding:
    """An image request whose codes the VQ thread decodes; the loop may mark it cancelled meanwhile."""

    rid: str
    codes: Any
    timings: dict[str, float]
    cancelled: bool = False


@dataclasses.dataclass
class Prefilling:
    """An understanding request whose prompt the prefill thread runs into its reserved cache row."""

    request: "RunningRequest"
    slot: int
    payload: dict[str, Any]
    cancelled: bool = False
    logits: Any = None
    error: BaseException | None = None


@dataclasses.dataclass
class RunningRequest:
    rid: str
    kind: str
    rows: int
    admitted_at: float
    prefill: float = 0.0
    decode: float = 0.0
    preview_every: int = 0  # image requests: send a preview every this many steps (0: none)


def pick_device(requested: str) -> str:
    import paddle

    if requested == "cpu":
        return "cpu"
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "auto":
        return "gpu:0" if has_gpu else "cpu"
    if not has_gpu:
        raise RuntimeError(f"device {requested!r} asked for, but this Paddle build sees no GPU")
    return f"gpu:{int(requested)}"


def device_memory(device: str) -> tuple[int, int]:
    """(bytes free on `device` now, bytes this worker holds there): host RAM and this process's resident
    memory on CPU."""
    from server.engine.memory import host_available_bytes, resident_bytes

    if device == "cpu":
        return host_available_bytes(), resident_bytes() or 0
    return gpu_memory(device)


def plan_worker_cache(config: WorkerConfig, model, free: int, loaded: int) -> CachePlan:
    """The KV cache for `free` bytes of the device (the worker holding `loaded`), within the configured bounds."""
    from server.engine.memory import bytes_per_position, plan_cache

    lm = model.config.language
    element_bytes = model.language_model.lm_head.weight.element_size()  # the cache takes the model's dtype
    return plan_cache(
        free_bytes=free, loaded_bytes=loaded, fraction=config.memory_fraction,
        bytes_per_position=bytes_per_position(lm.num_hidden_layers, lm.num_key_value_heads, lm.head_dim, element_bytes),
        max_new_tokens=config.max_new_tokens, max_context=lm.max_position_embeddings,
        max_rows=config.max_batch_rows, max_positions=config.max_cache_tokens)


def gpu_memory(device: str) -> tuple[int, int]:
    """(bytes free on the GPU, bytes this process's tensors hold there). Free is what CUDA reports
    (cudaMemGetInfo: other processes' use counted) plus what Paddle's allocator holds unused; where
    the CUDA runtime library cannot be found, the card's total less what Paddle holds."""
    import paddle

    index = int(device.split(":")[1])
    allocated = int(paddle.device.cuda.memory_allocated(index))
    reserved = int(paddle.device.cuda.memory_reserved(index))
    free = cuda_free_bytes(index)
    if free is None:
        return int(paddle.device.cuda.get_device_properties(index).total_memory) - reserved, allocated
    return free + reserved - allocated, allocated


def cuda_free_bytes(index: int) -> int | None:
    """cudaMemGetInfo's free bytes on GPU `index`, through the CUDA runtime Paddle has loaded."""
    import ctypes

    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0"):
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if cudart.cudaSetDevice(index) == 0 and cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
            return int(free.value)
    return None


class Outbox:
    """The worker's end of its pipe to the API process.

    Each message is pickled and written by the thread that sends it (the loop, the VQ thread),
    under a lock. A multiprocessing.Queue would hand it to a feeder thread instead, which then
    takes the GIL from the loop at every step: measured with janus-tiny, 8 concurrent
    understanding requests, the loop's empty inbox check took over 0.2 ms in half the steps.
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


def run_worker(config: WorkerConfig, inbox, outbox) -> None:
    """Process entry point (spawned, so nothing from the parent's memory leaks in); `outbox`: the write end
    of a pipe to the API process."""
    outbox = Outbox(outbox)
    if config.threads:
        os.environ["OMP_NUM_THREADS"] = str(config.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        import paddle  # noqa: F401 - before ignore_stop_signals

        ignore_stop_signals()  # after Paddle's import, which installs its own SIGTERM handler
        from model.generation import DecodeBatch
        from model.llama import numpy_attention

        device = pick_device(config.device)
        model = load_worker_model(config, device)
        weights_bytes = device_memory(device)[1]
        forward_hidden = None
        if device == "cpu" and config.cpu_engine == "openvino":
            from model.cpu_engine import CpuDecodeEngine

            forward_hidden = CpuDecodeEngine(model).forward_hidden
        # The prefill thread writes its rows of the cache through numpy views (llama.numpy_attention);
        # the OpenVINO engine takes one caller.
        prefill_thread = forward_hidden is None and numpy_attention(model.language_model.lm_head.weight)
        prefill_process = prefill_thread and prefill_in_process(config, model)
        from model.cpu_engine import CpuVQDecoder

        vision = None if prefill_process else image_encoder(model, device, config)  # else the child encodes
        vq_decoder = make_cpu_program("VQ decoder", device, config.cpu_vq,
                                      lambda: CpuVQDecoder(model, single_thread_copy=True))
        palette = preview_palette(model, vq_decoder)
        # Everything but the cache is in memory now: what is left decides its size.
        plan = plan_worker_cache(config, model, *device_memory(device))
        prefiller = None
        if prefill_process:
            from server.engine.prefill import PrefillProcess, SharedBuffers

            buffers = SharedBuffers()
            batch = DecodeBatch(model, slots=plan.rows, max_len=plan.row_length, allocate=buffers.allocate)
            prefiller = PrefillProcess(config, buffers, slots=plan.rows, row_length=plan.row_length)
        else:
            batch = DecodeBatch(model, slots=plan.rows, max_len=plan.row_length, forward_hidden=forward_hidden)
    except CacheDoesNotFit as error:
        outbox.put(("fatal", str(error)))
        return
    except Exception as error:  # noqa: BLE001 - the parent reports it and stops retrying
        outbox.put(("fatal", f"{type(error).__name__}: {error}"))
        return
    programs = [name for name, program in (("decode engine", forward_hidden), ("image encoder", vision),
                                           ("VQ decoder", vq_decoder)) if program is not None]
    if prefiller is not None:
        programs += [f"{name} (prefill process)" for name in prefiller.programs]
    prefill = "process" if prefiller is not None else "thread" if prefill_thread else "inline"
    outbox.put(("ready", {"device": device, "row_length": plan.row_length, "rows": plan.rows, "cache": {**plan.info(), "weights_bytes": weights_bytes},
                          "cache_summary": f"{plan.describe()} (the weights alone {gb(weights_bytes)})",
                          "pid": os.getpid(), "programs": programs, "prefill": prefill}))
    try:
        # One Paddle thread for the steps of a model too small to split (while the VQ thread, not the
        # loop, runs the image decoder's convolutions).
        Scheduler(model, batch, config, inbox, outbox, vq_decoder=vq_decoder, vision=vision,
                  prefill_thread=prefill_thread, prefiller=prefiller, palette=palette,
                  max_step_threads=1 if vq_decoder is not None and small_steps(model) else None).run()
    finally:
        if prefiller is not None:
            prefiller.close()


def preview_palette(model, vq_decoder):
    """The colours of generation previews (model/preview.py), fitted with one decode of the worker's
    own VQ decoder."""
    from model.generation import decode_images, to_uint8_images
    from model.preview import PreviewPalette

    def decode(codes):
        if vq_decoder is not None:
            return to_uint8_images(vq_decoder.decode(codes))
        return decode_images(model, codes)

    return PreviewPalette.fit(model.gen_vision_model.codebook.weight.numpy(), decode)


def load_worker_model(config: WorkerConfig, device: str):
    """Paddle on `device` and the model on it, as the worker and its prefill process run it."""
    import paddle

    from model.loader import load_model

    paddle.set_device(device)
    if device == "cpu":
        limit_blas_threads()
    return load_model(config.model_path, dtype=None if config.dtype == "auto" else config.dtype, device=device)


def image_encoder(model, device: str, config: WorkerConfig):
    """The OpenVINO image encoder for understanding prefills (--cpu-vision), or None for eager."""
    from model.cpu_vision import CpuVisionEncoder

    return make_cpu_program("image encoder", device, config.cpu_vision,
                            lambda: CpuVisionEncoder(model, single_thread_copy=True))


def use_cpu_threads(threads: int) -> None:
    """Paddle's thread count for this process, and the large numpy products' (model/cpu_blas.py) to match
    once limit_blas_threads has set them."""
    import paddle

    from model import cpu_blas

    paddle.base.core.set_num_threads(threads)
    if cpu_blas.configured():
        cpu_blas.configure(gemm_threads=threads, small_threads=1)


# A decode step whose language-model and head products all have fewer weights than this runs on one
# of Paddle's threads (run_worker passes the Scheduler max_step_threads=1).
SMALL_STEP_MAX_WEIGHTS = 1 << 16


def small_steps(model) -> bool:
    """Whether `model`'s decode steps are too small to gain from a second Paddle thread.

    Such a step is a few hundred ops of a few microseconds each, and Intel OpenMP's spare
    thread spins for 200 ms (KMP_BLOCKTIME) after each op it joins: it gains nothing and takes
    a core from the prefill process and the API process. Measured on the 2-core dev box,
    janus-tiny: a step alone takes the same time on 1 thread as on 2 (8 rows, 2.97 against
    3.04 ms); in the server at 8 concurrent understanding requests, perf found the loop's
    second OpenMP thread spinning on half a core. bench/serve_bench.py, understanding, 3
    alternating pairs: c=8 1919 / 1994 / 1428 tokens/s with 1 step thread against 1281 / 1613
    / 1527 with 2; c=1 388 / 415 / 331 against 430 / 418 / 351 (within the noise). With
    KMP_BLOCKTIME=0 instead, c=8 fell (1343 against 1479): the pool's wake-ups.
    """
    import paddle.nn as nn

    parts = (model.language_model, model.gen_head, model.gen_aligner)
    return all(math.prod(layer.weight.shape) < SMALL_STEP_MAX_WEIGHTS
               for part in parts for layer in part.sublayers() if isinstance(layer, nn.Linear))


# Models up to this many bytes of parameters prefill in a process of their own (--cpu-prefill auto).
PREFILL_PROCESS_MAX_BYTES = 1 << 30


def prefill_in_process(config: WorkerConfig, model) -> bool:
    """Whether understanding prefills run in a child process (server/engine/prefill.py) rather than
    the worker's prefill thread.

    The child holds a second copy of the model, and it gains only where the GIL is what the two
    threads share: small models, whose ops cost less than their dispatch. A large model's ops
    release the GIL for most of their time (Janus-1.3B, 7 GB in float32), so "auto" keeps those
    in the thread."""
    if config.cpu_prefill != "auto":
        return config.cpu_prefill == "process"
    nbytes = sum(int(p.numel()) * p.element_size() for p in model.parameters())
    return nbytes <= PREFILL_PROCESS_MAX_BYTES


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


def limit_blas_threads() -> None:
    """Numpy's BLAS to one thread, but for the large products of llama.linear (model/cpu_blas.py).

    Paddle's OpenMP threads keep spinning for a while after each op; a second pool of BLAS
    threads then fights them for the same cores. Measured on the 2-core dev box, janus-tiny
    understanding prefill (SigLIP + 620-token prompt): 46-170 ms with both pools, 27-32 ms so.
    The large products (llama.linear: Janus-1.3B's projections and heads) take the cores the
    loop may use, which share_cores keeps up to date.
    """
    from model import cpu_blas
    from model.cpu_engine import cpu_threads

    cpu_blas.configure(gemm_threads=cpu_threads(), small_threads=1)


def make_cpu_program(what: str, device: str, choice: str, build):
    """An OpenVINO program from `build()` on CPU when asked for ("openvino"), or with "auto" when the
    openvino package is installed; None (eager Paddle) otherwise, or when "auto" cannot build it.

    Used for the VQ decoder (run by a thread beside the decode loop) and the image encoder."""
    if device != "cpu" or choice == "eager":
        return None
    from model.cpu_engine import openvino_runtime_available

    if choice == "auto" and not openvino_runtime_available():
        return None
    try:
        return build()
    except Exception:
        if choice == "openvino":
            raise
        log.warning("OpenVINO %s unavailable, running it in eager Paddle", what, exc_info=True)
        return None


class Scheduler:
    """Admission and stepping for one worker; FIFO admission, every admitted row steps together."""

    def __init__(self, model, batch, config: WorkerConfig, inbox, outbox, *, vq_decoder=None, vision=None,
                 prefill_thread: bool = False, prefiller=None, max_step_threads: int | None = None,
                 palette=None):
        self.model = model
        self.palette = palette  # previews of images being generated (model/preview.py)
        self.batch = batch
        self.config = config
        self.inbox = inbox
        self.outbox = outbox
        self.pending: collections.deque = collections.deque()
        self.running: dict[str, RunningRequest] = {}
        self.steps = 0
        self.reported_rows = 0
        self.parent = multiprocessing.parent_process()  # None when not started by multiprocessing
        self.checked_at = time.monotonic()
        self.events: list[tuple] = []
        # With a VQ decoder program (CPU), finished codes are decoded by a thread beside the decode
        # loop, so that the running rows keep stepping; the thread posts its results itself.
        self.vq_decoder = vq_decoder
        self.vq_ready: list[Decoding] = []  # handed to the thread at the next flush, after that step's events
        self.vq_jobs: queue.Queue = queue.Queue()
        self.decoding: dict[str, Decoding] = {}  # ready or in the thread; the thread removes what it is done with
        # Cores: while the thread decodes on some, the loop's Paddle ops take only the others.
        from model.cpu_engine import cpu_threads

        self.cores = cpu_threads()
        self.vq_cores = 0  # cores the VQ thread is decoding on now (set by the thread)
        self.step_threads = self.cores
        self.step_cap = max_step_threads or self.cores  # the most Paddle threads share_cores gives a step
        if vq_decoder is not None:
            threading.Thread(target=self.vq_loop, name="vq-decode", daemon=True).start()
        # With `prefill_thread` (CPU, eager), understanding prompts (SigLIP and a prefill of hundreds
        # of tokens) are run by a thread into rows reserved for them, while the loop keeps stepping
        # the running rows; each joins the batch at the first step after its prefill. Paddle's kernels
        # release the GIL, so the two run on different cores.
        # With `prefiller` (server/engine/prefill.py), the thread hands each prompt to a child process
        # and waits: the loop then shares neither the GIL nor Paddle's thread count with the prefill.
        self.prefill_thread = prefill_thread
        self.prefiller = prefiller
        self.prefiller_died: BaseException | None = None
        self.prefilling: dict[str, Prefilling] = {}  # in the thread or done, not yet joined
        self.prefill_jobs: queue.Queue = queue.Queue()
        self.prefill_done: queue.Queue = queue.Queue()
        if prefill_thread:
            threading.Thread(target=self.prefill_loop, name="prefill", daemon=True).start()
        # With a vision encoder program (CPU), prefills encode their images through it.
        self.vision = vision
        if vision is not None:
            batch.encode_images = self.encode_images

    def run(self) -> None:
        while True:
            idle = not self.running and not self.pending and not self.prefilling
            if not self.take_messages(block=idle):
                return
            if self.checks_due():
                if self.orphaned():
                    log.warning("the API process is gone; worker %d exits", os.getpid())
                    return
                if self.prefiller is not None and self.prefiller_died is None and not self.prefiller.alive():
                    self.prefiller_died = PrefillProcessDied("the prefill process exited")
            if self.prefiller_died is not None:  # the client restarts the worker, and with it the child
                raise RuntimeError("the prefill process died; the worker exits to be restarted") from self.prefiller_died
            self.join_prefilled(wait=not self.running and bool(self.prefilling))
            self.admit()
            self.share_cores()  # after admit: a prompt it hands to the prefill thread counts at once
            if self.running:
                self.step()
            self.flush()

    def checks_due(self) -> bool:
        """Whether it is time to check the processes around the worker (at most once a second)."""
        now = time.monotonic()
        if now - self.checked_at < 1.0:
            return False
        self.checked_at = now
        return True

    def orphaned(self) -> bool:
        """Whether the API process that started this worker has died.

        A killed API process (SIGKILL, OOM killer) cannot stop its workers; without this they
        would hold the model's memory and the device forever."""
        return self.parent is not None and not self.parent.is_alive()

    def take_messages(self, *, block: bool) -> bool:
        """Read the inbox; False on "stop"."""
        try:
            message = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind = message[0]
            if kind == "stop":
                return False
            if kind == "cancel":
                self.cancel(message[1])
            else:
                self.pending.append(message)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def cancel(self, rid: str) -> None:
        if rid in self.decoding:  # a decode already under way still finishes; its images are dropped
            self.decoding[rid].cancelled = True
        self.pending = collections.deque(m for m in self.pending if m[1] != rid)
        if rid in self.prefilling:  # its row is freed when the thread is done with it
            self.prefilling[rid].cancelled = True
        if self.running.pop(rid, None) is not None:
            self.batch.remove(rid)

    def admit(self) -> None:
        while self.pending:
            kind, rid, payload = self.pending[0]
            rows = 1 if kind == "understand" else 2 * payload["n"]
            limit = self.config.max_running_requests
            if rows > self.batch.pool.free or (limit and len(self.running) + len(self.prefilling) >= limit):
                return
            self.pending.popleft()
            request = RunningRequest(rid, kind, rows, time.perf_counter(),
                                     preview_every=payload.get("preview_every", 0) if self.palette else 0)
            if kind == "understand" and self.prefill_thread:
                self.start_prefill(request, payload)
                continue
            try:
                events = self.prefill(kind, rid, payload)
            except Exception as error:  # noqa: BLE001 - this request fails alone
                self.batch.remove(rid)
                self.fail(rid, error)
                continue
            request.prefill = time.perf_counter() - request.admitted_at
            self.running[rid] = request
            self.handle(events)

    def prefill(self, kind: str, rid: str, payload: dict[str, Any]):
        import numpy as np

        if kind == "understand":
            return self.batch.add_text(rid, payload["input_ids"], image_mask=payload["image_mask"],
                                       pixel_values=payload["pixel_values"], **self.text_options(payload))
        rngs = [np.random.default_rng(seed) for seed in payload["seeds"]]
        return self.batch.add_images(
            rid, payload["prompt_ids"], pad_id=self.config.pad_id, n=payload["n"],
            cfg_weight=payload["cfg_weight"], params=sampling(payload), rngs=rngs)

    def text_options(self, payload: dict[str, Any]) -> dict[str, Any]:
        """How an understanding request samples and stops (for add_text / start_text)."""
        import numpy as np

        return {"params": sampling(payload), "rng": np.random.default_rng(payload["seed"]),
                "max_new_tokens": payload["max_new_tokens"], "eos_id": self.config.eos_id}

    def start_prefill(self, request: RunningRequest, payload: dict[str, Any]) -> None:
        try:
            slot = self.batch.reserve_text(len(payload["input_ids"]), payload["max_new_tokens"])
        except Exception as error:  # noqa: BLE001 - this request fails alone
            self.fail(request.rid, error)
            return
        self.prefilling[request.rid] = Prefilling(request, slot, payload)
        self.prefill_jobs.put(self.prefilling[request.rid])

    def prefill_loop(self) -> None:
        """Thread: run each reserved understanding prompt into its cache row; the loop joins it."""
        while True:  # on the threads share_cores sets: the setting is the process's
            job = self.prefill_jobs.get()
            if not job.cancelled:
                payload = job.payload
                inputs = {"image_mask": payload["image_mask"], "pixel_values": payload["pixel_values"]}
                try:
                    if self.prefiller is not None:
                        job.logits = self.prefiller.prefill(job.slot, payload["input_ids"], **inputs,
                                                            threads=self.prefill_threads())
                    else:
                        job.logits = self.batch.prefill_text(job.slot, payload["input_ids"], **inputs)
                except Exception as error:  # noqa: BLE001 - this request fails alone
                    job.error = error
                    if isinstance(error, PrefillProcessDied):
                        self.prefiller_died = error
            self.prefill_done.put(job)

    def free_cores(self, shared: bool) -> int:
        """The cores the VQ thread is not decoding on, halved when `shared` by the loop and a prefill."""
        free = max(1, self.cores - self.vq_cores)
        return max(1, free // 2) if shared else free

    def prefill_threads(self) -> int:
        """Cores for the prefill process: those the loop and the VQ thread leave it."""
        return self.free_cores(shared=bool(self.running))

    def encode_images(self, pixels):
        """The vision program, on one core while the prefill thread runs beside stepping rows, else on all
        (as the VQ thread does)."""
        return self.vision.encode_images(pixels, single_thread=self.prefill_thread and bool(self.running))

    def join_prefilled(self, *, wait: bool) -> None:
        """Rows whose prefill is done join the batch (or fail alone); `wait`: a little, for the first."""
        while True:
            try:
                job = self.prefill_done.get(timeout=0.005) if wait else self.prefill_done.get_nowait()
            except queue.Empty:
                return
            wait = False
            request, payload = job.request, job.payload
            del self.prefilling[request.rid]
            if job.cancelled or job.error is not None:
                self.batch.pool.give_back([job.slot])
                if not job.cancelled:
                    self.fail(request.rid, job.error)
                continue
            events = self.batch.start_text(request.rid, job.slot, len(payload["input_ids"]), job.logits,
                                           **self.text_options(payload))
            request.prefill = time.perf_counter() - request.admitted_at
            self.running[request.rid] = request
            self.handle(events)

    def step(self) -> None:
        started = time.perf_counter()
        try:
            events = self.batch.step()
        except Exception:  # noqa: BLE001 - find the sequence at fault by stepping each alone
            events, failures = self.batch.step_each()
            for rid, error in failures.items():
                self.running.pop(rid, None)
                self.fail(rid, error)
        elapsed = time.perf_counter() - started
        self.steps += 1
        for request in self.running.values():
            request.decode += elapsed
        self.handle(events)

    def share_cores(self) -> None:
        """Paddle's threads: the cores the VQ thread is not using, halved while the prefill thread runs.

        Both at once on the same cores stall each other: Paddle's OpenMP ops wait at their
        barriers for a thread that is off the core. Measured with janus-tiny on the 2-core dev
        box, 8 concurrent image requests: steps beside a one-thread VQ decode took 15-24 ms with
        2 Paddle threads and 6-7 ms with 1. Paddle's thread count is one setting for the whole
        process, so the loop and the prefill thread share it: half the free cores each.
        """
        want = min(self.step_cap, self.free_cores(shared=bool(self.prefilling)))
        if want != self.step_threads:
            use_cpu_threads(want)
            self.step_threads = want

    def handle(self, events) -> None:
        for event in events:
            rid = event.key
            if event.kind == "token":
                self.events.append((rid, "token", event.token))
            elif event.kind == "progress":
                self.events.append(self.progress(rid, event.step))
            elif event.kind == "text_done":
                request = self.running.pop(rid)
                self.events.append((rid, "text_done", {"finish_reason": event.finish_reason,
                                                       **self.timings(request)}))
            elif event.kind == "codes_done":
                self.finish_images(rid, event.codes)

    def progress(self, rid: str, step: int) -> tuple:
        """An image request's progress event; every `preview_every` steps (not the last: the images
        follow) with the previews so far."""
        import numpy as np

        from model.generation import IMAGE_TOKENS

        request = self.running.get(rid)
        every = request.preview_every if request is not None else 0
        if every and step % every == 0 and step < IMAGE_TOKENS:
            codes = np.array(self.batch.sequences[rid].codes, np.int64)
            return (rid, "preview", {"step": step, "images": self.palette.previews(codes)})
        return (rid, "progress", step)

    def finish_images(self, rid: str, codes) -> None:
        from model.generation import decode_images

        request = self.running.pop(rid)
        if self.vq_decoder is not None:
            self.decoding[rid] = Decoding(rid, codes, self.timings(request))
            self.vq_ready.append(self.decoding[rid])
            return
        self.events.append(images_event(rid, lambda: decode_images(self.model, codes), self.timings(request)))

    def timings(self, request: RunningRequest) -> dict[str, float]:
        return {"prefill": request.prefill, "decode": request.decode}

    def fail(self, rid: str, error: BaseException) -> None:
        self.events.append((rid, "error", error_detail(error)))

    def flush(self) -> None:
        rows = self.batch.rows
        if self.events or rows != self.reported_rows:
            self.outbox.put(("events", self.events, {"steps": self.steps, "rows": rows}))
            self.events = []
            self.reported_rows = rows
        for job in self.vq_ready:
            self.vq_jobs.put(job)
        self.vq_ready = []

    def vq_loop(self) -> None:
        """Thread: decode finished image codes with the VQ program and post the images."""
        from model.generation import to_uint8_images

        while True:
            job = self.vq_jobs.get()
            event = None
            if not job.cancelled:
                # One core while the loop has rows to step, all when it is idle. Measured with janus-tiny,
                # 8 concurrent image requests on 2 cores, and no faster: taking all cores when images
                # pile up; two of these threads, each on its own one-thread request, unpinned as
                # CompiledCopies runs them (1.46-1.48 against 1.59-1.66 images/s); and those two at
                # nice 10 or 19 (1.32-1.49), probably because a descheduled thread can hold the GIL
                # that the loop waits for.
                single = bool(self.running)

                def decode():
                    self.vq_cores = 1 if single else self.vq_decoder.threads
                    try:
                        return to_uint8_images(self.vq_decoder.decode(job.codes, single_thread=single))
                    finally:
                        self.vq_cores = 0

                event = images_event(job.rid, decode, job.timings)
            self.decoding.pop(job.rid, None)
            if event is not None and not job.cancelled:
                self.outbox.put(("events", [event], {"steps": self.steps, "rows": self.reported_rows}))


def sampling(payload: dict[str, Any]):
    from model.generation import SamplingParams

    return SamplingParams(payload["temperature"], payload["top_k"], payload["top_p"],
                          payload.get("presence_penalty", 0.0), payload.get("frequency_penalty", 0.0))


def error_detail(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def images_event(rid: str, decode, timings: dict[str, float]) -> tuple:
    """Run `decode` (-> uint8 images) and make the request's "images_done" event, or its "error" event."""
    started = time.perf_counter()
    try:
        images = decode()
    except Exception as error:  # noqa: BLE001 - this request fails alone
        return (rid, "error", error_detail(error))
    return (rid, "images_done", {"images": list(images), **timings, "vq_decode": time.perf_counter() - started})

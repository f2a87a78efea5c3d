"""The API process's side of the engine.

Requests wait in a bounded FIFO here, in the API process, and go to a model
worker only when that worker has cache rows free for them; so when a worker
dies, only the requests it was running fail ("worker restarted") and the
waiting ones go to its replacement. One reader thread per worker turns its
outbox into events on the request's asyncio queue.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import multiprocessing
import os
import secrets
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

from server.engine.memory import gb, resident_bytes
from server.engine.types import (
    IMAGE_TOKENS, EngineConfig, EngineError, EngineNotReadyError, GenerateRequest, GenerateResult,
    InvalidRequestError, OverloadedError, ProgressEvent, RequestFailedError, RequestTimeoutError,
    Timings, TokenEvent, UnderstandRequest, UnderstandResult, Usage, WorkerRestartedError,
)
from server.engine.worker import WorkerConfig, run_worker

log = logging.getLogger("janus.engine")
# Retry-After's run time of a request before any has been answered (then: the measured mean)
UNMEASURED_RUN_TIME = 2.0
# A worker that dies this many times in a row before it is ready is not started again.
LOADING_DEATHS = 3
# Why workers die, as /metrics counts them.
DEATH_CAUSES = ("killed_while_loading", "died_while_loading", "died_while_serving")


@dataclasses.dataclass
class EngineStats:
    queue_length: int
    running_rows: int
    worker_rows: int  # cache rows in use as the workers report them
    running_requests: int
    workers_alive: int
    workers_total: int
    tokens_generated_total: int
    images_generated_total: int
    steps_total: int
    steps_per_second: float
    worker_restarts_total: int
    worker_deaths: dict[str, int]  # by cause (DEATH_CAUSES)


@dataclasses.dataclass
class PendingRequest:
    rid: str
    kind: str  # "understand" | "generate"
    payload: dict[str, Any]
    rows: int
    deadline: float
    events: asyncio.Queue
    enqueued_at: float
    dispatched_at: float | None = None
    first_token_at: float | None = None
    worker: "WorkerHandle | None" = None
    finished: bool = False
    length: int = 0  # cache positions each of its rows takes: prompt and new tokens
    too_long: str = ""  # what it is, for the error when no worker's rows are that long
    param: str | None = None


class WorkerHandle:
    """One worker process, its queues and what it is running."""

    def __init__(self, device: str, index: int):
        self.device = device
        self.index = index
        self.process = None
        self.inbox = None
        self.outbox = None
        self.ready = False
        self.fatal: str | None = None
        self.running: dict[str, PendingRequest] = {}
        self.rows_used = 0
        self.rows = 0
        self.row_length = 0
        self.cache: dict[str, Any] = {}  # the KV cache it sized for itself (server/engine/memory.py CachePlan.info)
        self.programs: list[str] = []  # the OpenVINO programs the worker runs on CPU
        self.prefill = ""  # how it prefills prompts: "thread" (beside the steps), "pieces" (between them) or "inline"
        self.runtime = ""  # which runtime it runs (model/runtime/)
        self.precision = ""  # its compute precision: the OpenVINO decoder's on CPU ("exact", "int8"...), else the dtype
        self.decoder_programs = ""  # the CPU decoder's programs: "built" at this start, or "imported" (cpu_programs.py)
        self.imported: list[str] = []  # the OpenVINO programs imported from an earlier start's, not built
        self.startup: dict[str, float] = {}  # seconds it took to load, build its runtime and open its cache
        self.steps = 0
        self.batch_rows = 0  # cache rows in use, as the worker itself last reported
        self.reader: threading.Thread | None = None
        self.loading_deaths = 0  # deaths in a row before it was ready
        self.loading_problem: str | None = None  # why the last one died, while it is restarted
        self.peak_rss = 0  # the most memory its process has held, sampled while it loads

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


PREFILL_WHERE = {"thread": "in a thread beside the decode loop",
                 "pieces": "in the decode loop, in chunks between the steps while other requests run",
                 "inline": "in the decode loop"}


class EngineClient:
    def __init__(self, config: EngineConfig):
        self.config = config
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[WorkerHandle] = []
        self._waiting: collections.deque[PendingRequest] = collections.deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._processor = None
        self._model_path: Path | None = None
        self._model_config = None
        self._boot_error: str | None = None
        self._stopping = False
        self._ready_event = asyncio.Event()
        self._tokens_total = 0
        self._images_total = 0
        self._restarts = 0
        self._deaths = dict.fromkeys(DEATH_CAUSES, 0)
        self._rate_window: collections.deque[tuple[float, int]] = collections.deque(maxlen=50)
        self._run_times: collections.deque[float] = collections.deque(maxlen=32)  # of answered requests

    # ---- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._boot(), name="engine-boot"))
        self._tasks.append(asyncio.create_task(self._dispatch_loop(), name="engine-dispatch"))
        self._tasks.append(asyncio.create_task(self._watch_loop(), name="engine-watch"))

    async def _boot(self) -> None:
        try:
            self._model_path = await asyncio.to_thread(self._resolve_model)
            self._processor, self._model_config = await asyncio.to_thread(self._load_processor, self._model_path)
        except Exception as error:  # noqa: BLE001 - reported by /ready and to every request
            self._boot_error = f"{type(error).__name__}: {error}"
            log.error("model could not be prepared: %s", self._boot_error)
            self._fail_waiting(lambda: EngineNotReadyError(f"model failed to load: {self._boot_error}"))
            return
        devices = self._devices()
        self._workers = [WorkerHandle(device, i) for i, device in enumerate(devices)]
        for worker in self._workers:
            self._spawn(worker)

    def _resolve_model(self) -> Path:
        from model.hub import resolve_model

        return Path(resolve_model(self.config.model, self.config.home, offline=self.config.offline))

    @staticmethod
    def _load_processor(path: Path):
        from model.config import JanusConfig
        from model.processor import JanusProcessor

        config = JanusConfig.from_file(path / "config.json")
        return JanusProcessor.from_folder(path, roles=config.chat_roles), config

    def _devices(self) -> list[str]:
        devices = [d.strip() for d in self.config.devices if d.strip()] or ["auto"]
        return devices

    def _worker_config(self, worker: WorkerHandle) -> WorkerConfig:
        threads = self.config.threads
        if threads is None and worker.device in ("cpu", "auto"):
            cpu_workers = sum(1 for w in self._workers if w.device in ("cpu", "auto"))
            threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
        return WorkerConfig(
            model_path=str(self._model_path), device=worker.device, dtype=self.config.dtype,
            max_batch_rows=self.config.max_batch_rows, max_cache_tokens=self.config.max_cache_tokens,
            max_new_tokens=self.config.max_new_tokens_limit, memory_fraction=self.config.memory_fraction,
            max_running_requests=self.config.max_running_requests, cpu_engine=self.config.cpu_engine,
            cpu_precision=self.config.cpu_precision, cpu_vq=self.config.cpu_vq, cpu_vision=self.config.cpu_vision,
            prefill_chunk=self.config.prefill_chunk, program_cache=self._program_cache(), threads=threads,
            eos_id=self._processor.eos_id, pad_id=self._processor.pad_id)

    def _program_cache(self) -> str | None:
        """The folder for compiled CPU programs (model/cpu_programs.py), or None."""
        choice = self.config.program_cache
        if choice == "off":
            return None
        if choice == "auto":
            from model.hub import default_home

            return str(default_home(self.config.home) / "programs")
        return str(Path(choice).expanduser())

    def _spawn(self, worker: WorkerHandle) -> None:
        worker.inbox = self._ctx.Queue()
        # Worker -> API process: a pipe the worker writes itself (worker.Outbox), not a Queue.
        worker.outbox, sender = self._ctx.Pipe(duplex=False)
        worker.ready = False
        worker.peak_rss = 0
        worker.running.clear()
        worker.rows_used = 0
        worker.batch_rows = 0
        worker.process = self._ctx.Process(
            target=run_worker, args=(self._worker_config(worker), worker.inbox, sender),
            name=f"janus-worker-{worker.index}", daemon=True)
        worker.process.start()
        sender.close()  # the worker holds the only writer now
        worker.reader = threading.Thread(target=self._read_outbox, args=(worker, worker.process, worker.outbox),
                                         name=f"janus-reader-{worker.index}", daemon=True)
        worker.reader.start()
        log.info("worker %d started on device %s (pid %d)", worker.index, worker.device, worker.process.pid)

    async def wait_ready(self, timeout: float | None = None) -> None:
        async def ready():
            while not self.ready:
                if self._boot_error or (self._workers and all(w.fatal for w in self._workers)):
                    raise EngineNotReadyError(f"model failed to load: {self.error}")
                await asyncio.sleep(0.05)

        await asyncio.wait_for(ready(), timeout)

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop taking work, let running and waiting requests finish, then end the workers."""
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while (self._waiting or any(w.running for w in self._workers)) and time.monotonic() < deadline:
            if not any(w.alive for w in self._workers):
                break
            await asyncio.sleep(0.05)
        self._fail_waiting(lambda: EngineNotReadyError("the server is shutting down"))
        for worker in self._workers:
            for request in list(worker.running.values()):
                self._finish(request, error=EngineNotReadyError("the server is shutting down"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await asyncio.to_thread(self._end_workers)

    def _end_workers(self) -> None:
        for worker in self._workers:
            if worker.alive:
                try:
                    worker.inbox.put(("stop",))
                except (OSError, ValueError):
                    pass
        for worker in self._workers:
            if worker.process is None:
                continue
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            self._close_pipes(worker)
            if worker.reader is not None:
                worker.reader.join(timeout=5)
            # Dropping the queues lets their semaphores be unlinked now rather than reported as leaked at exit.
            worker.inbox = worker.outbox = worker.process = worker.reader = None

    # ---- properties

    @property
    def ready(self) -> bool:
        return not self._stopping and any(w.ready and w.alive for w in self._workers)

    @property
    def error(self) -> str | None:
        if self._boot_error:
            return self._boot_error
        fatal = [w.fatal for w in self._workers if w.fatal]
        return fatal[0] if fatal and len(fatal) == len(self._workers) else None

    @property
    def loading_problems(self) -> list[str]:
        """Why workers that are being started again died before they were ready."""
        return [f"worker {w.index} {w.loading_problem}" for w in self._workers if w.loading_problem and not w.fatal]

    @property
    def model_id(self) -> str:
        model = self.config.model
        return model if not Path(model).is_dir() else Path(model).resolve().name

    @property
    def processor(self):
        return self._processor

    @property
    def max_context(self) -> int:
        if self._model_config is None:
            return 0
        return self._model_config.language.max_position_embeddings

    @property
    def row_length(self) -> int | None:
        """Cache positions one request row may use (prompt + new tokens) on the longest-rowed worker that has
        sized its cache; None before any has."""
        return max((w.row_length for w in self._workers if w.row_length), default=None)

    @property
    def batch_rows(self) -> int:
        """Rows one request may take: the most any worker has, or the configured bound before any is ready."""
        return max((w.rows for w in self._workers if w.rows), default=self.config.max_batch_rows)

    @property
    def caches(self) -> list[dict[str, Any]]:
        """The KV cache of each worker that has one, as it sized it."""
        return [{"worker": w.index, **w.cache} for w in self._workers if w.cache]

    @property
    def runtimes(self) -> list[dict[str, Any]]:
        """How each ready worker runs: its runtime, precision, OpenVINO programs, prefills and start-up times."""
        return [{"worker": w.index, "device": w.cache.get("device"), "runtime": w.runtime, "precision": w.precision,
                 "programs": w.programs, "decoder_programs": w.decoder_programs, "imported": w.imported,
                 "prefill": w.prefill,
                 "startup_s": w.startup} for w in self._workers if w.ready and w.alive]

    def stats(self) -> EngineStats:
        now = time.monotonic()
        steps = sum(w.steps for w in self._workers)
        rate = 0.0
        window = [(t, s) for t, s in self._rate_window if now - t < 10]
        if len(window) >= 2 and window[-1][0] > window[0][0]:
            rate = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
        return EngineStats(
            queue_length=len(self._waiting),
            running_rows=sum(w.rows_used for w in self._workers),
            worker_rows=sum(w.batch_rows for w in self._workers if w.alive),
            running_requests=sum(len(w.running) for w in self._workers),
            workers_alive=sum(1 for w in self._workers if w.alive and w.ready),
            workers_total=len(self._workers),
            tokens_generated_total=self._tokens_total,
            images_generated_total=self._images_total,
            steps_total=steps,
            steps_per_second=rate,
            worker_restarts_total=self._restarts,
            worker_deaths=dict(self._deaths))

    # ---- understanding

    async def understand(self, req: UnderstandRequest) -> UnderstandResult:
        return await last_item(self.understand_stream(req))

    async def understand_stream(self, req: UnderstandRequest) -> AsyncIterator[TokenEvent | UnderstandResult]:
        self._check_accepting()
        if req.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be at least 1", param="max_new_tokens")
        encoded = await asyncio.to_thread(self._encode_understanding, req)
        prompt_len = len(encoded.input_ids)
        length = prompt_len + req.max_new_tokens - 1
        too_long = (f"the prompt is {prompt_len} tokens (with {IMAGE_TOKENS} per image) and max_new_tokens is "
                    f"{req.max_new_tokens}; together they exceed")
        self._check_length(length, too_long, "messages")
        payload = {
            "input_ids": encoded.input_ids, "image_mask": encoded.image_mask,
            "pixel_values": encoded.pixel_values, "temperature": req.temperature, "top_k": req.top_k,
            "top_p": req.top_p, "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty, "seed": req.seed, "max_new_tokens": req.max_new_tokens,
        }
        request = self._enqueue(req.request_id, "understand", payload, rows=1, timeout=req.timeout,
                                length=length, too_long=too_long, param="messages")
        decoder = StopStringDecoder(self._processor, req.stop)
        try:
            while True:
                kind, data = await self._next_event(request)
                if kind == "token":
                    self._tokens_total += 1
                    if request.first_token_at is None:
                        request.first_token_at = time.monotonic()
                    decoder.add(data)
                    piece = decoder.flush_ready()
                    if piece:
                        yield TokenEvent(piece, [data])
                    if decoder.stopped:
                        self._cancel(request)
                        yield self._text_result(request, decoder, "stop", data={})
                        return
                elif kind == "text_done":
                    piece = decoder.flush_all()
                    if piece:
                        yield TokenEvent(piece, [])
                    yield self._text_result(request, decoder, "stop" if decoder.stopped else data["finish_reason"], data)
                    return
        finally:
            if not request.finished:
                self._cancel(request)

    def _encode_understanding(self, req: UnderstandRequest):
        try:
            return self._processor.encode_understanding(req.messages, req.images, system_prompt=req.system_prompt)
        except ValueError as error:
            raise InvalidRequestError(str(error), param="messages") from error

    def _text_result(self, request: PendingRequest, decoder: "StopStringDecoder", finish_reason: str,
                     data: dict) -> UnderstandResult:
        timings = self._timings(request, data)
        if request.first_token_at is not None:
            timings.first_token = request.first_token_at - request.enqueued_at
        prompt_tokens = len(request.payload["input_ids"])
        return UnderstandResult(
            request_id=request.rid, text=decoder.text, finish_reason=finish_reason,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(decoder.ids)),
            timings=timings, token_ids=list(decoder.ids))

    # ---- text to image

    async def generate_images(self, req: GenerateRequest) -> GenerateResult:
        return await last_item(self.generate_images_stream(req))

    async def generate_images_stream(self, req: GenerateRequest) -> AsyncIterator[ProgressEvent | GenerateResult]:
        self._check_accepting()
        if req.n < 1:
            raise InvalidRequestError("n must be at least 1", param="n")
        if 2 * req.n > self.batch_rows:
            raise InvalidRequestError(
                f"n={req.n} needs {2 * req.n} batch rows (two per image for guidance); this server "
                f"runs at most {self.batch_rows}", param="n")
        prompt_ids = await asyncio.to_thread(self._processor.encode_generation, req.prompt)
        length = len(prompt_ids) + IMAGE_TOKENS - 1
        too_long = f"the prompt is {len(prompt_ids)} tokens; with {IMAGE_TOKENS} image tokens it exceeds"
        self._check_length(length, too_long, "prompt")
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        seeds = [(seed + i) % 2**63 for i in range(req.n)]
        payload = {
            "prompt_ids": prompt_ids, "n": req.n, "cfg_weight": req.cfg_weight, "temperature": req.temperature,
            "top_k": req.top_k, "top_p": req.top_p, "seeds": seeds, "preview_every": req.preview_every,
        }
        request = self._enqueue(req.request_id, "generate", payload, rows=2 * req.n, timeout=req.timeout,
                                length=length, too_long=too_long, param="prompt")
        try:
            while True:
                kind, data = await self._next_event(request)
                if kind == "progress":
                    yield ProgressEvent(step=data, total=IMAGE_TOKENS)
                elif kind == "preview":
                    yield ProgressEvent(step=data["step"], total=IMAGE_TOKENS, previews=data["images"])
                elif kind == "images_done":
                    self._images_total += req.n
                    yield GenerateResult(
                        request_id=request.rid, images=data["images"], seeds=seeds,
                        usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=IMAGE_TOKENS * req.n,
                                    images=req.n),
                        timings=self._timings(request, data))
                    return
        finally:
            if not request.finished:
                self._cancel(request)

    # ---- queue, dispatch, events

    def _check_accepting(self) -> None:
        if self._stopping:
            raise EngineNotReadyError("the server is shutting down")
        if self._boot_error:
            raise EngineNotReadyError(f"model failed to load: {self._boot_error}", retry_after=60)
        if self._processor is None:
            raise EngineNotReadyError("the model is still loading")

    def _check_length(self, length: int, too_long: str, param: str) -> None:
        """Refuse a request longer than any worker's cache rows, once one has sized its cache (until then,
        the dispatch checks it: _unservable)."""
        error = self._length_error(length, too_long, param)
        if error is not None:
            raise error

    def _length_error(self, length: int, too_long: str, param: str | None) -> InvalidRequestError | None:
        limit = self.row_length
        if limit is not None and length > limit:
            return InvalidRequestError(f"{too_long} this server's context of {limit} tokens", param=param)
        return None

    def _enqueue(self, rid: str, kind: str, payload: dict, *, rows: int, timeout: float | None, length: int = 0,
                 too_long: str = "", param: str | None = None) -> PendingRequest:
        """Queue a request; `length`: the cache positions each of its rows takes, `too_long` and `param`: what
        to say when no worker's rows are that long."""
        if len(self._waiting) >= self.config.max_queue:
            raise OverloadedError(
                f"{len(self._waiting)} requests are already waiting; try again later",
                retry_after=self._retry_after())
        now = time.monotonic()
        request = PendingRequest(
            rid=rid, kind=kind, payload=payload, rows=rows,
            deadline=now + (timeout if timeout is not None else self.config.request_timeout),
            events=asyncio.Queue(), enqueued_at=now, length=length, too_long=too_long, param=param)
        self._waiting.append(request)
        self._wake.set()
        return request

    def _retry_after(self) -> float:
        """Seconds until the waiting queue has likely drained: the requests it holds over the measured
        service rate (requests running at once over their recent mean run time, dispatch to answer)."""
        waiting = sum(1 for r in self._waiting if not r.finished)
        running = max(1, sum(len(w.running) for w in self._workers))
        run_time = statistics.fmean(self._run_times) if self._run_times else UNMEASURED_RUN_TIME
        return max(1.0, min(600.0, waiting * run_time / running))

    async def _next_event(self, request: PendingRequest):
        kind, data = await request.events.get()
        if kind == "error":
            raise data
        return kind, data

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                request = self._waiting[0]
                if request.finished:
                    self._waiting.popleft()
                    continue
                error = self._unservable(request)
                if error is not None:
                    self._waiting.popleft()
                    self._finish(request, error=error)
                    continue
                worker = self._least_loaded(request)
                if worker is None:
                    break
                self._waiting.popleft()
                self._send(worker, request)

    def _unservable(self, request: PendingRequest) -> InvalidRequestError | None:
        """Why no worker can ever run `request`, once every worker has sized its cache (a request that came
        in before that was not checked against it); None while it may still run."""
        sized = [w for w in self._workers if w.row_length and not w.fatal]
        if not sized or len(sized) < sum(1 for w in self._workers if not w.fatal):
            return None
        if any(w.row_length >= request.length and w.rows >= request.rows for w in sized):
            return None
        too_long = self._length_error(request.length, request.too_long, request.param)
        if too_long is not None:
            return too_long
        return InvalidRequestError(f"the request needs {request.rows} batch rows (two per image for guidance); "
                                   f"this server runs at most {self.batch_rows}", param="n")

    def _least_loaded(self, request: PendingRequest) -> WorkerHandle | None:
        limit, rows = self.config.max_running_requests, request.rows
        candidates = [w for w in self._workers if w.ready and w.alive and w.rows_used + rows <= w.rows
                      and w.row_length >= request.length and not (limit and len(w.running) >= limit)]
        return min(candidates, key=lambda w: (w.rows_used, w.index)) if candidates else None

    def _send(self, worker: WorkerHandle, request: PendingRequest) -> None:
        request.worker = worker
        request.dispatched_at = time.monotonic()
        worker.running[request.rid] = request
        worker.rows_used += request.rows
        worker.inbox.put((request.kind, request.rid, request.payload))

    def _cancel(self, request: PendingRequest) -> None:
        """The caller went away or timed out: free its rows at the worker's next step."""
        if request.finished:
            return
        request.finished = True
        worker = request.worker
        if worker is not None and worker.running.pop(request.rid, None) is not None:
            worker.rows_used -= request.rows
            if worker.alive:
                worker.inbox.put(("cancel", request.rid))
            self._wake.set()

    def _finish(self, request: PendingRequest, *, error: EngineError | None = None, item=None) -> None:
        """Deliver the last event of a request and release its rows."""
        if request.finished:
            return
        request.finished = True
        worker = request.worker
        if worker is not None and worker.running.pop(request.rid, None) is not None:
            worker.rows_used -= request.rows
            self._wake.set()
            if error is None:
                self._run_times.append(time.monotonic() - request.dispatched_at)
        request.events.put_nowait(("error", error) if error is not None else item)

    def _fail_waiting(self, make_error) -> None:
        while self._waiting:
            self._finish(self._waiting.popleft(), error=make_error())

    def _read_outbox(self, worker: WorkerHandle, process, outbox) -> None:
        """Reader thread: worker messages -> the event loop, until that process is gone."""
        while True:
            try:
                if not outbox.poll(0.2):
                    if not process.is_alive():
                        break
                    continue
                message = outbox.recv()
            except (EOFError, OSError, ValueError):  # the worker is gone, or the pipe was closed here
                break
            try:
                self._loop.call_soon_threadsafe(self._on_message, worker, process, message)
            except RuntimeError:
                return
        process.join(timeout=5)  # here, not in the event loop: its pipe closes as it exits, the exit code follows
        try:  # after its last message, so that a "fatal" it sent is known first
            self._loop.call_soon_threadsafe(self._on_exit, worker, process)
        except RuntimeError:
            pass

    def _on_message(self, worker: WorkerHandle, process, message) -> None:
        if process is not worker.process:
            return  # from a worker that has since been replaced
        kind = message[0]
        if kind == "ready":
            info = message[1]
            worker.ready = True
            worker.loading_deaths, worker.loading_problem = 0, None
            worker.cache = {**info["cache"], "device": info["device"]}
            worker.rows, worker.row_length = worker.cache["rows"], worker.cache["row_length"]
            worker.programs = list(info.get("programs", []))
            worker.prefill = info.get("prefill", "inline")
            worker.runtime = info.get("runtime", "")
            worker.precision = info.get("precision", "")
            worker.decoder_programs = info.get("decoder_programs", "")
            worker.imported = list(info.get("imported", []))
            worker.startup = startup = info.get("startup", {})
            log.info("worker %d ready on %s: %s runtime, precision %s (OpenVINO: %s%s; understanding prefills: %s); "
                     "%s; loaded in %s s, runtime built in %s s%s, cache in %s s",
                     worker.index, info["device"], worker.runtime, worker.precision,
                     ", ".join(worker.programs) or "none",
                     f"; imported: {', '.join(worker.imported) or 'none'}" if worker.programs else "",
                     PREFILL_WHERE[worker.prefill], info.get("cache_summary", ""),
                     startup.get("load_s"), startup.get("runtime_s"),
                     "".join(f" ({', '.join(f'{name} {s} s' for name, s in parts.items())})"
                             for parts in [startup.get("programs_s")] if parts),
                     startup.get("cache_s"))
            self._wake.set()
        elif kind == "fatal":
            worker.fatal = message[1]
            log.error("worker %d could not load the model: %s", worker.index, message[1])
            if self.error:
                self._fail_waiting(lambda: EngineNotReadyError(f"model failed to load: {self.error}"))
        elif kind == "events":
            _, events, stats = message
            worker.steps = stats["steps"]
            worker.batch_rows = stats["rows"]
            self._rate_window.append((time.monotonic(), sum(w.steps for w in self._workers)))
            for rid, event, data in events:
                request = worker.running.get(rid)
                if request is None:
                    continue
                if event in ("token", "progress", "preview"):
                    request.events.put_nowait((event, data))
                elif event in ("text_done", "images_done"):
                    self._finish(request, item=(event, data))
                elif event == "error":
                    self._finish(request, error=RequestFailedError(f"inference failed: {data}"))

    def _on_exit(self, worker: WorkerHandle, process) -> None:
        """A worker process ended (its reader saw the pipe close, after its last message).

        One that was serving is started again at once. One that died while loading is started again
        after a delay that doubles each time, and after LOADING_DEATHS deaths in a row it is given up
        with the reason, as a worker that reported a fatal error is."""
        if process is not worker.process or self._stopping or worker.fatal:
            return
        code = process.exitcode
        if worker.ready:
            self._deaths["died_while_serving"] += 1
            self._restart(worker)
            return
        killed = code == -signal.SIGKILL
        self._deaths["killed_while_loading" if killed else "died_while_loading"] += 1
        worker.loading_deaths += 1
        reason = loading_death(code, worker.peak_rss)
        if worker.loading_deaths >= LOADING_DEATHS:
            worker.fatal = (f"the model worker was {reason}, {worker.loading_deaths} times in a row; it is not "
                            f"started again" + ("; give it more memory, or a smaller cache (--memory-fraction)"
                                                if killed else ""))
            log.error("worker %d: %s", worker.index, worker.fatal)
            if self.error:
                self._fail_waiting(lambda: EngineNotReadyError(f"model failed to load: {self.error}"))
            return
        delay = self.config.restart_delay * 2 ** (worker.loading_deaths - 1)
        worker.loading_problem = f"was {reason}; starting it again in {delay:g} s"
        log.error("worker %d %s (%d of %d tries)", worker.index, worker.loading_problem, worker.loading_deaths,
                  LOADING_DEATHS)
        self._loop.call_later(delay, self._restart_after_delay, worker, process, reason)

    def _restart_after_delay(self, worker: WorkerHandle, process, reason: str) -> None:
        if process is worker.process and not self._stopping and not worker.fatal:
            worker.loading_problem = (f"was {reason}; it was started again (try {worker.loading_deaths + 1} of "
                                      f"{LOADING_DEATHS})")
            self._restart(worker)

    async def _watch_loop(self) -> None:
        """Sample the memory of loading workers and time out overdue requests (dead workers: _on_exit)."""
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for worker in self._workers:
                if not worker.ready and worker.alive:
                    worker.peak_rss = max(worker.peak_rss, resident_bytes(worker.process.pid, peak=True) or 0)
            for worker in self._workers:
                for request in list(worker.running.values()):
                    if now > request.deadline:
                        self._cancel(request)
                        request.events.put_nowait(("error", RequestTimeoutError(
                            "the request did not finish within its timeout", param="timeout")))
            for request in list(self._waiting):
                if now > request.deadline:
                    self._waiting.remove(request)
                    self._finish(request, error=RequestTimeoutError(
                        "the request waited in the queue past its timeout", param="timeout"))

    def _restart(self, worker: WorkerHandle) -> None:
        code = worker.process.exitcode
        if worker.ready:
            log.error("worker %d died (exit code %s); failing its %d requests and starting it again",
                      worker.index, code, len(worker.running))
        for request in list(worker.running.values()):
            self._finish(request, error=WorkerRestartedError(
                f"the model worker running this request stopped (exit code {code}) and is being restarted; "
                "retry the request"))
        self._close_pipes(worker)
        self._restarts += 1
        self._spawn(worker)

    @staticmethod
    def _close_pipes(worker: WorkerHandle) -> None:
        worker.inbox.cancel_join_thread()
        worker.inbox.close()
        worker.outbox.close()

    def _timings(self, request: PendingRequest, data: dict) -> Timings:
        now = time.monotonic()
        queue_time = (request.dispatched_at or now) - request.enqueued_at
        return Timings(queue=queue_time, prefill=data.get("prefill", 0.0), decode=data.get("decode", 0.0),
                       vq_decode=data.get("vq_decode", 0.0), total=now - request.enqueued_at)


def loading_death(code: int | None, peak_rss: int) -> str:
    """How a worker process that had not reported ready ended, in words."""
    reached = f" (it had reached {gb(peak_rss)})" if peak_rss else ""
    if code == -signal.SIGKILL:
        return f"killed while loading (SIGKILL), most likely out of memory{reached}"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name} while loading{reached}"
    return f"ended with exit code {code} while loading{reached}"


async def last_item(stream: AsyncIterator):
    """The result that ends a stream of events."""
    item = None
    async for item in stream:
        pass
    return item


class StopStringDecoder:
    """Token ids -> text for streaming: the processor's incremental decoder, plus stop strings.

    Text that could still become the start of a stop string is held back until it cannot.
    """

    def __init__(self, processor, stop: list[str]):
        self.decoder = processor.incremental_decoder(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._append(self.decoder.push(token))

    def _append(self, piece: str) -> None:
        searched_from = len(self.text)
        self.text += piece
        for stop in self.stop:
            at = self.text.find(stop, max(0, searched_from - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True

    def flush_ready(self) -> str:
        """Text safe to send now."""
        end = len(self.text)
        if not self.stopped:
            for stop in self.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.sent)
        piece = self.text[self.sent:end]
        self.sent = end
        return piece

    def flush_all(self) -> str:
        """The rest of the text once generation has ended (incomplete characters as U+FFFD)."""
        if not self.stopped:
            self._append(self.decoder.finish())
        piece = self.text[self.sent:]
        self.sent = len(self.text)
        return piece

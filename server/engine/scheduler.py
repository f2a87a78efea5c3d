"""The worker's scheduler: who runs and when, for one runtime on one device.

It takes new work and cancellations from its inbox, admits what fits (FIFO, within the
runtime's free cache rows and --max-running-requests), has the runtime start it, steps every
running row together, hands finished image codes to the runtime's decoder, and sends what each
request produced to its outbox. Requests join and leave between steps (continuous batching).

It knows nothing of how a device runs the model: that is the runtime's (model/runtime/). A
runtime may start a request or decode images in the background, or in pieces that the scheduler
has it run one per turn, before each step (run_piece): it answers with a future, which the scheduler
polls between steps, so that the running rows never wait for it (or for more than one piece). Pure Python: no
Paddle, numpy or OpenVINO here (tests/test_scheduler.py drives it with a fake runtime).

Messages in:  ("understand", rid, payload) | ("generate", rid, payload) | ("cancel", rid) | ("stop",)
Messages out: ("events", [event, ...], {"steps": n, "rows": rows in use})
An event is (rid, kind, data): kind "token" (id), "progress" (step), "preview" (dict),
"text_done" / "images_done" (result dict), "error" (message).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from server.engine.types import IMAGE_TOKENS

log = logging.getLogger("janus.worker")

IDLE_WAIT = 0.5  # seconds the loop blocks on its inbox when nothing runs
FUTURE_WAIT = 0.01  # seconds it waits on the runtime's futures when only they are in flight


@dataclasses.dataclass
class Request:
    """One admitted request, from its start to its last event."""

    rid: str
    kind: str  # "understand" | "generate"
    rows: int
    admitted_at: float
    preview_every: int = 0  # image requests: a preview every this many steps (0: none)
    prefill: float = 0.0  # seconds from admission to its first token
    decode: float = 0.0  # seconds of the steps it ran in
    future: Future | None = None  # while starting, or while its images are decoded
    cancelled: bool = False


class Scheduler:
    """Admission and stepping for one worker; FIFO admission, every running row steps together."""

    def __init__(self, runtime, inbox, outbox, *, max_running_requests: int = 0):
        self.runtime = runtime
        self.inbox = inbox
        self.outbox = outbox
        self.max_running_requests = max_running_requests
        self.pending: collections.deque = collections.deque()
        self.starting: dict[str, Request] = {}  # the runtime is prefilling them
        self.running: dict[str, Request] = {}  # in the batch
        self.decoding: dict[str, Request] = {}  # the runtime is decoding their images
        self.steps = 0
        self.busy = False  # the runtime has pieces of work to run between steps (run_piece)
        self.reported_rows = 0
        self.events: list[tuple] = []
        self.parent = multiprocessing.parent_process()  # None when not started by multiprocessing
        self.checked_at = time.monotonic()

    # ---- the loop

    def run(self) -> None:
        while True:
            if not self.take_messages():
                return
            if self.checks_due() and self.orphaned():
                log.warning("the API process is gone; worker %d exits", os.getpid())
                return
            self.iterate()

    def iterate(self) -> None:
        """One turn: what the runtime finished, admission, a piece of the runtime's own work, a step, the events
        out."""
        self.collect()
        self.admit()
        self.busy = self.runtime.run_piece()
        if self.running:
            self.step()
        self.collect()
        self.flush()

    def in_flight(self) -> list[Future]:
        """What the loop may wait on when nothing steps: the requests' futures, and the runtime's own for work
        that only its poll() turns into a result."""
        mine = [r.future for r in (*self.starting.values(), *self.decoding.values()) if r.future is not None]
        return mine + self.runtime.background()

    def take_messages(self) -> bool:
        """Read the inbox (waiting when there is nothing to step); False on "stop"."""
        block = not self.running and not self.pending and not self.busy
        futures = self.in_flight() if block else []
        if futures:  # only the runtime's background work: wake when it is done, or for a message
            concurrent.futures.wait(futures, timeout=FUTURE_WAIT, return_when=concurrent.futures.FIRST_COMPLETED)
            block = False
        try:
            message = self.inbox.get(timeout=IDLE_WAIT) if block else self.inbox.get_nowait()
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

    # ---- requests

    def cancel(self, rid: str) -> None:
        """The client gave up on `rid`, in whatever phase it is."""
        self.pending = collections.deque(m for m in self.pending if m[1] != rid)
        for phase in (self.starting, self.decoding):
            if rid in phase:  # work the runtime has begun goes on; its result is dropped
                phase[rid].cancelled = True
                phase[rid].future.cancel()
        if rid in self.starting or self.running.pop(rid, None) is not None:
            self.runtime.remove(rid)

    def admit(self) -> None:
        while self.pending:
            kind, rid, payload = self.pending[0]
            rows = 1 if kind == "understand" else 2 * payload["n"]
            limit = self.max_running_requests
            if rows > self.runtime.free_rows or (limit and len(self.running) + len(self.starting) >= limit):
                return
            self.pending.popleft()
            request = Request(rid, kind, rows, time.perf_counter(), preview_every=payload.get("preview_every", 0))
            try:
                request.future = self.runtime.start(kind, rid, payload)
            except Exception as error:  # noqa: BLE001 - this request fails alone
                self.fail(rid, error)
                continue
            self.starting[rid] = request
            self.collect_started()  # a runtime that started it at once steps it from the next step on

    def collect(self) -> None:
        """Take what the runtime finished in the background: started requests join, images go out."""
        self.runtime.poll()
        self.collect_started()
        self.collect_decoded()

    def collect_started(self) -> None:
        for rid, request, events in self.finished(self.starting):  # events: its first token, or image step
            request.prefill = time.perf_counter() - request.admitted_at
            request.future = None
            self.running[rid] = request
            self.handle(events)

    def collect_decoded(self) -> None:
        for rid, request, (images, seconds) in self.finished(self.decoding):
            self.events.append((rid, "images_done", {"images": list(images), **self.timings(request),
                                                     "vq_decode": seconds}))

    def finished(self, phase: dict[str, Request]) -> Iterator[tuple[str, Request, Any]]:
        """The requests of `phase` whose future is done, taken out of it, with its result; the cancelled ones
        are dropped, the failed ones failed."""
        for rid, request in list(phase.items()):
            if not request.future.done():
                continue
            del phase[rid]
            if request.cancelled:
                continue
            error = request.future.exception()
            if error is not None:
                self.fail(rid, error)
                continue
            yield rid, request, request.future.result()

    def step(self) -> None:
        started = time.perf_counter()
        try:
            events = self.runtime.step()
        except Exception:  # noqa: BLE001 - find the request at fault by stepping each alone
            events, failures = self.runtime.step_each()
            for rid, error in failures.items():
                self.running.pop(rid, None)
                self.fail(rid, error)
        elapsed = time.perf_counter() - started
        self.steps += 1
        for request in self.running.values():
            request.decode += elapsed
        self.handle(events)

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
                request = self.running.pop(rid)
                try:
                    request.future = self.runtime.decode_images(event.codes)
                except Exception as error:  # noqa: BLE001 - this request fails alone
                    self.fail(rid, error)
                    continue
                self.decoding[rid] = request

    def progress(self, rid: str, step: int) -> tuple:
        """An image request's progress event; every `preview_every` steps (not the last: the images
        follow) with the previews so far."""
        request = self.running.get(rid)
        every = request.preview_every if request is not None else 0
        if every and step % every == 0 and step < IMAGE_TOKENS:
            previews = self.runtime.previews(rid)
            if previews is not None:
                return (rid, "preview", {"step": step, "images": previews})
        return (rid, "progress", step)

    @staticmethod
    def timings(request: Request) -> dict[str, float]:
        return {"prefill": request.prefill, "decode": request.decode}

    def fail(self, rid: str, error: BaseException) -> None:
        self.events.append((rid, "error", error_detail(error)))

    def flush(self) -> None:
        rows = self.runtime.rows_in_use
        if self.events or rows != self.reported_rows:
            self.outbox.put(("events", self.events, {"steps": self.steps, "rows": rows}))
            self.events = []
            self.reported_rows = rows


def error_detail(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()

"""The worker's scheduler (server/engine/scheduler.py) against a fake runtime in pure Python.

No Paddle, numpy or OpenVINO: test_the_scheduler_runs_without_paddle_or_numpy runs every other test
of this file in a process where importing them fails.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

from server.engine.scheduler import Scheduler

IMAGE_STEPS = 3  # the fake's images are done after this many steps


@dataclasses.dataclass
class Event:
    key: str
    kind: str
    token: int | None = None
    step: int | None = None
    finish_reason: str | None = None
    codes: object = None


@dataclasses.dataclass
class Sequence:
    rid: str
    kind: str
    rows: int
    tokens: int  # understand: tokens left to make
    made: int = 0


class FakeRuntime:
    """Rows, sequences and futures like a runtime's; text rows make tokens 1, 2, ... up to max_new_tokens,
    image requests finish after IMAGE_STEPS steps. `background`: starts and decodes finish only when
    `finish()` says so (as a runtime's threads would), else at once."""

    def __init__(self, rows: int = 4, background: bool = False, pieces: int = 0):
        """`pieces`: starts take this many run_piece() calls, then join at the next poll()."""
        self.capacity = rows
        self.deferred = background
        self.pieces = pieces
        self.piece_queue: list[list] = []  # [rid, pieces left], first come first run
        self.joinable: list[str] = []
        self.sequences: dict[str, Sequence] = {}
        self.starting: dict[str, tuple[Sequence, Future]] = {}
        self.decodes: list[tuple[object, Future]] = []
        self.removed: list[str] = []
        self.calls: list[str] = []
        self.fail_start: set[str] = set()  # fail in start() itself
        self.fail_prefill: set[str] = set()  # fail in the background, through the future
        self.fail_step: set[str] = set()  # raise in step() while these run
        self.fail_decode: set[str] = set()
        self.steps = 0

    @property
    def free_rows(self) -> int:
        used = sum(s.rows for s in self.sequences.values()) + sum(s.rows for s, _ in self.starting.values())
        return self.capacity - used

    @property
    def rows_in_use(self) -> int:
        return sum(s.rows for s in self.sequences.values())

    def start(self, kind, rid, payload) -> Future:
        self.calls.append(f"start {rid}")
        if rid in self.fail_start:
            raise ValueError(f"cannot start {rid}")
        rows = 1 if kind == "understand" else 2 * payload["n"]
        if rows > self.free_rows:
            raise AssertionError("the scheduler admitted more rows than are free")
        sequence = Sequence(rid, kind, rows, payload.get("max_new_tokens", 0))
        future: Future = Future()
        self.starting[rid] = (sequence, future)
        if self.pieces:
            self.piece_queue.append([rid, self.pieces])
        elif not self.deferred:
            self.finish_start(rid)
        return future

    def run_piece(self) -> bool:
        self.calls.append("piece")
        if self.piece_queue:
            self.piece_queue[0][1] -= 1
            if not self.piece_queue[0][1]:
                self.joinable.append(self.piece_queue.pop(0)[0])
        return bool(self.piece_queue or self.joinable)

    def finish_start(self, rid) -> None:
        """The prefill of `rid` is done: it joins the running rows (or fails, or is dropped if removed)."""
        sequence, future = self.starting.pop(rid)
        if rid in self.removed:
            future.cancel()
            return
        if rid in self.fail_prefill:
            future.set_exception(RuntimeError(f"prefill of {rid} failed"))
            return
        self.sequences[rid] = sequence
        future.set_result(self.advance(sequence))

    def poll(self) -> None:
        self.calls.append("poll")
        for rid in self.joinable:
            self.finish_start(rid)
        self.joinable = []

    def background(self) -> list:
        return []

    def advance(self, sequence: Sequence) -> list[Event]:
        sequence.made += 1
        if sequence.kind == "understand":
            events = [Event(sequence.rid, "token", token=sequence.made)]
            if sequence.made >= sequence.tokens:
                del self.sequences[sequence.rid]
                events.append(Event(sequence.rid, "text_done", finish_reason="length"))
            return events
        events = [Event(sequence.rid, "progress", step=sequence.made)]
        if sequence.made == IMAGE_STEPS:
            del self.sequences[sequence.rid]
            events.append(Event(sequence.rid, "codes_done", codes=f"codes of {sequence.rid}"))
        return events

    def step(self) -> list[Event]:
        self.steps += 1
        self.calls.append(f"step {sorted(self.sequences)}")
        if self.fail_step & set(self.sequences):
            raise RuntimeError("a step failed")
        return [e for s in sorted(self.sequences.values(), key=lambda s: s.rid) for e in self.advance(s)]

    def step_each(self):
        events, failures = [], {}
        for sequence in sorted(self.sequences.values(), key=lambda s: s.rid):
            if sequence.rid in self.fail_step:
                failures[sequence.rid] = RuntimeError(f"{sequence.rid} broke the step")
                del self.sequences[sequence.rid]
            else:
                events += self.advance(sequence)
        return events, failures

    def remove(self, rid) -> None:
        self.removed.append(rid)
        self.sequences.pop(rid, None)

    def decode_images(self, codes) -> Future:
        future: Future = Future()
        self.decodes.append((codes, future))
        if not self.deferred:
            self.finish_decodes()
        return future

    def finish_decodes(self) -> None:
        for codes, future in self.decodes:
            if not future.set_running_or_notify_cancel():  # cancelled before its turn: never decoded
                continue
            rid = codes.removeprefix("codes of ")
            if rid in self.fail_decode:
                future.set_exception(RuntimeError(f"decoding {rid} failed"))
            else:
                future.set_result(([f"image of {rid}"], 0.25))
        self.decodes = []

    def previews(self, rid):
        return [f"preview of {rid}"] if rid in self.sequences else None


class Outbox:
    def __init__(self):
        self.messages = []

    def put(self, message) -> None:
        self.messages.append(message)

    def events(self) -> list[tuple]:
        return [(rid, kind) for m in self.messages if m[0] == "events" for rid, kind, _ in m[1]]

    def data(self, rid: str, kind: str):
        return [d for m in self.messages if m[0] == "events" for r, k, d in m[1] if (r, k) == (rid, kind)]


def understand(rid: str, tokens: int = 2) -> tuple:
    return ("understand", rid, {"max_new_tokens": tokens})


def generate(rid: str, n: int = 1, preview_every: int = 0) -> tuple:
    return ("generate", rid, {"n": n, "preview_every": preview_every})


def scheduler(runtime: FakeRuntime, **options) -> tuple[Scheduler, "queue.Queue", Outbox]:
    inbox, outbox = queue.Queue(), Outbox()
    return Scheduler(runtime, inbox, outbox, **options), inbox, outbox


def turn(s: Scheduler, *messages) -> None:
    """Messages into the inbox, then one turn of the loop."""
    for message in messages:
        s.inbox.put(message)
    if messages:
        assert s.take_messages()
    s.iterate()


def test_admission_is_fifo_within_the_free_rows():
    runtime = FakeRuntime(rows=4)
    s, _, outbox = scheduler(runtime)
    # 2 + 1 rows fit; the next image (2 rows) does not, and the understanding request behind it waits
    # its turn rather than passing it.
    turn(s, generate("g1"), understand("u1", tokens=5), generate("g2"), understand("u2"))
    assert [c for c in runtime.calls if c.startswith("start")] == ["start g1", "start u1"]
    assert [m[1] for m in s.pending] == ["g2", "u2"]
    while "g2" not in runtime.sequences and "g2" not in s.decoding:
        turn(s)
    assert runtime.calls.index("start g2") < runtime.calls.index("start u2")
    while s.running or s.pending or s.decoding:
        turn(s)
    assert runtime.free_rows == 4
    assert {rid for rid, kind in outbox.events() if kind in ("text_done", "images_done")} == {"g1", "g2", "u1", "u2"}


def test_max_running_requests_bounds_admission():
    runtime = FakeRuntime(rows=8)
    s, _, _ = scheduler(runtime, max_running_requests=1)
    turn(s, understand("u1", tokens=3), understand("u2"))
    assert list(s.running) == ["u1"] and [m[1] for m in s.pending] == ["u2"]


def test_requests_join_and_leave_between_steps():
    runtime = FakeRuntime(rows=4)
    s, _, outbox = scheduler(runtime)
    turn(s, understand("a", tokens=3))
    turn(s, understand("b", tokens=2))
    turn(s)
    turn(s)
    steps = [c for c in runtime.calls if c.startswith("step")]
    # a's first token comes from its start; b joins the step after it arrived; each leaves when done.
    assert steps == ["step ['a']", "step ['a', 'b']"]
    assert [d for d in outbox.data("a", "token")] == [1, 2, 3]
    assert [d for d in outbox.data("b", "token")] == [1, 2]
    assert outbox.data("a", "text_done")[0]["finish_reason"] == "length"
    assert not s.running and runtime.free_rows == 4


def test_events_in_order_with_previews_and_timings():
    runtime = FakeRuntime(rows=4)
    s, _, outbox = scheduler(runtime)
    turn(s, generate("g", preview_every=2), understand("u", tokens=2))
    while s.running or s.decoding:
        turn(s)
    assert [k for r, k in outbox.events() if r == "g"] == ["progress", "preview", "progress", "images_done"]
    assert outbox.data("g", "preview") == [{"step": 2, "images": ["preview of g"]}]
    assert [k for r, k in outbox.events() if r == "u"] == ["token", "token", "text_done"]
    done = outbox.data("g", "images_done")[0]
    assert done["images"] == ["image of g"] and done["vq_decode"] == 0.25
    assert done["decode"] > 0 and done["prefill"] >= 0
    # Every message says how many rows are in use.
    assert all(m[2]["rows"] >= 0 and m[2]["steps"] >= 0 for m in outbox.messages)
    assert outbox.messages[-1][2]["rows"] == 0


def test_background_starts_and_decodes_never_hold_up_the_running_rows():
    runtime = FakeRuntime(rows=4, background=True)
    s, _, outbox = scheduler(runtime)
    turn(s, understand("a", tokens=10))
    runtime.finish_start("a")
    turn(s)
    turn(s, understand("b", tokens=1), generate("g"))  # b and g start in the background
    assert set(s.starting) == {"b", "g"} and runtime.steps >= 1
    stepped = runtime.steps
    turn(s)
    turn(s)
    assert runtime.steps == stepped + 2 and set(s.starting) == {"b", "g"}  # a steps on meanwhile
    runtime.finish_start("b")
    runtime.finish_start("g")
    turn(s)
    assert "b" not in s.running and outbox.data("b", "text_done")  # one token: done at its start
    while "g" not in s.decoding:
        turn(s)
    turn(s)
    turn(s)
    assert "g" in s.decoding and not outbox.data("g", "images_done")
    runtime.finish_decodes()
    turn(s)
    assert outbox.data("g", "images_done")[0]["images"] == ["image of g"]


def test_pieces_run_one_per_turn_before_the_step_and_the_loop_waits_on_nothing_while_they_last():
    runtime = FakeRuntime(rows=4, pieces=3)
    s, inbox, outbox = scheduler(runtime)
    turn(s, understand("a", tokens=4))
    turn(s)
    assert "a" in s.starting and s.busy and runtime.steps == 0
    reads = []

    def get(block=True, timeout=None):
        reads.append(block)
        raise queue.Empty

    inbox.get = get
    assert s.take_messages() and reads == [False]  # pieces are left: the inbox is read without waiting
    del inbox.get
    turn(s)  # the last piece; a joins at the poll after it
    assert "a" in s.running and outbox.data("a", "token") == [1]
    turn(s, understand("b", tokens=2))
    # b's first piece runs in the turn it is admitted, before a's step; b's start never holds a up
    assert runtime.calls[-4:] == ["start b", "piece", "step ['a']", "poll"]
    turn(s)
    turn(s)
    assert outbox.data("a", "token") == [1, 2, 3, 4] and "b" in s.running and outbox.data("b", "token") == [1]
    turn(s)
    assert not s.busy and outbox.data("b", "token") == [1, 2]


@pytest.mark.parametrize("phase", ["waiting", "starting", "running", "decoding"])
def test_cancellation_in_every_phase(phase):
    runtime = FakeRuntime(rows=2, background=True)
    s, _, outbox = scheduler(runtime)
    turn(s, understand("first", tokens=50))
    runtime.finish_start("first")
    turn(s, generate("g"))  # waits: "first" holds one of the two rows
    if phase != "waiting":
        turn(s, ("cancel", "first"))
        assert "first" in runtime.removed and "g" in s.starting
    if phase in ("running", "decoding"):
        runtime.finish_start("g")
        turn(s)
        assert "g" in s.running
    if phase == "decoding":
        while "g" not in s.decoding:
            turn(s)
    turn(s, ("cancel", "g"))
    if phase == "waiting":
        assert not s.pending and "start g" not in runtime.calls
        turn(s, ("cancel", "first"))
    if phase == "starting":
        runtime.finish_start("g")  # its prefill ends after the cancel: dropped, rows freed
    runtime.finish_decodes()
    for _ in range(3):
        turn(s)
    assert not s.pending and not s.starting and not s.running and not s.decoding
    # Nothing after the cancel: no images, no error; and every row is free again.
    assert set(k for r, k in outbox.events() if r == "g") <= {"progress"}
    assert len(outbox.data("g", "progress")) < IMAGE_STEPS or phase == "decoding"
    if phase in ("starting", "running"):
        assert "g" in runtime.removed
    assert runtime.free_rows == 2


@pytest.mark.parametrize("phase", ["start", "prefill", "step", "decode"])
def test_a_failure_fails_its_own_request_alone(phase):
    runtime = FakeRuntime(rows=4, background=True)
    getattr(runtime, f"fail_{phase}").add("bad")
    s, _, outbox = scheduler(runtime)
    turn(s, understand("good", tokens=4), generate("bad"))
    for rid in ("good", "bad"):
        if rid in runtime.starting:
            runtime.finish_start(rid)
    for _ in range(IMAGE_STEPS + 2):
        turn(s)
        runtime.finish_decodes()
    turn(s)
    [error] = outbox.data("bad", "error")
    assert "bad" in error
    assert outbox.data("good", "token") == [1, 2, 3, 4] and outbox.data("good", "text_done")
    assert not s.running and not s.decoding and not s.starting


def test_stop_ends_the_loop_and_an_idle_loop_waits_on_its_inbox():
    runtime = FakeRuntime()
    s, inbox, _ = scheduler(runtime)
    inbox.put(("stop",))
    s.run()  # returns
    assert runtime.steps == 0


def test_the_scheduler_runs_without_paddle_or_numpy():
    """The scheduler and this file's tests, in a process where paddle, numpy and openvino cannot be imported."""
    root = Path(__file__).resolve().parents[1]
    script = (
        "import sys\n"
        "for name in ('paddle', 'numpy', 'openvino'):\n"
        "    sys.modules[name] = None\n"
        "import pytest\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--noconftest', {str(Path(__file__))!r}, '-k', "
        "'not without_paddle']))\n"
    )
    environment = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # plugins that import numpy
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                            env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed" in result.stdout and "paddle" not in sys.modules.get("server.engine.scheduler").__dict__

"""The engine client and its worker process, with janus-tiny on CPU."""
import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.engine.client import EngineClient
from server.engine.types import (
    EngineConfig, GenerateRequest, InvalidRequestError, OverloadedError, ProgressEvent, RequestFailedError,
    RequestTimeoutError, TokenEvent, UnderstandRequest, WorkerRestartedError,
)


class LoopThread:
    """An event loop in a thread, so one engine can serve several tests."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def start_engine(loop: LoopThread, home, **overrides) -> EngineClient:
    config = EngineConfig(model="janus-tiny", home=str(home), devices=["cpu"], threads=1, **overrides)

    async def start():
        engine = EngineClient(config)
        await engine.start()
        await engine.wait_ready(timeout=120)
        return engine

    return loop.run(start())


def worker_pids(engine: EngineClient) -> list[int]:
    return [w.process.pid for w in engine._workers if w.process is not None]


def children(pid: int) -> list[int]:
    """The child processes of `pid` (a worker's prefill process)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


def engine_pids(engine: EngineClient) -> list[int]:
    """Every process the engine started: its workers and their prefill processes."""
    pids = worker_pids(engine)
    return pids + [child for pid in pids for child in children(pid)]


def wait_gone(pids, what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while any(pid_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"{what} left a process behind"
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48 + seed, 64, 3), dtype=np.uint8))


def understand_request(picture_id: int, **kw) -> UnderstandRequest:
    return UnderstandRequest(
        messages=[{"role": "user", "content": f"What is in picture {picture_id}?", "images": 1}],
        images=[picture(picture_id)], **{"max_new_tokens": 12, **kw})


@pytest.fixture(scope="module")
def loop():
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def engine(loop, tmp_path_factory):
    # 24 rows of 1024 positions: an image and a question, then up to 384 new tokens.
    engine = start_engine(loop, tmp_path_factory.mktemp("home"), max_batch_rows=24, max_cache_tokens=24 * 1024,
                          max_new_tokens_limit=384)
    yield engine
    pids = engine_pids(engine)
    assert len(pids) == 2  # janus-tiny prefills in a process of its own
    child = Path(f"/proc/{pids[1]}/environ").read_bytes().split(b"\0")
    assert b"KMP_BLOCKTIME=1" in child  # its OpenMP pool does not spin between prefills
    loop.run(engine.stop())
    wait_gone(pids, "engine shutdown", seconds=1)


def mixed_requests():
    """16 requests: 5 text-to-image (6 images, sampled with seeds) and 11 understanding (greedy and sampled)."""
    requests = []
    for i in range(16):
        if i % 3 == 1:
            requests.append(GenerateRequest(prompt=f"a red circle number {i}", n=2 if i == 4 else 1, seed=100 + i,
                                            temperature=1.0, top_k=0 if i % 2 else 20))
        else:
            sampled = {"temperature": 0.8, "top_p": 0.9, "seed": i} if i % 2 else {}
            requests.append(understand_request(i, **sampled))
    return requests


def outcome(result):
    if hasattr(result, "images"):
        return ("images", [img.tobytes() for img in result.images], result.seeds)
    return ("text", result.token_ids, result.finish_reason)


async def run_one(engine, request):
    if isinstance(request, GenerateRequest):
        return await engine.generate_images(request)
    return await engine.understand(request)


def test_concurrent_mixed_requests_equal_one_by_one(loop, engine):
    requests = mixed_requests()

    async def concurrently():
        return await asyncio.gather(*(run_one(engine, r) for r in requests))

    async def one_by_one():
        return [await run_one(engine, r) for r in requests]

    together = loop.run(concurrently())
    alone = loop.run(one_by_one())
    assert [outcome(r) for r in together] == [outcome(r) for r in alone]
    for request, result in zip(requests, together):
        if isinstance(request, GenerateRequest):
            assert len(result.images) == request.n and result.images[0].shape == (384, 384, 3)
            assert result.seeds == [request.seed + i for i in range(request.n)]
            assert result.usage.images == request.n
        else:
            assert result.usage.prompt_tokens > 576 and result.usage.completion_tokens == len(result.token_ids)
            assert result.timings.total >= result.timings.prefill > 0
    assert engine.stats().running_rows == 0


def test_understanding_joins_a_running_generation_batch(loop, engine):
    async def scenario():
        marks = {}

        async def generate():
            async for event in engine.generate_images_stream(GenerateRequest(prompt="a tree", seed=1)):
                if isinstance(event, ProgressEvent) and event.step == 100:
                    marks["step100"] = time.monotonic()
            marks["generate_done"] = time.monotonic()

        async def understand():
            while "step100" not in marks:
                await asyncio.sleep(0.005)
            await engine.understand(understand_request(3, max_new_tokens=4))
            marks["understand_done"] = time.monotonic()

        await asyncio.gather(generate(), understand())
        return marks

    marks = loop.run(scenario())
    assert marks["step100"] < marks["understand_done"] < marks["generate_done"]


def test_streaming_understanding_yields_tokens_then_result(loop, engine):
    async def scenario():
        items = [item async for item in engine.understand_stream(understand_request(7, max_new_tokens=10))]
        return items, await engine.understand(understand_request(7, max_new_tokens=10))

    items, whole = loop.run(scenario())
    *tokens, result = items
    assert all(isinstance(t, TokenEvent) for t in tokens)
    assert "".join(t.text for t in tokens) == result.text == whole.text
    assert result.timings.first_token is not None


def test_stop_string_ends_the_answer(loop, engine):
    full = loop.run(engine.understand(understand_request(2, max_new_tokens=16)))
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = loop.run(engine.understand(understand_request(2, max_new_tokens=16, stop=[stop])))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_cancelled_request_frees_its_rows(loop, engine):
    async def scenario():
        stream = engine.generate_images_stream(GenerateRequest(prompt="a boat", n=3, seed=2))
        async for event in stream:
            if isinstance(event, ProgressEvent) and event.step >= 5:
                break
        during = engine.stats()
        await stream.aclose()
        after = engine.stats().running_rows
        deadline = time.monotonic() + 10
        while engine.stats().worker_rows and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return during, after, engine.stats().worker_rows

    during, after, worker_rows = loop.run(scenario())
    assert during.running_rows == 6 and during.worker_rows == 6
    assert after == 0 and worker_rows == 0


def test_too_long_prompt_is_refused(loop, engine):
    with pytest.raises(InvalidRequestError) as info:
        loop.run(engine.understand(understand_request(1, max_new_tokens=900)))
    assert info.value.param == "messages"


def test_failure_in_the_model_fails_that_request_alone(loop, engine):
    async def scenario():
        good = asyncio.create_task(engine.understand(understand_request(5, max_new_tokens=30)))
        await asyncio.sleep(0.05)
        bad = engine._enqueue("bad-1", "understand", {
            "input_ids": np.array([1, 2, 3], np.int64), "image_mask": np.array([False, True, True]),
            "pixel_values": np.zeros((1, 3, 384, 384), np.float32), "temperature": 0.0, "top_k": 0,
            "top_p": 1.0, "seed": None, "max_new_tokens": 4}, rows=1, timeout=None)
        with pytest.raises(RequestFailedError, match="image positions"):
            await engine._next_event(bad)
        return await good

    assert loop.run(scenario()).finish_reason in ("stop", "length")


def test_full_queue_answers_overloaded_at_once(loop, tmp_path):
    engine = start_engine(loop, tmp_path, max_batch_rows=1, max_queue=2)
    try:
        async def scenario():
            running = [asyncio.create_task(engine.understand(understand_request(i, max_new_tokens=1500)))
                       for i in range(3)]
            # Each request is preprocessed off the loop before it is queued, so wait
            # for all three to be in: one running, two waiting. The requests are long
            # (seconds each) so that the first is still running when the third is queued;
            # at 400 tokens a loaded CI machine once finished two before the check saw it.
            deadline = time.monotonic() + 30
            while not (engine.stats().running_requests == 1 and engine.stats().queue_length == 2):
                assert time.monotonic() < deadline, engine.stats()
                await asyncio.sleep(0.01)
            started = time.monotonic()
            with pytest.raises(OverloadedError) as info:
                await engine.understand(understand_request(9))
            refused_in = time.monotonic() - started
            done = await asyncio.gather(*running)
            return info.value, refused_in, done

        error, refused_in, done = loop.run(scenario())
        assert refused_in < 0.5 and error.retry_after >= 1
        assert all(r.finish_reason in ("stop", "length") for r in done)
    finally:
        loop.run(engine.stop())


def test_killed_worker_fails_running_requests_and_serves_waiting_ones(loop, tmp_path):
    engine = start_engine(loop, tmp_path, max_batch_rows=4, max_queue=8)
    try:
        async def scenario():
            running = [asyncio.create_task(engine.generate_images(GenerateRequest(prompt=f"r{i}", seed=i)))
                       for i in range(2)]
            waiting = [asyncio.create_task(engine.understand(understand_request(i, max_new_tokens=3)))
                       for i in range(3)]
            # Mid-way through the images, with all three understanding requests queued behind them.
            deadline = time.monotonic() + 30
            while not (engine.stats().steps_total >= 20 and engine.stats().queue_length == 3):
                assert time.monotonic() < deadline, engine.stats()
                await asyncio.sleep(0.01)
            old = worker_pids(engine)[0]
            old_children = children(old)
            os.kill(old, signal.SIGKILL)
            failed = await asyncio.gather(*running, return_exceptions=True)
            served = await asyncio.gather(*waiting)
            return old, old_children, failed, served

        old, old_children, failed, served = loop.run(scenario())
        assert len(old_children) == 1
        wait_gone(old_children, "a killed worker")  # its prefill process reads EOF and exits
        assert all(isinstance(f, WorkerRestartedError) for f in failed)
        assert all(r.finish_reason in ("stop", "length") for r in served)
        assert worker_pids(engine)[0] != old and engine.stats().worker_restarts_total == 1
        assert engine.stats().worker_deaths == {"killed_while_loading": 0, "died_while_loading": 0,
                                                "died_while_serving": 1}
    finally:
        pids = engine_pids(engine)
        loop.run(engine.stop())
        wait_gone(pids, "engine shutdown", seconds=1)


API_PROCESS = """
import asyncio, sys
sys.path.insert(0, {root!r})
from server.engine.client import EngineClient
from server.engine.types import EngineConfig

async def main():
    engine = EngineClient(EngineConfig(model="janus-tiny", home={home!r}, devices=["cpu"], threads=1))
    await engine.start()
    await engine.wait_ready(timeout=120)
    print(engine._workers[0].process.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_worker_exits_when_the_api_process_is_killed(tmp_path):
    """An API process killed with SIGKILL cannot stop its worker; the worker notices and exits."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    api = subprocess.Popen([sys.executable, "-c", API_PROCESS.format(root=root, home=str(tmp_path))],
                           stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(api.stdout.readline())
        assert pid_alive(worker)
        prefill = children(worker)
        assert len(prefill) == 1
        api.kill()
        api.wait(timeout=10)
        wait_gone([worker, *prefill], "a killed API process")
    finally:
        api.kill()
        api.wait(timeout=10)
        if worker is not None and pid_alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_worker_ignores_ctrl_c_and_sigterm(loop, engine):
    """SIGINT (a Ctrl-C reaches the whole process group) and SIGTERM leave the worker serving; the API
    process stops it (the engine fixture checks that nothing is left behind)."""
    pid = worker_pids(engine)[0]
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    result = loop.run(engine.understand(understand_request(3, max_new_tokens=4)))
    assert result.finish_reason in ("stop", "length")
    assert worker_pids(engine) == [pid] and engine.stats().worker_restarts_total == 0


def test_prefill_process_serves_what_the_prefill_thread_serves(loop, engine, tmp_path):
    """janus-tiny prefills understanding prompts in a child process writing the shared KV cache ("auto");
    the worker's own prefill thread gives the same tokens, greedy and sampled, with and without an image."""
    requests = [understand_request(i, max_new_tokens=16, temperature=0.9, seed=i) for i in range(3)]
    requests.append(understand_request(7, max_new_tokens=16))
    requests.append(UnderstandRequest(messages=[{"role": "user", "content": "Say something."}], max_new_tokens=16))

    async def run_all(client):
        return await asyncio.gather(*(client.understand(r) for r in requests))

    fast = loop.run(run_all(engine))
    assert engine._workers[0].prefill == "process"
    threaded = start_engine(loop, tmp_path, cpu_prefill="thread")
    try:
        assert threaded._workers[0].prefill == "thread"
        assert children(worker_pids(threaded)[0]) == []
        slow = loop.run(run_all(threaded))
    finally:
        loop.run(threaded.stop())
    assert [outcome(r) for r in fast] == [outcome(r) for r in slow]


def test_killed_prefill_process_restarts_its_worker(loop, tmp_path):
    """A prefill process that dies takes its worker down with it; the client starts both again."""
    engine = start_engine(loop, tmp_path)
    try:
        worker = worker_pids(engine)[0]
        (prefill,) = children(worker)
        os.kill(prefill, signal.SIGKILL)
        deadline = time.monotonic() + 30  # noticed within a second, with no request needed to find out
        while engine.stats().worker_restarts_total == 0:
            assert time.monotonic() < deadline, "the worker did not notice its prefill process died"
            time.sleep(0.05)
        wait_gone([worker], "a dead prefill process")
        loop.run(engine.wait_ready(timeout=120))
        result = loop.run(engine.understand(understand_request(4, max_new_tokens=4)))
        assert result.finish_reason in ("stop", "length")
        assert engine.stats().worker_restarts_total == 1 and len(children(worker_pids(engine)[0])) == 1
    finally:
        pids = engine_pids(engine)
        loop.run(engine.stop())
        wait_gone(pids, "engine shutdown", seconds=1)


def test_prefill_process_only_for_small_cpu_models():
    from types import SimpleNamespace

    from server.engine.worker import PREFILL_PROCESS_MAX_BYTES, WorkerConfig, prefill_in_process

    def model(nbytes):
        return SimpleNamespace(parameters=lambda: [SimpleNamespace(numel=lambda: nbytes // 4, element_size=lambda: 4)])

    def config(choice):
        return WorkerConfig(model_path="", device="cpu", dtype="float32", max_batch_rows=4, max_cache_tokens=64,
                            cpu_prefill=choice)

    assert prefill_in_process(config("auto"), model(PREFILL_PROCESS_MAX_BYTES))
    assert not prefill_in_process(config("auto"), model(2 * PREFILL_PROCESS_MAX_BYTES))
    assert prefill_in_process(config("process"), model(2 * PREFILL_PROCESS_MAX_BYTES))
    assert not prefill_in_process(config("thread"), model(1))


def test_small_models_step_on_one_paddle_thread():
    from types import SimpleNamespace

    import paddle.nn as nn

    from model.loader import load_model

    from server.engine.worker import SMALL_STEP_MAX_WEIGHTS, small_steps

    def model(out_features):
        return SimpleNamespace(language_model=nn.Sequential(nn.Linear(64, 64), nn.Linear(64, out_features)),
                               gen_head=nn.Sequential(nn.Linear(64, 8)), gen_aligner=nn.Sequential())

    assert small_steps(model(SMALL_STEP_MAX_WEIGHTS // 64 - 1))
    assert not small_steps(model(SMALL_STEP_MAX_WEIGHTS // 64))
    assert small_steps(load_model(Path(__file__).parent / "golden" / "janus-tiny"))


def test_request_timeout(loop, tmp_path):
    engine = start_engine(loop, tmp_path, request_timeout=0.5)
    try:
        with pytest.raises(RequestTimeoutError):
            loop.run(engine.generate_images(GenerateRequest(prompt="slow", n=2)))
        assert engine.stats().running_rows == 0
    finally:
        loop.run(engine.stop())


def test_openvino_cpu_engine_serves_what_eager_serves(loop, engine, tmp_path):
    """The opt-in OpenVINO decode path gives the eager engine's greedy text and image tokens."""
    requests = [understand_request(11, max_new_tokens=12), understand_request(12, max_new_tokens=12),
                GenerateRequest(prompt="a green square", seed=3, temperature=0.0)]

    async def run_all(target):
        return await asyncio.gather(*(run_one(target, r) for r in requests))

    eager = loop.run(run_all(engine))
    fast = start_engine(loop, tmp_path, cpu_engine="openvino")
    try:
        assert fast._workers[0].prefill == "inline"  # the OpenVINO engine takes one caller
        assert [outcome(r) for r in loop.run(run_all(fast))] == [outcome(r) for r in eager]
    finally:
        loop.run(fast.stop())


def test_openvino_vq_decoder_matches_eager_vq_decode(loop, engine, tmp_path):
    """The engine's default CPU VQ decoder (OpenVINO, in a thread) gives the eager decoder's images."""
    request = GenerateRequest(prompt="a blue triangle", seed=5, n=2, temperature=1.0)
    fast = loop.run(engine.generate_images(request))
    assert fast.timings.vq_decode > 0 and "VQ decoder" in engine._workers[0].programs
    eager = start_engine(loop, tmp_path, cpu_vq="eager")
    try:
        assert "VQ decoder" not in eager._workers[0].programs
        slow = loop.run(eager.generate_images(request))
    finally:
        loop.run(eager.stop())
    for a, b in zip(fast.images, slow.images):
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.001 * diff.size


def test_openvino_image_encoder_gives_eager_understanding(loop, engine, tmp_path):
    """The engine's default CPU image encoder (OpenVINO) gives the eager encoder's tokens, sampled too."""
    requests = [understand_request(i, max_new_tokens=16, temperature=0.9, seed=i) for i in range(2)]
    requests.append(understand_request(5, max_new_tokens=16))

    async def run_all(client):
        return await asyncio.gather(*(client.understand(r) for r in requests))

    fast = loop.run(run_all(engine))
    assert "image encoder (prefill process)" in engine._workers[0].programs
    eager = start_engine(loop, tmp_path, cpu_vision="eager")
    try:
        assert not [p for p in eager._workers[0].programs if p.startswith("image encoder")]
        slow = loop.run(run_all(eager))
    finally:
        loop.run(eager.stop())
    assert [outcome(r) for r in fast] == [outcome(r) for r in slow]


def test_cpu_programs_are_built_only_where_asked_and_auto_falls_back(monkeypatch, caplog):
    """make_cpu_program: none on GPU or with "eager"; "auto" skips a missing openvino package and falls back
    to eager (with a warning) when the build fails; "openvino" raises instead."""
    import model.cpu_engine as cpu_engine
    from server.engine.worker import make_cpu_program

    def broken():
        raise RuntimeError("no such device")

    built = []

    def build():
        built.append(1)
        return "program"

    assert make_cpu_program("VQ decoder", "gpu:0", "openvino", build) is None
    assert make_cpu_program("VQ decoder", "cpu", "eager", build) is None
    assert built == []
    assert make_cpu_program("VQ decoder", "cpu", "auto", build) == "program"
    assert make_cpu_program("VQ decoder", "cpu", "openvino", build) == "program"
    with caplog.at_level("WARNING", logger="janus.worker"):
        assert make_cpu_program("image encoder", "cpu", "auto", broken) is None
    assert "OpenVINO image encoder unavailable" in caplog.text
    with pytest.raises(RuntimeError, match="no such device"):
        make_cpu_program("image encoder", "cpu", "openvino", broken)
    monkeypatch.setattr(cpu_engine, "openvino_runtime_available", lambda: False)
    assert make_cpu_program("VQ decoder", "cpu", "auto", build) is None and built == [1, 1]


def test_vq_thread_fails_one_request_alone_and_skips_cancelled_ones():
    """Scheduler's VQ thread: a decode error fails its request only; a cancelled request gets no decode;
    while it decodes, the loop's Paddle ops keep off its cores."""
    import queue as queue_module
    import threading

    from server.engine.worker import RunningRequest, Scheduler, WorkerConfig

    class Decoder:
        threads = 2

        def __init__(self):
            self.seen = []
            self.gate = threading.Event()

        def decode(self, codes, *, single_thread=False):
            self.gate.wait(10)
            self.seen.append(int(codes[0, 0]))
            if codes[0, 0] == 1:
                raise ValueError("bad codes")
            return np.zeros((len(codes), 3, 4, 4), np.float32)

    class Batch:  # the scheduler only reads the row count here
        rows = 0

    decoder = Decoder()
    outbox = queue_module.Queue()
    config = WorkerConfig(model_path="", device="cpu", dtype="float32", max_batch_rows=4, max_cache_tokens=64)
    scheduler = Scheduler(None, Batch(), config, queue_module.Queue(), outbox, vq_decoder=decoder)
    for rid, first in (("good", 0), ("bad", 1), ("gone", 2)):
        scheduler.running[rid] = RunningRequest(rid, "generate", 2, time.perf_counter())
        scheduler.finish_images(rid, np.full((1, 576), first, np.int64))
    scheduler.flush()
    scheduler.cancel("gone")
    deadline = time.monotonic() + 10
    while not scheduler.vq_cores and time.monotonic() < deadline:  # the thread is inside decode(), at the gate
        time.sleep(0.01)
    assert scheduler.vq_cores == decoder.threads  # no rows running: all its threads
    scheduler.share_cores()
    assert scheduler.step_threads == max(1, scheduler.cores - decoder.threads)
    decoder.gate.set()
    events = {}
    while len(events) < 2:
        kind, batch_events, _ = outbox.get(timeout=10)
        events.update({rid: (event, data) for rid, event, data in batch_events})
    assert events["good"][0] == "images_done" and events["good"][1]["images"][0].shape == (4, 4, 3)
    assert events["bad"][0] == "error" and "bad codes" in events["bad"][1]
    time.sleep(0.2)
    assert outbox.empty() and decoder.seen == [0, 1]
    assert not scheduler.decoding
    assert scheduler.vq_cores == 0
    scheduler.share_cores()
    assert scheduler.step_threads == scheduler.cores
    capped = Scheduler(None, Batch(), config, queue_module.Queue(), outbox, max_step_threads=1)
    capped.share_cores()
    assert capped.step_threads == 1  # a model too small to split steps on one thread, cores free or not


def test_prefill_thread_joins_rows_and_fails_or_drops_them_alone():
    """Scheduler's prefill thread (CPU): prompts run into reserved rows and join at the next step; a prefill
    error fails its request only; a request cancelled mid-prefill never joins and its row comes back."""
    import queue as queue_module
    import threading

    from model.generation import SlotPool, StepEvent
    from server.engine.worker import Scheduler, WorkerConfig

    class Batch:
        def __init__(self):
            self.pool = SlotPool(4)
            self.gate = threading.Event()
            self.started: dict[str, tuple] = {}

        rows = 0

        def reserve_text(self, length, max_new_tokens):
            return self.pool.take(1)[0]

        def prefill_text(self, slot, input_ids, *, image_mask, pixel_values):
            self.gate.wait(10)
            if input_ids[0] < 0:
                raise ValueError("bad prompt")
            return np.full(5, float(slot))

        def start_text(self, key, slot, length, logits, **_):
            self.started[key] = (slot, length, logits[0])
            return [StepEvent(key, "token", token=slot)]

    def payload(first):
        return {"input_ids": np.array([first, 1, 2]), "image_mask": None, "pixel_values": None, "temperature": 0.0,
                "top_k": 0, "top_p": 1.0, "seed": 1, "max_new_tokens": 4}

    batch = Batch()
    config = WorkerConfig(model_path="", device="cpu", dtype="float32", max_batch_rows=4, max_cache_tokens=64)
    scheduler = Scheduler(None, batch, config, queue_module.Queue(), queue_module.Queue(), prefill_thread=True)
    scheduler.pending.extend([("understand", "good", payload(0)), ("understand", "bad", payload(-1)),
                              ("understand", "gone", payload(0))])
    scheduler.admit()
    assert set(scheduler.prefilling) == {"good", "bad", "gone"} and batch.pool.free == 1 and not scheduler.running
    scheduler.share_cores()  # the loop and the thread share the cores
    assert scheduler.step_threads == max(1, scheduler.cores // 2)
    scheduler.cancel("gone")
    batch.gate.set()
    deadline = time.monotonic() + 10
    while scheduler.prefilling and time.monotonic() < deadline:
        scheduler.join_prefilled(wait=True)
    assert set(scheduler.running) == {"good"} and batch.started == {"good": (0, 3, 0.0)}
    assert scheduler.running["good"].prefill > 0
    assert ("good", "token", 0) in scheduler.events
    assert [e for e in scheduler.events if e[0] == "bad"][0][1] == "error"
    assert "bad prompt" in [e for e in scheduler.events if e[0] == "bad"][0][2]
    assert not [e for e in scheduler.events if e[0] == "gone"]
    assert batch.pool.free == 3  # the failed and the cancelled rows are back; "good" holds slot 0
    scheduler.share_cores()
    assert scheduler.step_threads == scheduler.cores


def test_outbox_sends_in_order_and_drops_messages_once_nobody_reads():
    """The worker's pipe to the API process: messages arrive whole and in order, from several threads; once
    the API process is gone, put() drops them rather than failing the loop (which then exits on its own)."""
    import multiprocessing

    from server.engine.worker import Outbox

    reader, writer = multiprocessing.Pipe(duplex=False)
    outbox = Outbox(writer)
    big = np.arange(300_000, dtype=np.int64)  # more than a pipe buffer holds
    senders = [threading.Thread(target=lambda i=i: [outbox.put((i, n, big)) for n in range(3)]) for i in range(2)]
    for thread in senders:
        thread.start()
    received = [reader.recv() for _ in range(6)]
    for thread in senders:
        thread.join(10)
    for i in range(2):
        assert [m[1] for m in received if m[0] == i] == [0, 1, 2]
    assert all(np.array_equal(m[2], big) for m in received)
    reader.close()
    outbox.put(("after",))  # no BrokenPipeError

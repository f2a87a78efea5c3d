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
    assert len(pids) == 1  # the worker, and no process of its own
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
            os.kill(old, signal.SIGKILL)
            failed = await asyncio.gather(*running, return_exceptions=True)
            served = await asyncio.gather(*waiting)
            return old, failed, served

        old, failed, served = loop.run(scenario())
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
        api.kill()
        api.wait(timeout=10)
        wait_gone([worker], "a killed API process")
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


def test_request_timeout(loop, tmp_path):
    engine = start_engine(loop, tmp_path, request_timeout=0.5)
    try:
        with pytest.raises(RequestTimeoutError):
            loop.run(engine.generate_images(GenerateRequest(prompt="slow", n=2)))
        assert engine.stats().running_rows == 0
    finally:
        loop.run(engine.stop())


def test_openvino_decoder_serves_what_eager_serves(loop, engine, tmp_path):
    """The default CPU decoder (OpenVINO programs, exact) gives the eager Paddle layers' greedy text and image
    tokens."""
    requests = [understand_request(11, max_new_tokens=12), understand_request(12, max_new_tokens=12),
                GenerateRequest(prompt="a green square", seed=3, temperature=0.0)]

    async def run_all(target):
        return await asyncio.gather(*(run_one(target, r) for r in requests))

    fast = loop.run(run_all(engine))
    # the decoder's programs take one caller: prompts are prefilled between the steps
    assert "decoder" in engine._workers[0].programs and engine._workers[0].prefill == "pieces"
    eager = start_engine(loop, tmp_path, cpu_engine="eager")
    try:
        assert "decoder" not in eager._workers[0].programs and eager._workers[0].prefill == "thread"
        assert [outcome(r) for r in loop.run(run_all(eager))] == [outcome(r) for r in fast]
    finally:
        loop.run(eager.stop())


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
    assert "image encoder" in engine._workers[0].programs
    eager = start_engine(loop, tmp_path, cpu_vision="eager")
    try:
        assert not [p for p in eager._workers[0].programs if p.startswith("image encoder")]
        slow = loop.run(run_all(eager))
    finally:
        loop.run(eager.stop())
    assert [outcome(r) for r in fast] == [outcome(r) for r in slow]


def test_cpu_programs_are_built_only_where_asked_and_auto_falls_back(monkeypatch, caplog):
    """make_cpu_program: none with "eager"; "auto" skips a missing openvino package and falls back
    to eager (with a warning) when the build fails; "openvino" raises instead."""
    import model.cpu_engine as cpu_engine
    from model.runtime.cpu import make_cpu_program

    def broken():
        raise RuntimeError("no such device")

    built = []

    def build():
        built.append(1)
        return "program"

    assert make_cpu_program("VQ decoder", "eager", build) is None
    assert built == []
    assert make_cpu_program("VQ decoder", "auto", build) == "program"
    assert make_cpu_program("VQ decoder", "openvino", build) == "program"
    with caplog.at_level("WARNING", logger="janus.worker"):
        assert make_cpu_program("image encoder", "auto", broken) is None
    assert "OpenVINO image encoder unavailable" in caplog.text
    with pytest.raises(RuntimeError, match="no such device"):
        make_cpu_program("image encoder", "openvino", broken)
    monkeypatch.setattr(cpu_engine, "openvino_runtime_available", lambda: False)
    assert make_cpu_program("VQ decoder", "auto", build) is None and built == [1, 1]


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


def test_a_second_start_imports_the_programs_the_first_saved(loop, tmp_path):
    """The first worker builds the CPU runtime's programs (decoder, image encoder, VQ decoder, heads) and saves them
    under <home>/programs with the preview palette; the next one, with the same checkpoint and settings, imports
    them without reading their weights, and answers the same: text, images and previews."""

    async def draw(engine):
        previews, result = [], None
        async for event in engine.generate_images_stream(GenerateRequest(prompt="a tree", seed=1, preview_every=200)):
            if isinstance(event, ProgressEvent):
                previews += [] if event.previews is None else [event.previews.tobytes()]
            else:
                result = event
        return previews, outcome(result)

    answers, how, imported = [], [], []
    for _ in range(2):
        engine = start_engine(loop, tmp_path)
        try:
            how.append(engine.runtimes[0]["decoder_programs"])
            imported.append(engine.runtimes[0]["imported"])
            answers.append((loop.run(engine.understand(understand_request(5))).token_ids, loop.run(draw(engine))))
        finally:
            loop.run(engine.stop())
    assert how == ["built", "imported"] and answers[0] == answers[1] and len(answers[0][1][0]) == 2
    assert imported == [[], ["decoder", "image encoder", "VQ decoder", "heads"]]
    entries = list((tmp_path / "programs").iterdir())
    assert len(entries) == 4 and sum((entry / "palette.npy").is_file() for entry in entries) == 1  # one per program
    # "off": neither imported nor saved
    engine = start_engine(loop, tmp_path / "other", program_cache="off")
    try:
        assert engine.runtimes[0]["decoder_programs"] == "built" and not (tmp_path / "other" / "programs").exists()
    finally:
        loop.run(engine.stop())


@pytest.mark.parametrize("device, before, after, asked", [
    ("0", None, "0", "0"), ("3", None, "3", "0"), ("1", "2,3", "3", "0"), ("auto", "5,6", "5", "auto"),
    ("auto", None, "0", "auto"), ("cpu", "0,1", "", "cpu"),
])
def test_each_worker_sees_only_its_own_gpu(device, before, after, asked):
    from server.engine.worker import see_one_gpu

    environ = {} if before is None else {"CUDA_VISIBLE_DEVICES": before}
    assert see_one_gpu(device, environ) == asked
    assert environ["CUDA_VISIBLE_DEVICES"] == after


def test_a_gpu_beyond_the_visible_ones_is_refused():
    from server.engine.worker import see_one_gpu

    with pytest.raises(RuntimeError, match="shows 2 GPU"):
        see_one_gpu("2", {"CUDA_VISIBLE_DEVICES": "4,5"})

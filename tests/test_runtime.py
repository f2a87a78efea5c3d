"""The runtimes (model/runtime/) under the scheduler, against the official implementation's outputs."""
import concurrent.futures
import queue
import time
from pathlib import Path

import numpy as np
import pytest

from model.loader import load_model
from model.runtime.eager import EagerRuntime
from model.runtime.gpu import GpuRuntime
from server.engine.scheduler import Scheduler

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"


class Outbox:
    def __init__(self):
        self.events = []

    def put(self, message):
        if message[0] == "events":
            self.events += message[1]

    def of(self, rid, kind):
        return [data for r, k, data in self.events if (r, k) == (rid, kind)]


def run_all(runtime, messages, rounds: int = 2000) -> Outbox:
    """The scheduler over `runtime` until every request has its last event."""
    inbox, outbox = queue.Queue(), Outbox()
    scheduler = Scheduler(runtime, inbox, outbox)
    for message in messages:
        inbox.put(message)
    ends = {"text_done", "images_done", "error"}
    for _ in range(rounds):
        scheduler.take_messages()
        scheduler.iterate()
        if len({r for r, k, _ in outbox.events if k in ends}) == len(messages):
            return outbox
    raise AssertionError("requests did not finish")


def understand_message(arrays, rid, case, **sampling):
    payload = {"input_ids": arrays[f"understanding.{case}.input_ids"][0],
               "image_mask": arrays[f"understanding.{case}.images_seq_mask"][0],
               "pixel_values": arrays[f"understanding.{case}.pixel_values"][0],
               "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, "max_new_tokens": 24, **sampling}
    return ("understand", rid, payload)


def generate_message(arrays, rid, seeds, **sampling):
    payload = {"prompt_ids": arrays["generation.input_ids"][0].astype(np.int64), "n": len(seeds), "cfg_weight": 5.0,
               "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seeds": seeds, "preview_every": 0, **sampling}
    return ("generate", rid, payload)


def opened(runtime_class, model, cases, slots, **options):
    """A runtime for the golden set's special tokens, with `slots` cache rows of 1400 positions."""
    ids = cases["special_token_ids"]
    runtime = runtime_class(model, eos_id=ids["eos_token_id"], pad_id=ids["pad_id (processor.pad_id, '<｜▁pad▁｜>')"],
                            **options)
    runtime.open_cache(slots, 1400)
    return runtime


def eager(model, cases, slots=8, previews=False):
    return opened(EagerRuntime, model, cases, slots, previews=previews)


@pytest.mark.parametrize("runtime_class", [EagerRuntime, GpuRuntime])
def test_eager_runtime_gives_the_reference_text_and_images_batched(model, golden, runtime_class):
    """The eager runtime, and the GPU runtime's static step (run here on CPU, unfused)."""
    arrays, cases = golden
    runtime = opened(runtime_class, model, cases, 8, previews=False)
    assert runtime.describe().get("step", "static") == "static"
    outbox = run_all(runtime, [understand_message(arrays, "u1", "conv1"), understand_message(arrays, "u2", "conv2"),
                               generate_message(arrays, "g", [0, 1])])
    for rid, case in (("u1", "conv1"), ("u2", "conv2")):
        assert outbox.of(rid, "token") == arrays[f"understanding.{case}.generated_ids"][0].tolist()
    [done] = outbox.of("g", "images_done")
    images = np.stack(done["images"])
    diff = np.abs(images.astype(np.int16) - arrays["generation.images_uint8"].astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.001
    assert runtime.free_rows == 8 and runtime.rows_in_use == 0


def test_a_seed_gives_the_same_image_alone_or_batched(model, golden):
    arrays, cases = golden
    sampled = {"temperature": 1.0, "top_k": 40, "top_p": 0.9}
    alone = run_all(eager(model, cases), [generate_message(arrays, "a", [1234], **sampled)])
    mixed = run_all(eager(model, cases), [generate_message(arrays, "other", [99, 100], **sampled),
                                          understand_message(arrays, "t", "conv1", temperature=0.7, seed=5),
                                          generate_message(arrays, "a", [1234], **sampled)])
    np.testing.assert_array_equal(alone.of("a", "images_done")[0]["images"], mixed.of("a", "images_done")[0]["images"])


def test_eager_runtime_previews_and_failures(model, golden):
    arrays, cases = golden
    runtime = eager(model, cases, previews=True)
    broken = understand_message(arrays, "bad", "conv1")
    broken[2]["image_mask"] = np.zeros_like(broken[2]["image_mask"])  # no place for the image's features
    outbox = run_all(runtime, [generate_message(arrays, "g", [3], preview_every=100), broken])
    previews = outbox.of("g", "preview")
    assert [p["step"] for p in previews] == [100, 200, 300, 400, 500]
    assert previews[0]["images"].shape == (1, 24, 24, 3) and previews[0]["images"].dtype == np.uint8
    [error] = outbox.of("bad", "error")
    assert "image positions" in error
    assert outbox.of("g", "images_done") and runtime.free_rows == 8


def cpu(model, cases, slots=8, cpu_engine="eager"):
    """The CPU runtime; with its default OpenVINO decoder it frees the eager layers of `model`."""
    from model.runtime.cpu import CpuRuntime

    return opened(CpuRuntime, model, cases, slots, previews=False, cpu_engine=cpu_engine)


@pytest.mark.parametrize("engine", ["openvino", "stored", "eager"])
def test_cpu_runtime_gives_the_reference_text_and_images_batched(model, golden, engine, tmp_path):
    """By default the OpenVINO decoder, prompts prefilled in the loop; with a program store (what the worker
    has by default) also the heads as programs; with eager layers, prompts prefilled by the prefill thread.
    All with the OpenVINO image encoder, images decoded by the VQ thread: the golden tokens and pixels."""
    from model.runtime.cpu import CpuRuntime, program_stores

    arrays, cases = golden
    if engine == "openvino":
        runtime = cpu(load_model(GOLDEN), cases, cpu_engine="auto")  # its own model: the decoder frees its layers
        assert runtime.describe()["programs"] == ["decoder", "image encoder", "VQ decoder"]
        assert runtime.describe()["prefill"] == "pieces" and runtime.describe()["precision"] == "exact"
    elif engine == "stored":
        stores = program_stores(str(GOLDEN), str(tmp_path), cpu_engine="auto", cpu_precision="exact",
                                cpu_vision="auto", cpu_vq="auto")
        runtime = opened(CpuRuntime, load_model(GOLDEN), cases, 8, previews=False, program_stores=stores)
        assert runtime.describe()["programs"] == ["decoder", "image encoder", "VQ decoder", "heads"]
    else:
        runtime = cpu(model, cases)
        assert runtime.describe()["programs"] == ["image encoder", "VQ decoder"]
        assert runtime.describe()["prefill"] == "thread" and runtime.describe()["precision"] == "float32"
    outbox = run_all(runtime, [understand_message(arrays, "u1", "conv1"), generate_message(arrays, "g", [0, 1]),
                               understand_message(arrays, "u2", "conv2")])
    for rid, case in (("u1", "conv1"), ("u2", "conv2")):
        assert outbox.of(rid, "token") == arrays[f"understanding.{case}.generated_ids"][0].tolist()
    images = np.stack(outbox.of("g", "images_done")[0]["images"])
    diff = np.abs(images.astype(np.int16) - arrays["generation.images_uint8"].astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.001
    assert runtime.free_rows == 8


def test_cpu_runtime_cache_takes_memory_only_as_it_is_written(model, golden):
    """A large cache opens at once and holds no memory until rows are written; then it serves as before."""
    from server.engine.memory import resident_bytes

    arrays, cases = golden
    runtime = cpu(model, cases)
    per_row = runtime.batch.cache.nbytes // 8
    rows = -(-(512 << 20) // per_row)
    before = resident_bytes()
    runtime.open_cache(rows, 1400)
    cache = runtime.batch.cache
    assert cache.nbytes >= 512 << 20 and resident_bytes() - before < cache.nbytes // 8
    assert not any(np.from_dlpack(t).any() for t in cache.k + cache.v)  # zeros, read without taking memory
    outbox = run_all(runtime, [understand_message(arrays, "u1", "conv1")])
    assert outbox.of("u1", "token") == arrays["understanding.conv1.generated_ids"][0].tolist()
    assert resident_bytes() - before < cache.nbytes // 4


def test_cpu_prefill_thread_joins_rows_and_fails_or_drops_them_alone(model, golden, monkeypatch):
    """A prompt joins at the poll after its prefill; a prefill error fails its request only; a request
    removed mid-prefill never joins and its row comes back; steps meanwhile take half the cores."""
    import threading

    arrays, cases = golden
    runtime = cpu(model, cases, slots=4)
    gate, prefill = threading.Event(), runtime.batch.prefill_text

    def gated(slot, input_ids, **inputs):
        gate.wait(10)
        return prefill(slot, input_ids, **inputs)

    monkeypatch.setattr(runtime.batch, "prefill_text", gated)
    broken = understand_message(arrays, "bad", "conv1")[2]
    broken["image_mask"] = np.zeros_like(broken["image_mask"])
    futures = {rid: runtime.start("understand", rid, payload) for rid, payload in
               (("good", understand_message(arrays, "good", "conv1")[2]), ("bad", broken),
                ("gone", understand_message(arrays, "gone", "conv2")[2]))}
    assert runtime.free_rows == 1 and not runtime.batch.sequences and not any(f.done() for f in futures.values())
    waits = runtime.background()  # what an idle loop waits on: done as the thread finishes, before poll()
    assert len(waits) == 3 and not any(w.done() for w in waits)
    runtime.share_cores()
    assert runtime.step_threads == max(1, runtime.cores // 2)
    runtime.remove("gone")
    gate.set()
    concurrent.futures.wait(waits, timeout=30)
    assert all(w.done() for w in waits)
    deadline = time.monotonic() + 30
    while runtime.prefills and time.monotonic() < deadline:
        runtime.poll()
        time.sleep(0.01)
    assert futures["good"].result()[0].token == arrays["understanding.conv1.generated_ids"][0][0]
    assert "image positions" in str(futures["bad"].exception())
    assert futures["gone"].cancelled()
    assert list(runtime.batch.sequences) == ["good"] and runtime.free_rows == 3 and runtime.background() == []
    runtime.share_cores()
    assert runtime.step_threads == runtime.cores


def test_cpu_vq_thread_fails_one_request_alone_and_skips_cancelled_ones(model, golden):
    """A decode error fails its future only; one cancelled before its turn is never decoded."""
    import threading

    arrays, cases = golden
    runtime = cpu(model, cases, slots=2)

    class Decoder:
        threads = 2

        def __init__(self):
            self.seen, self.gate = [], threading.Event()

        def decode(self, codes, *, single_thread=False):
            self.gate.wait(10)
            self.seen.append(int(codes[0, 0]))
            if codes[0, 0] == 1:
                raise ValueError("bad codes")
            return np.zeros((len(codes), 3, 4, 4), np.float32)

    decoder = runtime.vq_decoder = Decoder()
    futures = [runtime.decode_images(np.full((1, 576), first, np.int64)) for first in (0, 1, 2)]
    assert futures[2].cancel()
    decoder.gate.set()
    images, seconds = futures[0].result(timeout=10)
    assert images[0].shape == (4, 4, 3) and images.dtype == np.uint8 and seconds > 0
    with pytest.raises(ValueError, match="bad codes"):
        futures[1].result(timeout=10)
    time.sleep(0.2)
    assert decoder.seen == [0, 1]


def small_pieces(model, cases, slots=8):
    """The GPU runtime (run here on CPU) with pieces small enough for janus-tiny to be cut up."""
    return opened(GpuRuntime, model, cases, slots, previews=False, prefill_chunk=64, vision_blocks=1, vq_batch=2)


def test_gpu_runtime_prefills_in_pieces_while_the_running_rows_step(model, golden):
    """A prompt admitted beside a running one: each turn runs one piece of it and steps the running row, so
    that the running row makes a token for each of its pieces; both give the reference's tokens."""
    arrays, cases = golden
    runtime = small_pieces(model, cases)
    inbox, outbox = queue.Queue(), Outbox()
    scheduler = Scheduler(runtime, inbox, outbox)

    def turn():
        scheduler.take_messages()
        scheduler.iterate()

    inbox.put(understand_message(arrays, "u1", "conv1"))
    while not outbox.of("u1", "token"):
        turn()
    before = len(outbox.of("u1", "token"))
    inbox.put(understand_message(arrays, "u2", "conv2"))
    while not outbox.of("u2", "token"):
        turn()
    prompt = len(arrays["understanding.conv2.input_ids"][0])
    pieces = len(model.vision_model.blocks) + -(-prompt // 64)
    assert len(outbox.of("u1", "token")) - before == pieces
    while len(outbox.of("u2", "text_done")) + len(outbox.of("u1", "text_done")) < 2:
        turn()
    for rid, case in (("u1", "conv1"), ("u2", "conv2")):
        assert outbox.of(rid, "token") == arrays[f"understanding.{case}.generated_ids"][0].tolist()
    assert runtime.free_rows == 8 and not scheduler.busy


def test_a_prompt_alone_is_one_piece_and_one_beside_running_rows_is_cut(model, golden):
    """With a prefill_chunk, prompts that arrive when no rows run (a burst, or one alone) are prefilled whole
    (pieces cost time); one that arrives while rows run, in chunks of that many tokens, one per turn. All give
    the reference's first token."""
    arrays, cases = golden
    runtime = opened(EagerRuntime, model, cases, 4, previews=False, prefill_chunk=128)
    assert runtime.describe()["prefill"] == "pieces"

    def pieces_until_joined(rid, case):
        future = runtime.start("understand", rid, understand_message(arrays, rid, case)[2])
        pieces = 0
        while not future.done():
            assert runtime.run_piece()
            pieces += 1
            runtime.poll()
        assert future.result()[0].token == arrays[f"understanding.{case}.generated_ids"][0][0]
        return pieces

    together = [runtime.start("understand", rid, understand_message(arrays, rid, case)[2])
                for rid, case in (("first", "conv1"), ("second", "conv2"))]  # a burst: no answer under way yet
    assert runtime.run_piece() and runtime.run_piece() and not runtime.starts  # one piece each
    runtime.poll()
    assert all(future.done() for future in together)
    runtime.remove("first"), runtime.remove("second")
    assert pieces_until_joined("alone", "conv1") == 1
    prompt = len(arrays["understanding.conv2.input_ids"][0])
    assert pieces_until_joined("beside", "conv2") == 1 + -(-prompt // 128)  # the image encoder, then the chunks
    assert not runtime.run_piece() and runtime.free_rows == 2


def test_gpu_runtime_decodes_waiting_images_together_in_pieces(model, golden):
    """Images of requests waiting for the VQ decoder are decoded as one batch (up to vq_batch images), a piece
    per call, and each request gets its own: the reference's. A request alone runs through the scheduler."""
    arrays, cases = golden
    runtime = small_pieces(model, cases)
    batches = []
    decode = runtime.model.decode_image_pieces

    def counted(codes):
        batches.append(len(codes))
        return decode(codes)

    runtime.model.decode_image_pieces = counted
    try:
        codes = arrays["generation.image_tokens"].astype(np.int64)
        futures = [runtime.decode_images(codes[i:i + 1]) for i in (1, 0, 1)]
        pieces = 1
        while runtime.run_piece():
            pieces += 1
        outbox = run_all(runtime, [generate_message(arrays, "g", [0, 1])])
    finally:
        del runtime.model.decode_image_pieces
    assert batches == [2, 1, 2]  # vq_batch 2: the third waits for the next batch
    assert pieces > 2 * 2
    for future, index in zip(futures, (1, 0, 1)):
        images, seconds = future.result()
        assert_reference_images(images, arrays["generation.images_uint8"][index:index + 1])
    [done] = outbox.of("g", "images_done")
    assert_reference_images(np.stack(done["images"]), arrays["generation.images_uint8"])


def assert_reference_images(images, reference):
    """uint8 images as the reference's: off by one in at most 0.1% of the values (float32 rounding)."""
    assert images.shape == reference.shape
    diff = np.abs(images.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.001


def test_gpu_runtime_pieces_fail_and_are_cancelled_alone(model, golden):
    """A prefill that fails in a piece, one cancelled mid-prefill, and a batched VQ decode that fails: each
    request fails (or goes) alone, its rows come back, and the others finish."""
    arrays, cases = golden
    runtime = small_pieces(model, cases)
    broken = understand_message(arrays, "bad", "conv1")
    broken[2]["image_mask"] = np.zeros_like(broken[2]["image_mask"])  # no place for the image's features
    good = runtime.start("understand", "good", understand_message(arrays, "good", "conv2")[2])
    bad = runtime.start("understand", "bad", broken[2])
    gone = runtime.start("understand", "gone", understand_message(arrays, "gone", "conv1")[2])
    assert runtime.free_rows == 5
    runtime.run_piece()
    runtime.remove("gone")
    while runtime.run_piece():
        runtime.poll()
    assert gone.cancelled() and "image positions" in str(bad.exception())
    assert good.result()[0].token == arrays["understanding.conv2.generated_ids"][0][0]
    assert list(runtime.batch.sequences) == ["good"] and runtime.free_rows == 7
    runtime.remove("good")

    decode = runtime.model.decode_image_pieces

    def fails_together(codes):
        if len(codes) > 1:
            raise RuntimeError("out of memory")
        return decode(codes)

    runtime.model.decode_image_pieces = fails_together
    try:
        codes = arrays["generation.image_tokens"][:1].astype(np.int64)
        futures = [runtime.decode_images(codes) for _ in range(3)]
        assert futures[2].cancel()
        while runtime.run_piece():
            pass
    finally:
        del runtime.model.decode_image_pieces
    for future in futures[:2]:
        assert_reference_images(future.result()[0], arrays["generation.images_uint8"][:1])
    assert runtime.free_rows == 8


@pytest.mark.parametrize("runtime_class", [EagerRuntime, GpuRuntime])
def test_a_request_that_fails_as_it_joins_leaves_no_row_behind(model, golden, monkeypatch, runtime_class):
    """Its rows come back and the batch does not step it, whether it failed before or after taking its place."""
    arrays, cases = golden
    runtime = opened(runtime_class, model, cases, 4, previews=False)

    def broken(sequences, logits):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(runtime.batch, "_accept_text", broken)
    future = runtime.start("understand", "u", understand_message(arrays, "u", "conv1")[2])
    while runtime.run_piece():
        runtime.poll()
    assert "sampling failed" in str(future.exception())
    assert runtime.free_rows == 4 and not runtime.batch.sequences

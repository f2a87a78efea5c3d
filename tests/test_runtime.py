"""The runtimes (model/runtime/) under the scheduler, against the official implementation's outputs."""
import json
import queue
from pathlib import Path

import numpy as np
import pytest

from model.loader import load_model
from model.runtime.eager import EagerRuntime
from server.engine.scheduler import Scheduler

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "cases.npz"), json.loads((GOLDEN / "cases.json").read_text())


@pytest.fixture(scope="module")
def model():
    return load_model(GOLDEN)


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


def eager(model, cases, slots=8, previews=False):
    ids = cases["special_token_ids"]
    return EagerRuntime(model, slots=slots, row_length=1400, eos_id=ids["eos_token_id"],
                        pad_id=ids["pad_id (processor.pad_id, '<｜▁pad▁｜>')"], previews=previews)


def test_eager_runtime_gives_the_reference_text_and_images_batched(model, golden):
    arrays, cases = golden
    runtime = eager(model, cases)
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

"""A worker that cannot start: a cache that does not fit fails fast with its numbers, and a worker that
dies while loading is started again a few times only, then /ready says why. Real servers, janus-tiny."""
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import server_settings

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "processor_config.json", "preprocessor_config.json")


def metric_values(http, name: str) -> dict[tuple, float]:
    values = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                values[tuple(sorted(sample.labels.values()))] = sample.value
    return values


def wait_for_ready_error(http, code: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        ready = http.get("/ready")
        assert ready.status_code == 503, ready.text
        error = ready.json()["error"]
        if error["code"] == code:
            return error
        assert time.monotonic() < deadline, error
        time.sleep(0.1)


def test_a_cache_that_cannot_fit_fails_fast_with_its_numbers(server, server_loop, janus_home, caplog):
    """janus-tiny needs 2 rows x 896 positions (an image and a question, then up to 256 new tokens) of 1 KiB:
    1.8 MB, more than a millionth of the free memory. The worker says so once and is not started again."""
    caplog.set_level(logging.ERROR, logger="janus.engine")
    live = server_loop.start(server_settings(janus_home, memory_fraction=1e-6))
    with live.client() as http:
        error = wait_for_ready_error(http, "model_load_failed")
        message = error["message"]
        assert message.startswith("The model failed to load: the KV cache needs at least 0.0 GB (2 rows x 896 "
                                  "positions: one image, or an understanding request with an image and up to 256 "
                                  "new tokens)"), message
        assert "--memory-fraction 1e-06 gives the cache 0.0 GB; lower --max-new-tokens-limit" in message
        answer = http.post("/understand", json={"question": "Hi"})
        assert answer.status_code == 503 and "the KV cache needs at least" in answer.json()["error"]["message"]
        time.sleep(1.5)  # nothing is started again
        assert not live.engine._workers[0].alive
        assert metric_values(http, "janus_worker_restarts_total") == {(): 0}
        assert sum(metric_values(http, "janus_worker_deaths_total").values()) == 0
    logged = [r for r in caplog.records if "the KV cache needs at least" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR


@pytest.fixture
def blocking_checkpoint(tmp_path, janus_home) -> Path:
    """janus-tiny's folder whose model.safetensors is a FIFO nobody writes: a worker loading it waits in
    open() until it is killed, as a worker would be killed by the OOM killer while loading."""
    source = janus_home / "janus-tiny"
    folder = tmp_path / "janus-tiny"
    folder.mkdir()
    for name in MODEL_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    os.mkfifo(folder / "model.safetensors")
    return folder


def next_worker_pid(engine, other_than: int | None, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        process = engine._workers[0].process if engine._workers else None
        if process is not None and process.pid != other_than and process.is_alive():
            return process.pid
        assert time.monotonic() < deadline, "no new worker process"
        time.sleep(0.02)


def test_a_worker_killed_while_loading_is_given_up_after_three_tries(server, server_loop, janus_home,
                                                                     blocking_checkpoint):
    live = server_loop.start(server_settings(janus_home, model=str(blocking_checkpoint)))
    engine = live.engine
    pids, started = [], []
    with live.client() as http:
        pid = None
        for attempt in range(3):
            pid = next_worker_pid(engine, pid)
            started.append(time.monotonic())
            pids.append(pid)
            time.sleep(0.3)  # sampled as it loads
            os.kill(pid, signal.SIGKILL)
            if attempt < 2:
                error = wait_for_ready_error(http, "not_ready")
                deadline = time.monotonic() + 10
                while f"starting it again in {2 ** attempt} s" not in error["message"]:
                    assert time.monotonic() < deadline, error
                    error = http.get("/ready").json()["error"]
                assert ("worker 0 was killed while loading (SIGKILL), most likely out of memory (it had reached "
                        in error["message"]), error
        error = wait_for_ready_error(http, "model_load_failed")
        assert "killed while loading (SIGKILL), most likely out of memory (it had reached 0." in error["message"]
        assert "3 times in a row; it is not started again" in error["message"]
        # The delays grow: 1 s, then 2 s.
        assert started[1] - started[0] >= 1.0 and started[2] - started[1] >= 2.0
        time.sleep(2.5)
        assert engine._workers[0].process.pid == pids[-1] and not engine._workers[0].alive
        assert metric_values(http, "janus_worker_restarts_total") == {(): 2}
        deaths = metric_values(http, "janus_worker_deaths_total")
        assert deaths[("killed_while_loading",)] == 3 and deaths[("died_while_serving",)] == 0
        answer = http.post("/understand", json={"question": "Hi"})
        assert answer.status_code == 503

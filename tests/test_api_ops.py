"""Health, readiness, metrics, the OpenAPI document, the access log, settings and the CLI."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL_ID, data_url, png_bytes, sse_payloads
from server.cli import build_parser, serve_settings
from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def metric_samples(text: str) -> dict[str, list]:
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_health_and_ready_need_no_api_key(server):
    with server.client(api_key=None) as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert (body["status"], body["model"]) == ("ready", MODEL_ID)
    # The worker's KV cache, sized from the memory free after loading: janus-tiny's rows are as long as its
    # context (4096), each position a key and a value of 2 layers x 64 float32 values.
    [cache] = body["kv_cache"]
    assert (cache["worker"], cache["device"], cache["row_length"], cache["bytes_per_position"]) == (0, "cpu", 4096, 1024)
    assert cache["rows"] == 32 and cache["images_at_once"] == 16 and cache["understanding_at_once"] == 32
    assert cache["bytes"] == cache["rows"] * cache["row_length"] * cache["bytes_per_position"]
    assert cache["positions"] == cache["rows"] * cache["row_length"]
    assert cache["free_bytes"] > cache["bytes"] and cache["loaded_bytes"] >= cache["weights_bytes"] > 0
    # How the worker runs: the CPU runtime, its OpenVINO decoder in the default precision, and how long it took.
    [worker] = body["workers"]
    assert (worker["worker"], worker["device"], worker["runtime"], worker["precision"]) == (0, "cpu", "cpu", "exact")
    assert "decoder" in worker["programs"] and worker["prefill"] == "pieces"
    assert worker["decoder_programs"] in ("built", "imported")  # imported when an earlier server saved them
    startup = dict(worker["startup_s"])
    parts = startup.pop("programs_s")
    assert set(startup) == {"load_s", "runtime_s", "cache_s"} and all(seconds >= 0 for seconds in startup.values())
    assert set(parts) == set(worker["programs"]) and sum(parts.values()) <= startup["runtime_s"] + 0.2


def test_metrics_count_requests_and_read_engine_stats(server, client):
    understood = client.post("/understand", json={"image": data_url(png_bytes()), "question": "Hi",
                                                  "max_new_tokens": 4})
    assert understood.status_code == 200
    client.get("/v1/does-not-exist")
    with server.client(api_key=None) as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in samples["janus_requests_total"]}
    assert requests[("/understand", "200")] >= 1
    assert requests[("unmatched", "404")] >= 1
    assert any(s.labels["route"] == "/understand" for s in samples["janus_request_duration_seconds_count"])
    assert samples["janus_time_to_first_token_seconds_count"][0].value >= 1
    assert samples["janus_time_per_output_token_seconds_count"][0].value >= 1
    assert samples["janus_workers_alive"][0].value == 1
    assert samples["janus_workers_total"][0].value == 1
    assert samples["janus_tokens_generated_total"][0].value >= 1
    assert "janus_queue_length" in samples and "janus_running_rows" in samples
    assert "janus_images_generated_total" in samples and "janus_running_requests" in samples
    assert samples["janus_decode_steps_total"][0].value >= 1
    [cache_bytes] = samples["janus_kv_cache_bytes"]
    assert cache_bytes.labels == {"worker": "0", "device": "cpu"} and cache_bytes.value == 32 * 4096 * 1024
    assert [(s.value) for s in samples["janus_kv_cache_rows"]] == [32]
    assert [(s.value) for s in samples["janus_kv_cache_row_positions"]] == [4096]
    assert [(s.value) for s in samples["janus_kv_cache_images_at_once"]] == [16]
    assert samples["janus_memory_free_bytes"][0].value > cache_bytes.value
    assert samples["janus_worker_restarts_total"][0].value == 0


def test_openapi_documents_the_body_types_and_the_defaults(server):
    with server.client(api_key=None) as http:
        schema = http.get("/openapi.json").json()
    understand = schema["paths"]["/understand"]["post"]["requestBody"]["content"]
    assert set(understand) == {"application/json", "multipart/form-data", "application/x-www-form-urlencoded"}
    # a URL-encoded form has the JSON body's fields (images as base64 text), no files
    form = understand["application/x-www-form-urlencoded"]["schema"]["properties"]
    assert form == understand["application/json"]["schema"]["properties"]
    properties = understand["application/json"]["schema"]["properties"]
    # the default 512 is lowered to the test server's limit of 256, which the document states
    assert properties["max_new_tokens"]["default"] == 256 and properties["max_new_tokens"]["maximum"] == 256
    assert properties["temperature"]["default"] == 0.0
    assert understand["multipart/form-data"]["schema"]["properties"]["image"]["items"]["format"] == "binary"
    generate = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert generate["properties"]["n"]["default"] == 1 and generate["properties"]["n"]["maximum"] == 16
    assert generate["properties"]["cfg_weight"]["default"] == 5.0
    assert "/v1/chat/completions" in schema["paths"] and "/v1/images/generations" in schema["paths"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_one_access_log_line_per_request_with_usage(client):
    records = Records()
    access = logging.getLogger("janus.access")
    access.addHandler(records)
    access.setLevel(logging.INFO)
    try:
        client.post("/understand", json={"question": "Hi", "max_new_tokens": 2}, headers={"X-Request-Id": "log-1"})
        client.get("/health", headers={"X-Request-Id": "log-2"})
        # the line is written once the response is sent, so it may come a moment after the client has it
        deadline = time.monotonic() + 5
        while len(records.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        access.removeHandler(records)
    by_id = {record.fields["request_id"]: record.fields for record in records.records}
    understood = by_id["log-1"]
    assert understood["method"] == "POST" and understood["path"] == "/understand"
    assert understood["status"] == 200 and understood["duration_s"] > 0
    assert understood["usage"]["completion_tokens"] >= 1
    assert by_id["log-2"]["status"] == 200
    from server.logging import JsonFormatter

    line = json.loads(JsonFormatter().format(records.records[0]))
    assert line["logger"] == "janus.access" and line["request_id"] == "log-1"


def test_cors_allows_only_the_configured_origins(buggy_server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with buggy_server.client(api_key=None) as http:
        allowed = http.options("/v1/chat/completions", headers={"Origin": "http://allowed.example", **preflight})
        other = http.options("/v1/chat/completions", headers={"Origin": "http://other.example", **preflight})
        simple = http.get("/health", headers={"Origin": "http://allowed.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "access-control-allow-origin" not in other.headers
    assert simple.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("JANUS_MAX_QUEUE", "5")
    monkeypatch.setenv("JANUS_PORT", "9001")
    monkeypatch.setenv("JANUS_DEVICES", "0,1")
    args = build_parser().parse_args(
        ["serve", "--max-queue", "7", "--api-key", "k", "--no-log-json", "--cors-origins", "http://a,http://b"]
    )
    settings = serve_settings(args)
    assert settings.max_queue == 7
    assert settings.port == 9001
    assert settings.devices == ["0", "1"]
    assert settings.api_key.get_secret_value() == "k"
    assert settings.log_json is False
    assert settings.cors_origins == ["http://a", "http://b"]
    config = settings.engine_config()
    assert (config.max_queue, config.devices) == (7, ["0", "1"])


def test_settings_defaults(monkeypatch):
    for name in [name for name in os.environ if name.startswith("JANUS_")]:
        monkeypatch.delenv(name)
    settings = Settings()
    assert (settings.model, settings.host, settings.port) == ("deepseek-ai/Janus-1.3B", "127.0.0.1", 8000)
    assert settings.devices == ["auto"] and settings.api_key is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def session_processes_gone(session: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run(["pgrep", "-a", "-s", str(session)], capture_output=True, text=True).stdout
        if not listed.strip():
            return True
        time.sleep(0.2)
    print("still running:", listed)
    return False


def test_serve_command_drains_on_sigterm(janus_home, server):
    """`janus-server serve` comes up, answers, and on SIGTERM shuts down cleanly, workers included."""
    port = free_port()
    env = {**os.environ, "JANUS_LOG_JSON": "false", "JANUS_HOME": str(janus_home)}
    command = [sys.executable, "-m", "server.cli", "serve", "--model", MODEL_ID, "--devices", "cpu",
               "--port", str(port), "--threads", "1", "--timeout-graceful-shutdown", "20"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        ready = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert ready is not None and ready.status_code == 200, "the server did not become ready"
        answer = httpx.post(f"http://127.0.0.1:{port}/understand", timeout=60,
                            json={"question": "Hi", "max_new_tokens": 2})
        assert answer.status_code == 200, answer.text[:500]
        # SIGTERM while a request runs: it is finished, then the server exits
        body = {"question": "Tell a long story.", "max_new_tokens": 200, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/understand", json=body, timeout=60) as running:
            lines = running.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            process.send_signal(signal.SIGTERM)
            events = [json.loads(payload) for payload in sse_payloads([first, *lines])]
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert running.status_code == 200
    assert events[-1]["finish_reason"] in ("length", "stop") and events[-1]["usage"]["completion_tokens"] > 1, events[-1]
    # a drain that finished in time is a clean exit (uvicorn alone would re-raise the SIGTERM: -15)
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    assert b"Application shutdown complete" in output
    assert session_processes_gone(process.pid, timeout=10), "processes of the server outlived it"


@pytest.mark.parametrize("argv", [["serve", "--port", "70000"], ["serve", "--dtype", "int3"]])
def test_bad_flags_exit_with_a_message(argv):
    result = subprocess.run([sys.executable, "-m", "server.cli", *argv], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "janus-server" in result.stderr and "Traceback" not in result.stderr


def test_ready_says_why_the_model_failed_to_load(server_loop, tmp_path):
    """A folder that is not a Janus checkpoint: /ready and the model routes say so, the process stays up."""
    from tests.conftest import server_settings

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    live = server_loop.start(server_settings(tmp_path, model=str(tmp_path)))
    with live.client() as http:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = http.get("/ready")
            if ready.json()["error"]["code"] == "model_load_failed":
                break
            time.sleep(0.1)
        assert ready.status_code == 503 and "not a Janus config" in ready.json()["error"]["message"]
        answer = http.post("/understand", json={"question": "Hi"})
        assert answer.status_code == 503 and "failed to load" in answer.json()["error"]["message"]
        assert http.get("/health").status_code == 200

"""model/hub.py against a local HTTP server that can cut, lie and forget Range."""
import json
import logging
import random
import socket
import sys
import threading
import types
from pathlib import Path

import pytest

from fileserver import FileServer
from model.hub import (
    KNOWN_MODELS, DownloadError, DownloadPolicy, HubError, ModelNotFoundError, download_model, model_folder,
    resolve_model,
)

JANUS = "deepseek-ai/Janus-1.3B"
PRO_7B = "deepseek-ai/Janus-Pro-7B"
FAST = DownloadPolicy(retries=3, backoff=0.01, max_backoff=0.05, connect_timeout=2, read_timeout=5, lock_poll=0.01)
WEIGHTS_BYTES = 3 << 20


def small_json(**fields) -> bytes:
    return json.dumps(fields).encode()


def paddlenlp_files() -> dict[str, bytes]:
    return {
        "config.json": small_json(model_type="multi_modality", release="paddlenlp"),
        "tokenizer.json": small_json(version="1.0", model={"type": "BPE"}),
        "tokenizer_config.json": small_json(add_bos_token=True),
        "special_tokens_map.json": small_json(bos_token="<｜begin▁of▁sentence｜>"),
        "image_preprocessor_config.json": small_json(image_size=384),
        "model_state.pdparams": random.Random(1).randbytes(WEIGHTS_BYTES),
    }


def hf_files() -> dict[str, bytes]:
    return {
        "config.json": small_json(model_type="multi_modality", release="hf"),
        "tokenizer.json": small_json(version="1.0", model={"type": "BPE"}),
        "tokenizer_config.json": small_json(add_bos_token=True),
        "special_tokens_map.json": small_json(bos_token="<｜begin▁of▁sentence｜>"),
        "preprocessor_config.json": small_json(image_size=384),
        "processor_config.json": small_json(num_image_tokens=576),
        "model.safetensors": random.Random(2).randbytes(WEIGHTS_BYTES),
    }


PADDLENLP_CHECKPOINT = paddlenlp_files()
HF_CHECKPOINT = hf_files()


def paddle_path(name: str, model_id: str = JANUS) -> str:
    return f"/paddle/{model_id}/{name}"


def hf_path(name: str, model_id: str = JANUS) -> str:
    return f"/hf/{model_id}/resolve/main/{name}"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for variable in (
        "JANUS_HOME", "JANUS_OFFLINE", "HF_HUB_OFFLINE", "JANUS_MODEL_SOURCE", "JANUS_HF_ENDPOINT", "HF_ENDPOINT",
        "JANUS_PADDLENLP_ENDPOINT", "HF_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
        "http_proxy", "https_proxy", "all_proxy",
    ):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def server():
    files = {paddle_path(n): data for n, data in PADDLENLP_CHECKPOINT.items()}
    files |= {hf_path(n): data for n, data in HF_CHECKPOINT.items()}
    with FileServer(files) as running:
        yield running


def endpoints_of(server: FileServer) -> dict[str, str]:
    return {"paddlenlp": server.url("/paddle"), "hf": server.url("/hf")}


def resolve(server: FileServer, home: Path, name: str = JANUS, **options) -> Path:
    return resolve_model(name, home, endpoints=endpoints_of(server), policy=FAST, progress=False, **options)


def assert_checkpoint(folder: Path, expected: dict[str, bytes]) -> None:
    for name, data in expected.items():
        assert (folder / name).read_bytes() == data, name
    manifest = json.loads((folder / ".complete").read_text())
    assert manifest["files"] == {name: len(data) for name, data in expected.items()}
    assert not list(folder.rglob("*.part"))
    assert not (folder / ".incomplete").exists()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_full_download_from_paddlenlp(server, tmp_path):
    folder = resolve(server, tmp_path)

    assert folder == tmp_path / "deepseek-ai--Janus-1.3B" == model_folder(JANUS, tmp_path)
    assert_checkpoint(folder, PADDLENLP_CHECKPOINT)
    assert json.loads((folder / ".complete").read_text())["source"] == "paddlenlp"
    assert sorted(r.path for r in server.gets()) == sorted(paddle_path(n) for n in PADDLENLP_CHECKPOINT)


def test_broken_transfer_resumes_with_range_in_the_same_call(server, tmp_path):
    weights = paddle_path("model_state.pdparams")
    server.break_after[weights] = 1_000_000

    folder = resolve(server, tmp_path)

    assert_checkpoint(folder, PADDLENLP_CHECKPOINT)
    first, second = server.gets(weights)
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=1000000-"


def test_partial_file_of_an_earlier_run_is_resumed(server, tmp_path):
    staging = model_folder(JANUS, tmp_path) / ".incomplete" / "paddlenlp"
    staging.mkdir(parents=True)
    (staging / "model_state.pdparams.part").write_bytes(PADDLENLP_CHECKPOINT["model_state.pdparams"][:123_456])

    folder = resolve(server, tmp_path)

    assert_checkpoint(folder, PADDLENLP_CHECKPOINT)
    (request,) = server.gets(paddle_path("model_state.pdparams"))
    assert request.headers["Range"] == "bytes=123456-"


def test_complete_part_answered_416_is_kept(server, tmp_path):
    server.head_supported = False  # no size known in advance: only the 416 says the part is whole
    staging = model_folder(JANUS, tmp_path) / ".incomplete" / "paddlenlp"
    staging.mkdir(parents=True)
    (staging / "model_state.pdparams.part").write_bytes(PADDLENLP_CHECKPOINT["model_state.pdparams"])

    folder = resolve(server, tmp_path)

    assert_checkpoint(folder, PADDLENLP_CHECKPOINT)
    (request,) = server.gets(paddle_path("model_state.pdparams"))
    assert request.headers["Range"] == f"bytes={WEIGHTS_BYTES}-"


def test_ignored_range_restarts_from_zero(server, tmp_path):
    weights = paddle_path("model_state.pdparams")
    server.break_after[weights] = 1_000_000
    server.ignore_range.add(weights)

    folder = resolve(server, tmp_path)

    assert_checkpoint(folder, PADDLENLP_CHECKPOINT)
    first, second = server.gets(weights)
    assert second.headers["Range"] == "bytes=1000000-"


def test_size_mismatch_is_detected_and_never_marked_complete(server, tmp_path):
    server.announced_size[paddle_path("model_state.pdparams")] = WEIGHTS_BYTES + 4096

    with pytest.raises(DownloadError, match=r"size mismatch for model_state\.pdparams") as error:
        resolve(server, tmp_path, source="paddlenlp")

    assert str(WEIGHTS_BYTES) in str(error.value) and str(WEIGHTS_BYTES + 4096) in str(error.value)
    folder = model_folder(JANUS, tmp_path)
    assert not (folder / ".complete").exists()
    assert not (folder / "model_state.pdparams").exists()
    assert not list(folder.rglob("model_state.pdparams*"))
    with pytest.raises(ModelNotFoundError):
        resolve(server, tmp_path, offline=True)


def test_body_of_another_size_than_head_said_is_a_mismatch(server, tmp_path):
    server.head_size[paddle_path("model_state.pdparams")] = WEIGHTS_BYTES - 10

    with pytest.raises(DownloadError, match="size mismatch"):
        resolve(server, tmp_path, source="paddlenlp")
    assert not (model_folder(JANUS, tmp_path) / ".complete").exists()


def test_missing_file_error_names_file_and_url(server, tmp_path):
    del server.files[paddle_path("model_state.pdparams")]

    with pytest.raises(DownloadError) as error:
        resolve(server, tmp_path, source="paddlenlp")

    message = str(error.value)
    assert "model_state.pdparams not found (HTTP 404)" in message
    assert server.url(paddle_path("model_state.pdparams")) in message
    assert not server.gets(), "nothing is downloaded from a source that lacks a file"


@pytest.mark.parametrize("switch", ["argument", "JANUS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_without_cache_explains_what_is_missing(server, tmp_path, monkeypatch, switch):
    if switch != "argument":
        monkeypatch.setenv(switch, "1")

    with pytest.raises(ModelNotFoundError) as error:
        resolve(server, tmp_path, offline=switch == "argument")

    message = str(error.value)
    folder = model_folder(JANUS, tmp_path)
    for expected in (JANUS, str(folder), "offline", "model_state.pdparams", "model.safetensors", "tokenizer.json",
                     "--model /path/to/folder", "--model janus-tiny", "copy the checkpoint files"):
        assert expected in message
    assert not server.requests


def cache_without(home: Path, checkpoint: dict[str, bytes], left_out: str) -> Path:
    """The model's cache folder holding every file of `checkpoint` but `left_out`."""
    folder = model_folder(JANUS, home)
    folder.mkdir(parents=True)
    for name, data in checkpoint.items():
        if name != left_out:
            (folder / name).write_bytes(data)
    return folder


def test_offline_names_only_the_files_still_missing(server, tmp_path):
    cache_without(tmp_path, HF_CHECKPOINT, "model.safetensors")

    with pytest.raises(ModelNotFoundError) as error:
        resolve(server, tmp_path, offline=True)

    assert "; or model.safetensors (or model.safetensors.index.json and its shards, or pytorch_model.bin) " \
        "(Hugging Face files)." in str(error.value)


def test_sharded_paddlenlp_weights_make_a_complete_cache(server, tmp_path):
    folder = cache_without(tmp_path, PADDLENLP_CHECKPOINT, "model_state.pdparams")
    shards = ["model_state-00001-of-00002.pdparams", "model_state-00002-of-00002.pdparams"]
    (folder / "model_state.pdparams.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}))
    (folder / shards[0]).write_bytes(b"shard")

    with pytest.raises(ModelNotFoundError) as error:
        resolve(server, tmp_path, offline=True)
    assert f"Missing in {folder}: {shards[1]} (PaddleNLP files)" in str(error.value)

    (folder / shards[1]).write_bytes(b"shard")
    assert resolve(server, tmp_path, offline=True) == folder
    assert not server.requests


def test_complete_cache_touches_no_network(server, tmp_path):
    resolve(server, tmp_path)
    server.requests.clear()

    dead = closed_port_url()
    again = resolve_model(JANUS, tmp_path, endpoints={"paddlenlp": dead, "hf": dead}, policy=FAST)

    assert again == model_folder(JANUS, tmp_path)
    assert not server.requests


def test_deleted_file_makes_the_cache_incomplete_again(server, tmp_path):
    folder = resolve(server, tmp_path)
    (folder / "tokenizer.json").unlink()

    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        resolve(server, tmp_path, offline=True)
    assert_checkpoint(resolve(server, tmp_path), PADDLENLP_CHECKPOINT)


def test_files_copied_by_hand_are_used_offline(tmp_path):
    folder = model_folder(JANUS, tmp_path)
    folder.mkdir(parents=True)
    for name, data in HF_CHECKPOINT.items():
        (folder / name).write_bytes(data)

    assert resolve_model(JANUS, tmp_path, offline=True) == folder


def test_local_folder_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")

    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(tmp_path, offline=True) == tmp_path


def test_local_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")

    with pytest.raises(ModelNotFoundError, match=r"config\.json is missing.*model\.safetensors"):
        resolve_model(str(tmp_path))


def test_missing_local_path_is_reported_as_a_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such checkpoint folder"):
        resolve_model(str(tmp_path / "nowhere"))


def test_unknown_id_lists_known_ids(tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model("deepseek-ai/Janus-Pro-3B", tmp_path)

    message = str(error.value)
    assert all(model_id in message for model_id in KNOWN_MODELS)
    assert "janus-tiny" in message and "local checkpoint folder" in message


def test_janus_tiny_is_built_by_model_tiny(tmp_path, monkeypatch):
    built = tmp_path / "janus-tiny"
    calls = []
    fake_tiny = types.ModuleType("model.tiny")
    fake_tiny.ensure_janus_tiny = lambda home: calls.append(home) or built
    monkeypatch.setitem(sys.modules, "model.tiny", fake_tiny)

    assert resolve_model("janus-tiny", tmp_path) == built
    assert calls == [tmp_path]


def test_concurrent_callers_share_one_download(server, tmp_path, caplog):
    server.chunk_delay = 0.002  # long enough for the second caller to find the first one mid-transfer
    start = threading.Barrier(2)
    results, errors = [], []

    def call():
        start.wait()
        try:
            results.append(resolve(server, tmp_path))
        except Exception as exc:
            errors.append(exc)

    caplog.set_level(logging.INFO, logger="model.hub")
    callers = [threading.Thread(target=call) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=20)

    assert not errors
    assert "waiting for it" in caplog.text, "the callers did not overlap"
    assert results == [model_folder(JANUS, tmp_path)] * 2
    assert_checkpoint(results[0], PADDLENLP_CHECKPOINT)
    for name in PADDLENLP_CHECKPOINT:
        assert len(server.gets(paddle_path(name))) == 1, name


def test_lock_file_left_by_a_dead_process_does_not_block(server, tmp_path):
    folder = model_folder(JANUS, tmp_path)
    folder.mkdir(parents=True)
    (folder / ".download.lock").write_text("99999999\n")

    assert_checkpoint(resolve(server, tmp_path), PADDLENLP_CHECKPOINT)


def test_falls_back_to_hf_when_paddlenlp_lacks_a_file(server, tmp_path):
    del server.files[paddle_path("model_state.pdparams")]

    folder = resolve(server, tmp_path)

    assert_checkpoint(folder, HF_CHECKPOINT)
    assert json.loads((folder / ".complete").read_text())["source"] == "hf"
    assert not (folder / "model_state.pdparams").exists()
    assert all(r.path.startswith("/hf/") for r in server.gets())


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_source_choice(server, tmp_path, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("JANUS_MODEL_SOURCE", "hf")

    folder = resolve(server, tmp_path, source="hf" if how == "argument" else None)

    assert_checkpoint(folder, HF_CHECKPOINT)
    assert not any(r.path.startswith("/paddle/") for r in server.requests)


def test_source_that_does_not_publish_the_model_is_refused(tmp_path):
    with pytest.raises(HubError, match="available from: hf"):
        resolve_model(PRO_7B, tmp_path, source="paddlenlp")


def test_endpoints_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JANUS_PADDLENLP_ENDPOINT", server.url("/paddle"))

    folder = resolve_model(JANUS, tmp_path, policy=FAST, progress=False)

    assert_checkpoint(folder, PADDLENLP_CHECKPOINT)


@pytest.mark.parametrize("linked_size", [False, True], ids=["plain-redirects", "hf-linked-size"])
def test_hf_sharded_weights_behind_redirects(tmp_path, monkeypatch, linked_size):
    shards = {f"model-0000{i}-of-00002.safetensors": random.Random(i).randbytes(300_000) for i in (1, 2)}
    index = json.dumps({"metadata": {}, "weight_map": {"a.weight": next(iter(shards)), "b.weight": list(shards)[1]}})
    expected = {n: d for n, d in HF_CHECKPOINT.items() if n != "model.safetensors"}
    expected |= shards | {"model.safetensors.index.json": index.encode()}
    files = {f"/cdn/{n}": data for n, data in expected.items()}
    redirects = {hf_path(n, PRO_7B): f"/cdn/{n}" for n in expected}
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    monkeypatch.setenv("JANUS_HF_ENDPOINT", "http://unused.invalid")

    with FileServer(files, redirects=redirects, linked_size=linked_size) as server:
        folder = resolve_model(PRO_7B, tmp_path, endpoints={"hf": server.url("/hf")}, policy=FAST, progress=False)

    assert folder == tmp_path / "deepseek-ai--Janus-Pro-7B"
    assert_checkpoint(folder, expected)
    tried_first = [r for r in server.requests if r.path == hf_path("model.safetensors", PRO_7B)]
    assert tried_first and all(r.method == "HEAD" for r in tried_first)
    hf_requests = [r for r in server.requests if r.path.startswith("/hf/")]
    assert all(r.headers.get("Authorization") == "Bearer secret-token" for r in hf_requests)
    cdn_heads = [r for r in server.requests if r.method == "HEAD" and r.path.startswith("/cdn/")]
    assert bool(cdn_heads) != linked_size, "with X-Linked-Size the signed CDN URL is only ever fetched"


def test_hf_token_is_not_sent_to_paddlenlp(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")

    resolve(server, tmp_path)

    assert server.requests and not any("Authorization" in r.headers for r in server.requests)


def test_unreachable_network_explains_how_to_serve_offline(tmp_path):
    dead = closed_port_url()

    with pytest.raises(DownloadError) as error:
        resolve_model(JANUS, tmp_path, endpoints={"paddlenlp": dead, "hf": dead}, policy=FAST, progress=False)

    message = str(error.value)
    for expected in (JANUS, str(model_folder(JANUS, tmp_path)), "cannot reach", "PaddleNLP", "Hugging Face",
                     "model_state.pdparams", "--model janus-tiny"):
        assert expected in message


def test_download_model_is_resolve_for_the_cli(server, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="model.hub"):
        folder = download_model(
            JANUS, tmp_path, "paddlenlp", endpoints=endpoints_of(server), policy=FAST, progress=False
        )

    assert_checkpoint(folder, PADDLENLP_CHECKPOINT)
    assert "is ready in" in caplog.text


def test_progress_bar_goes_to_stderr(server, tmp_path, capsys):
    resolve_model(JANUS, tmp_path, endpoints=endpoints_of(server), policy=FAST, progress=True)

    captured = capsys.readouterr()
    assert "model_state.pdparams" in captured.err and not captured.out

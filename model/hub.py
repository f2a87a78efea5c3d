"""Checkpoint folders: a local folder, the built-in janus-tiny, or a known model id
downloaded once into the cache.

Environment:
  JANUS_HOME                cache root (default $XDG_CACHE_HOME/janus-server or ~/.cache/janus-server)
  JANUS_OFFLINE, HF_HUB_OFFLINE
                            "1" never touches the network
  JANUS_MODEL_SOURCE        "paddlenlp", "hf" or an order such as "hf,paddlenlp"
  JANUS_PADDLENLP_ENDPOINT  base URL replacing https://paddlenlp.bj.bcebos.com/models/community
  JANUS_HF_ENDPOINT, HF_ENDPOINT
                            base URL replacing https://huggingface.co
  HF_TOKEN                  bearer token, sent to the Hugging Face endpoint only

A cached model lives in <home>/<org>--<name>/. It counts as complete when its
`.complete` manifest (written last) lists files that are all present with their
recorded sizes, or when it holds a full file set copied there by hand. Downloads are
staged in <folder>/.incomplete/<source>/ and moved in only once every file of one
source is there, so a folder never mixes two releases.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import httpx
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no flock, so a second concurrent download there is not prevented
    fcntl = None

log = logging.getLogger(__name__)


class HubError(Exception):
    """A checkpoint folder could not be provided."""


class ModelNotFoundError(HubError):
    """The name is no checkpoint folder or known model, or the model is not cached and may not be downloaded."""


class DownloadError(HubError):
    """A download was attempted and failed."""


JANUS_TINY = "janus-tiny"
PADDLENLP = "paddlenlp"
HUGGINGFACE = "hf"

# Known ids and the sources that publish them, in default order.
KNOWN_MODELS: dict[str, tuple[str, ...]] = {
    "deepseek-ai/Janus-1.3B": (PADDLENLP, HUGGINGFACE),
    "deepseek-ai/Janus-Pro-1B": (HUGGINGFACE,),
    "deepseek-ai/Janus-Pro-7B": (HUGGINGFACE,),
}

SOURCE_TITLES = {PADDLENLP: "PaddleNLP", HUGGINGFACE: "Hugging Face"}
SOURCE_ALIASES = {"paddlenlp": PADDLENLP, "paddle": PADDLENLP, "hf": HUGGINGFACE, "huggingface": HUGGINGFACE}
DEFAULT_ENDPOINTS = {
    PADDLENLP: "https://paddlenlp.bj.bcebos.com/models/community",
    HUGGINGFACE: "https://huggingface.co",
}
ENDPOINT_VARIABLES = {
    PADDLENLP: ("JANUS_PADDLENLP_ENDPOINT",),
    HUGGINGFACE: ("JANUS_HF_ENDPOINT", "HF_ENDPOINT"),
}

# Small files first: a source that lacks the model fails before the weights start.
PADDLENLP_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "image_preprocessor_config.json", "model_state.pdparams",
)
# A local PaddleNLP folder may hold its weights as shards instead (save_pretrained of a large model).
PADDLENLP_WEIGHTS_INDEX = "model_state.pdparams.index.json"
HF_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "preprocessor_config.json", "processor_config.json",
)
# Weight layouts a Hugging Face repo may use, preferred first (safetensors loads without torch).
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HF_WEIGHTS_DESCRIPTION = "model.safetensors (or model.safetensors.index.json and its shards, or pytorch_model.bin)"

MANIFEST = ".complete"
LOCK = ".download.lock"
STAGING = ".incomplete"
PART_SUFFIX = ".part"
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class DownloadPolicy:
    retries: int = 5              # consecutive failed attempts without progress before giving up
    backoff: float = 1.0          # seconds before the first retry, doubled each time
    max_backoff: float = 30.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0    # longest silence tolerated mid-transfer
    lock_poll: float = 0.5        # seconds between checks while another process downloads


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    size: int | None  # from HEAD; None when the server does not say


class _RetryableError(Exception):
    """A failed attempt worth repeating (server busy, transfer restarted)."""


def resolve_model(
    name_or_path: str | os.PathLike,
    home: str | os.PathLike | None = None,
    *,
    offline: bool = False,
    source: str | None = None,
    progress: bool = True,
    endpoints: Mapping[str, str] | None = None,
    policy: DownloadPolicy | None = None,
) -> Path:
    """Return a local checkpoint folder for a folder path, 'janus-tiny' or a known model id.

    A known id is downloaded on first use unless offline (argument, JANUS_OFFLINE or
    HF_HUB_OFFLINE); `endpoints` maps 'paddlenlp'/'hf' to base URLs and wins over the
    environment.
    """
    name = os.fspath(name_or_path)
    if name == JANUS_TINY:
        from model.tiny import ensure_janus_tiny  # imported here: building janus-tiny needs paddle

        return ensure_janus_tiny(default_home(home))
    local = Path(name).expanduser()
    if local.exists():
        return _checkpoint_folder(local)
    model_id = _known_model_id(name)
    folder = model_folder(model_id, home)
    if is_complete(folder, model_id):
        return folder
    offline_reason = _offline_reason(offline)
    if offline_reason:
        raise ModelNotFoundError(
            f"{model_id} is not in the local cache and {offline_reason}.\n"
            f"{_missing_report(folder, model_id)}\n{_offline_advice(folder)}"
        )
    sources = _source_order(model_id, source)
    return _download(model_id, folder, sources, endpoints or {}, policy or DownloadPolicy(), progress)


def download_model(
    name: str,
    home: str | os.PathLike | None = None,
    source: str | None = None,
    *,
    progress: bool = True,
    endpoints: Mapping[str, str] | None = None,
    policy: DownloadPolicy | None = None,
) -> Path:
    """`janus-server download`: make the model available locally and return its folder."""
    folder = resolve_model(name, home, source=source, progress=progress, endpoints=endpoints, policy=policy)
    log.info("%s is ready in %s", name, folder)
    return folder


def default_home(home: str | os.PathLike | None = None) -> Path:
    if home is not None:
        return Path(home).expanduser()
    if os.environ.get("JANUS_HOME"):
        return Path(os.environ["JANUS_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache, "janus-server").expanduser()


def model_folder(model_id: str, home: str | os.PathLike | None = None) -> Path:
    return default_home(home) / model_id.replace("/", "--")


def is_complete(folder: Path, model_id: str) -> bool:
    """True when the folder holds a whole checkpoint of the model, downloaded or copied."""
    return _manifest_matches(folder) or any(not missing_files(folder, s) for s in KNOWN_MODELS[model_id])


def missing_files(folder: Path, source: str) -> list[str]:
    """Files of the given source's layout that are not in the folder."""
    if source == PADDLENLP:
        index = folder / PADDLENLP_WEIGHTS_INDEX
        if not index.is_file():
            return [n for n in PADDLENLP_FILES if not (folder / n).is_file()]
        missing = [n for n in PADDLENLP_FILES if n != "model_state.pdparams" and not (folder / n).is_file()]
        return missing + _missing_shards(folder, index)
    missing = [n for n in HF_FILES if not (folder / n).is_file()]
    for weights in HF_WEIGHTS:
        if not (folder / weights).is_file():
            continue
        if not weights.endswith(".index.json"):
            return missing
        return missing + _missing_shards(folder, folder / weights)
    return missing + [HF_WEIGHTS_DESCRIPTION]


def _missing_shards(folder: Path, index: Path) -> list[str]:
    """The shard files `index` lists that are not in the folder (or the index itself, if unreadable)."""
    try:
        shards = _shard_names(index.read_text())
    except (OSError, ValueError) as exc:
        return [f"{index.name} (unreadable: {exc})"]
    return [s for s in shards if not (folder / s).is_file()]


def _checkpoint_folder(path: Path) -> Path:
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a file; --model takes a checkpoint folder (with config.json), a known id or 'janus-tiny'"
        )
    if not (path / "config.json").is_file():
        present = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise ModelNotFoundError(f"{path} is not a checkpoint folder: config.json is missing (it holds: {present})")
    return path


def _known_model_id(name: str) -> str:
    by_lower = {model_id.lower(): model_id for model_id in KNOWN_MODELS}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    known = ", ".join(KNOWN_MODELS)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelNotFoundError(f"no such checkpoint folder: {name} (known model ids: {known}, or 'janus-tiny')")
    raise ModelNotFoundError(
        f"unknown model {name!r}: known ids are {known} and {JANUS_TINY!r}; "
        "a local checkpoint folder (with config.json) works too"
    )


def _source_order(model_id: str, requested: str | None) -> tuple[str, ...]:
    available = KNOWN_MODELS[model_id]
    requested = requested or os.environ.get("JANUS_MODEL_SOURCE") or ""
    if requested.strip().lower() in ("", "auto"):
        return available
    order = []
    for word in requested.split(","):
        word = word.strip().lower()
        if word not in SOURCE_ALIASES:
            raise HubError(f"unknown model source {word!r}: use 'paddlenlp', 'hf' or an order such as 'hf,paddlenlp'")
        order.append(SOURCE_ALIASES[word])
    usable = tuple(s for s in dict.fromkeys(order) if s in available)
    if not usable:
        raise HubError(f"{model_id} is not published on {requested}; it is available from: {', '.join(available)}")
    return usable


def _offline_reason(offline: bool) -> str | None:
    if offline:
        return "offline mode is on"
    for variable in ("JANUS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"offline mode is on ({variable}={os.environ[variable]})"
    return None


def _missing_report(folder: Path, model_id: str) -> str:
    if not folder.is_dir():
        layouts = [f"{SOURCE_TITLES[s]} files: {', '.join(_layout_names(s))}" for s in KNOWN_MODELS[model_id]]
        return f"{folder} does not exist; a checkpoint there needs the " + "; or the ".join(layouts) + "."
    layouts = [f"{', '.join(missing_files(folder, s))} ({SOURCE_TITLES[s]} files)" for s in KNOWN_MODELS[model_id]]
    return f"Missing in {folder}: " + "; or ".join(layouts) + "."


def _layout_names(source: str) -> tuple[str, ...]:
    return PADDLENLP_FILES if source == PADDLENLP else HF_FILES + (HF_WEIGHTS_DESCRIPTION,)


def _offline_advice(folder: Path) -> str:
    return (
        f"To serve without network: copy the checkpoint files into {folder}, "
        "or pass a local checkpoint folder with --model /path/to/folder, or use --model janus-tiny."
    )


def _manifest_matches(folder: Path) -> bool:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return bool(files) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _shard_names(index_text: str) -> list[str]:
    shards = sorted(set(json.loads(index_text)["weight_map"].values()))
    for shard in shards:
        # The index comes from the network: its names must stay inside the folder.
        if not isinstance(shard, str) or Path(shard).name != shard or shard.startswith("."):
            raise ValueError(f"bad shard name {shard!r}")
    if not shards:
        raise ValueError("weight_map lists no shards")
    return shards


def _download(
    model_id: str,
    folder: Path,
    sources: tuple[str, ...],
    endpoints: Mapping[str, str],
    policy: DownloadPolicy,
    progress: bool,
) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LOCK).touch()
    except OSError as exc:
        raise DownloadError(
            f"cannot create {folder} for {model_id}: {exc}; set JANUS_HOME to a writable folder"
        ) from exc
    timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
    headers = {"User-Agent": "janus-server", "Accept-Encoding": "identity"}
    with _folder_lock(folder, policy), httpx.Client(timeout=timeout, follow_redirects=True, headers=headers) as client:
        if is_complete(folder, model_id):  # another process finished it while we waited for the lock
            return folder
        (folder / MANIFEST).unlink(missing_ok=True)
        failures = []
        for source in sources:
            staging = folder / STAGING / source
            staging.mkdir(parents=True, exist_ok=True)
            base = _endpoint(source, endpoints)
            try:
                files = _plan(client, source, model_id, base, staging, policy, progress)
            except DownloadError as exc:
                log.warning("%s is not available from %s: %s", model_id, SOURCE_TITLES[source], exc)
                failures.append(f"  - {SOURCE_TITLES[source]} ({base}): {exc}")
                continue
            _check_free_space(model_id, staging, files)
            log.info("downloading %s from %s into %s", model_id, SOURCE_TITLES[source], folder)
            for remote in files:
                _download_file(client, remote, staging, _auth_headers(source), policy, progress)
            _install(folder, staging, model_id, source, files)
            return folder
    raise DownloadError(
        f"could not download {model_id} into {folder}:\n" + "\n".join(failures) + "\n"
        f"{_missing_report(folder, model_id)}\n{_offline_advice(folder)}"
    )


def _endpoint(source: str, endpoints: Mapping[str, str]) -> str:
    for value in (endpoints.get(source), *(os.environ.get(v) for v in ENDPOINT_VARIABLES[source])):
        if value:
            return value.rstrip("/")
    return DEFAULT_ENDPOINTS[source]


def _file_url(source: str, base: str, model_id: str, name: str) -> str:
    if source == HUGGINGFACE:
        return f"{base}/{model_id}/resolve/main/{name}"
    return f"{base}/{model_id}/{name}"


def _auth_headers(source: str) -> dict[str, str]:
    token = os.environ.get("HF_TOKEN")
    return {"Authorization": f"Bearer {token}"} if source == HUGGINGFACE and token else {}


def _plan(
    client: httpx.Client, source: str, model_id: str, base: str, staging: Path, policy: DownloadPolicy, progress: bool,
) -> list[RemoteFile]:
    """Every file of the source, checked with HEAD before any byte of the weights moves."""
    headers = _auth_headers(source)

    def required(name: str) -> RemoteFile:
        found = _probe(client, _file_url(source, base, model_id, name), name, headers, policy)
        if found is None:
            raise DownloadError(f"{name} not found (HTTP 404) at {_file_url(source, base, model_id, name)}")
        return found

    if source == PADDLENLP:
        return [required(n) for n in PADDLENLP_FILES]
    files = [required(n) for n in HF_FILES]
    for weights in HF_WEIGHTS:
        found = _probe(client, _file_url(source, base, model_id, weights), weights, headers, policy)
        if found is None:
            continue
        if not weights.endswith(".index.json"):
            return files + [found]
        index = _download_file(client, found, staging, headers, policy, progress)
        try:
            shards = _shard_names(index.read_text())
        except (OSError, ValueError) as exc:
            raise DownloadError(f"{weights} at {found.url} is not a usable shard index: {exc}") from exc
        return files + [found] + [required(s) for s in shards]
    raise DownloadError(f"no weights at {base}/{model_id}: tried {', '.join(HF_WEIGHTS)}")


def _probe(client: httpx.Client, url: str, name: str, headers: dict, policy: DownloadPolicy) -> RemoteFile | None:
    """HEAD a file: None when it does not exist, else its size when the server says it."""
    for attempt in range(1, policy.retries + 2):
        try:
            response = client.head(url, headers=headers, follow_redirects=False)
            linked_size = response.headers.get("X-Linked-Size", "")
            if response.is_redirect and linked_size.isdigit():
                # Hugging Face names an LFS file's size before redirecting to a CDN URL that may be signed for GET only.
                return RemoteFile(name, url, int(linked_size))
            if response.is_redirect:
                response = client.send(response.next_request, follow_redirects=True)
        except httpx.RequestError as exc:
            error = f"cannot reach {url}: {_describe(exc)}"
        else:
            if response.status_code == 404:
                return None
            if response.status_code in (405, 501):  # no HEAD here: existence and size show on the GET
                return RemoteFile(name, url, None)
            if response.status_code not in RETRYABLE_STATUS:
                _raise_for_status(response, name, url)
                length = response.headers.get("Content-Length")
                return RemoteFile(name, url, int(length) if length and length.isdigit() else None)
            error = f"HTTP {response.status_code} from {url}"
        if attempt > policy.retries:
            raise DownloadError(error)
        log.info("%s; retrying", error)
        time.sleep(_backoff(policy, attempt))
    raise AssertionError("unreachable")


def _raise_for_status(response: httpx.Response, name: str, url: str) -> None:
    status = response.status_code
    if status < 300:
        return
    if status in (401, 403):
        raise DownloadError(
            f"access denied (HTTP {status}) for {name} at {url}: the repository may be private, gated or "
            "missing; set HF_TOKEN if you have access"
        )
    if status == 404:
        raise DownloadError(f"{name} not found (HTTP 404) at {url}")
    if status in RETRYABLE_STATUS:
        raise _RetryableError(f"HTTP {status} from {url}")
    raise DownloadError(f"HTTP {status} for {name} at {url}")


def _check_free_space(model_id: str, staging: Path, files: list[RemoteFile]) -> None:
    needed = sum(max(f.size - _size_on_disk(staging, f.name), 0) for f in files if f.size is not None)
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise DownloadError(
            f"{model_id} needs {needed / 1e9:.2f} GB more in {staging} but only {free / 1e9:.2f} GB is free"
        )


def _size_on_disk(staging: Path, name: str) -> int:
    for path in (staging / name, staging / (name + PART_SUFFIX)):
        if path.is_file():
            return path.stat().st_size
    return 0


def _download_file(
    client: httpx.Client, remote: RemoteFile, staging: Path, headers: dict, policy: DownloadPolicy, progress: bool,
) -> Path:
    """Fetch one file into staging, resuming its .part; renamed only once its size checks out."""
    dest = staging / remote.name
    if dest.is_file() and remote.size in (None, dest.stat().st_size):
        return dest
    part = staging / (remote.name + PART_SUFFIX)
    failures = 0
    with tqdm(
        total=remote.size, desc=remote.name, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, disable=not progress, leave=False,
        mininterval=0.1 if sys.stderr.isatty() else 10,  # container logs get a line now and then, not a flood
    ) as bar:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            try:
                announced = _transfer(client, remote, part, offset, headers, policy, bar)
                break
            except (httpx.RequestError, _RetryableError) as exc:
                # Only attempts that moved no byte count towards giving up: a long download may break often.
                failures = 1 if _file_size(part) > offset else failures + 1
                if failures > policy.retries:
                    raise DownloadError(
                        f"downloading {remote.name} from {remote.url} failed {failures} times in a row: "
                        f"{_describe(exc)}. "
                        f"The partial file is kept in {staging}; run again to resume."
                    ) from exc
                log.warning("%s: %s; resuming in %.1f s", remote.name, _describe(exc), _backoff(policy, failures))
                time.sleep(_backoff(policy, failures))
            except OSError as exc:
                raise DownloadError(f"cannot write {part}: {exc}") from exc
    size = part.stat().st_size
    expected = sorted({s for s in (remote.size, announced) if s is not None})
    if any(s != size for s in expected):
        part.unlink()
        raise DownloadError(
            f"size mismatch for {remote.name} from {remote.url}: received {size} bytes, the server announced "
            f"{' and '.join(map(str, expected))}; the partial file was discarded, run again to retry"
        )
    os.replace(part, dest)
    return dest


def _transfer(
    client: httpx.Client, remote: RemoteFile, part: Path, offset: int, headers: dict, policy: DownloadPolicy, bar: tqdm,
) -> int | None:
    """One GET appending to the .part from `offset`; returns the size the server announced."""
    # An earlier run may have got every byte but stopped before renaming.
    if remote.size is not None and offset == remote.size and part.exists():
        return remote.size
    if remote.size is not None and offset > remote.size:
        part.unlink()
        offset = 0
    request_headers = {**headers, "Range": f"bytes={offset}-"} if offset else headers
    with client.stream("GET", remote.url, headers=request_headers) as response:
        if response.status_code == 416:
            _, total = _content_range(response)
            if total == offset:
                return total
            part.unlink(missing_ok=True)
            raise _RetryableError(f"server refused to resume at byte {offset} of {total}; starting over")
        _raise_for_status(response, remote.name, remote.url)
        if response.status_code == 206:
            start, total = _content_range(response)
            if start != offset or (remote.size is not None and total != remote.size):
                part.unlink(missing_ok=True)
                raise _RetryableError(
                    f"server sent bytes from {start} of {total}, not from {offset} of {remote.size}; starting over"
                )
            mode = "ab"
        else:
            if offset:
                log.info("%s: the server ignored the range request; downloading from the start", remote.name)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        bar.reset(total=total if total is not None else remote.size)
        bar.update(offset)
        with part.open(mode) as out:
            for chunk in response.iter_raw():  # no rechunking: a buffered chunk would be lost when the transfer breaks
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    return total


def _content_range(response: httpx.Response) -> tuple[int | None, int | None]:
    """'bytes 10-99/100' -> (10, 100); 'bytes */100' -> (None, 100)."""
    value = response.headers.get("Content-Range", "")
    span, _, total = value.removeprefix("bytes ").partition("/")
    start = span.partition("-")[0]
    return (int(start) if start.isdigit() else None, int(total) if total.isdigit() else None)


def _install(folder: Path, staging: Path, model_id: str, source: str, files: list[RemoteFile]) -> None:
    for remote in files:
        os.replace(staging / remote.name, folder / remote.name)
    manifest = {
        "model": model_id,
        "source": source,
        "files": {f.name: (folder / f.name).stat().st_size for f in files},
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    pending = folder / (MANIFEST + ".tmp")
    pending.write_text(json.dumps(manifest, indent=2))
    os.replace(pending, folder / MANIFEST)
    shutil.rmtree(folder / STAGING, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(folder: Path, policy: DownloadPolicy) -> Iterator[None]:
    """One downloader per folder across threads and processes; the kernel drops the lock if its holder dies.

    The lock file is never deleted: removing it would let a waiter lock an orphaned inode.
    """
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _acquire(fd, path, folder, policy)
        if locked:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, folder: Path, policy: DownloadPolicy) -> bool:
    if fcntl is None:
        log.warning("no file locking on this platform: do not run two downloads into %s at once", folder)
        return False
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not waiting:
                holder = path.read_text().strip() or "unknown"
                log.info("another download into %s is running (pid %s); waiting for it", folder, holder)
                waiting = True
            time.sleep(policy.lock_poll)
        except OSError as exc:  # e.g. a network filesystem without lock support
            log.warning("cannot lock %s (%s); downloading without a lock", path, exc)
            return False


def _backoff(policy: DownloadPolicy, attempt: int) -> float:
    return min(policy.backoff * 2 ** (attempt - 1), policy.max_backoff)


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__

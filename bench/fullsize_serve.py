"""Serve a checkpoint with Janus-1.3B's real sizes as a user would, and time what the user meets.

Writes a random-weight checkpoint once, in the Hugging Face release's layout and dtype (one BF16
model.safetensors, 2.09 B parameters, 4.2 GB; the tokenizer and processor files are janus-tiny's),
into a cache folder. Then runs `janus-server serve --model FOLDER` (this checkout's, or --repo's: two
versions compared in one run) with no tuning flags and reports:

    seconds to /ready, and the KV cache the worker chose (from /ready)
    peak resident memory of the server's process tree (the sum over its processes, sampled every
    0.2 s; and each process's own peak, VmHWM)
    one understanding request (one image, greedy): its prompt's length, first-token time, ms per later token
    (time the official code with that --prompt-len)
    with --understand-concurrency 1,8: that many requests at once, tokens/s over all
    one image (/generate, n=1): seconds
    with --images-together 4: that many image requests at once (n=1 each), images/s over all of them
    and the ratio to one alone
    with --beside: the understanding request sent while a text answer streams: the stream's longest
    wait between tokens while the new prompt is prefilled, and the new request's first-token time

It checks free memory and disk first, and stops with a message if either is short. One full-size
process at a time: nothing else big may run beside it.

    .venv/bin/python bench/fullsize_serve.py [--cache ~/.cache/janus-server/bench] [--tokens 32] [--json]
    .venv/bin/python bench/fullsize_serve.py --write-only      # just the checkpoint
    .venv/bin/python bench/fullsize_serve.py -- --memory-fraction 0.5   # flags after -- go to serve
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.config import JanusConfig, expected_hf_shapes  # noqa: E402
from server.engine.memory import host_available_bytes, resident_bytes  # noqa: E402

MODEL = "deepseek-ai/Janus-1.3B"
FOLDER_NAME = "janus-1.3b-random-bf16"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
              "preprocessor_config.json")
DONE = "fullsize.json"  # written last: the folder is complete
# Loading Janus-1.3B on CPU reaches ~12 GB before the cache (float32 weights and the OpenVINO programs),
# and the cache takes most of what is left: the bench wants the machine to itself.
NEEDED_MEMORY = 16 * 10**9
NEEDED_DISK = 5 * 10**9


def bf16_bytes(values: np.ndarray) -> bytes:
    """float32 -> bfloat16 (round to nearest even), as little-endian bytes."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype("<u2").tobytes()


def draw(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """janus-tiny's scheme (model/tiny.py): weights N(0,1)/sqrt(fan_in), biases 0.05 N, norm scales 1 + 0.1 N."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("codebook_used"):
        return np.zeros(shape, np.float32)
    if len(shape) == 1:
        return np.float32(0.05) * noise if name.endswith(".bias") else np.float32(1) + np.float32(0.1) * noise
    if name.endswith(("embed_tokens.weight", "gen_embed.weight", "embedding.weight")):
        return noise
    return noise / np.float32(np.sqrt(np.prod(shape[1:])))


def write_checkpoint(folder: Path, tokenizer_folder: Path, seed: int = 0) -> None:
    """config.json, the tokenizer files and one BF16 model.safetensors, written tensor by tensor."""
    from tokenizers import Tokenizer

    from model.processor import EOS_TOKEN, JANUS_SPECIAL_TOKENS

    config = JanusConfig.from_name(MODEL)
    shapes = expected_hf_shapes(config)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in SIDE_FILES:
        shutil.copy(tokenizer_folder / name, staging / name)
    (staging / "config.json").write_text(config.to_json())
    tokenizer = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    # As janus-tiny does: ids past the tokenizer and special tokens other than EOS get no logit, so that
    # greedy text stays decodable.
    silent = [tokenizer.token_to_id(t) for t in JANUS_SPECIAL_TOKENS if t != EOS_TOKEN]

    names = sorted(shapes)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        size = int(np.prod(shapes[name])) * 2
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(staging / "model.safetensors", "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for name in names:
            values = draw(rng, name, shapes[name])
            if name == "language_model.lm_head.weight":
                values[tokenizer.get_vocab_size():] = 0
                values[silent] = 0
            out.write(bf16_bytes(values))
    parameters = sum(int(np.prod(s)) for s in shapes.values())
    (staging / DONE).write_text(json.dumps({"model": MODEL, "parameters": parameters, "bytes": offset, "seed": seed}))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def ensure_checkpoint(cache: Path) -> Path:
    folder = cache / FOLDER_NAME
    if (folder / DONE).exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(cache).free < NEEDED_DISK:
        sys.exit(f"{cache}: under {NEEDED_DISK / 1e9:.0f} GB of disk free for the 4.2 GB checkpoint")
    from model.tiny import ensure_janus_tiny

    started = time.perf_counter()
    write_checkpoint(folder, ensure_janus_tiny(cache))
    print(f"wrote {folder} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return folder


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


class MemorySampler(threading.Thread):
    """The process tree's resident memory every `every` seconds: the peak of the sum, and each process's VmHWM."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_sum = 0
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for pid in tree(self.pid):
                total += resident_bytes(pid) or 0
                self.peaks[pid] = max(self.peaks.get(pid, 0), resident_bytes(pid, peak=True) or 0)
            self.peak_sum = max(self.peak_sum, total)
            self.stop.wait(self.every)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def picture_png() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def understand(client, tokens: int, question: str = "Describe this picture.") -> dict:
    body = {"image": base64.b64encode(picture_png()).decode(), "question": question,
            "max_new_tokens": tokens, "stream": True}
    started = time.perf_counter()
    first, usage = None, None
    with client.stream("POST", "/understand", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if first is None and event.get("text"):
                first = time.perf_counter() - started
            usage = event.get("usage", usage)
            first = event.get("timings", {}).get("first_token") or first  # the server's own, from arrival
    total = time.perf_counter() - started
    made = usage["completion_tokens"] if usage else 0
    per_token = (total - first) / (made - 1) * 1e3 if first is not None and made > 1 else float("nan")
    return {"first_token_s": first, "ms_per_token": per_token, "tokens": made, "total_s": total,
            "prompt_tokens": usage["prompt_tokens"] if usage else None}


def understand_together(url: str, tokens: int, concurrency: int) -> dict:
    """`concurrency` understanding requests at once (each its own question): tokens/s over all of them."""
    import concurrent.futures

    import httpx

    def one(i):
        with httpx.Client(base_url=url, timeout=3600) as client:
            return understand(client, tokens, question=f"Describe picture {i}.")

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(concurrency)))
    wall = time.perf_counter() - started
    made = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "tokens": made, "wall_s": wall, "tokens_per_s": made / wall,
            "first_token_s_median": sorted(r["first_token_s"] for r in results)[concurrency // 2],
            "ms_per_token_median": sorted(r["ms_per_token"] for r in results)[concurrency // 2]}


def understand_beside(url: str, tokens: int, running_tokens: int = 64) -> dict:
    """A text question streams (the running request); after its 4th token the image question (the long prompt)
    arrives. The running request's longest wait between two tokens while the new one was prefilled, and how
    many tokens it made meanwhile; the new one's first-token time."""
    import httpx

    arrived: list[float] = []

    def running() -> None:
        body = {"question": "Tell me a long story about a lighthouse.", "max_new_tokens": running_tokens,
                "stream": True}
        with httpx.Client(base_url=url, timeout=3600) as client:
            with client.stream("POST", "/understand", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line.startswith("data:") and line.strip() != "data: [DONE]" and "text" in json.loads(line[5:]):
                        arrived.append(time.perf_counter())

    thread = threading.Thread(target=running)
    thread.start()
    while len(arrived) < 4 and thread.is_alive():
        time.sleep(0.01)
    sent = time.perf_counter()
    with httpx.Client(base_url=url, timeout=3600) as client:
        new = understand(client, tokens)
    first = sent + new["first_token_s"]
    thread.join()
    during = [t for t in arrived if sent <= t <= first]
    marks = [sent, *during, first]
    return {"new_first_token_s": new["first_token_s"], "new_prompt_tokens": new["prompt_tokens"],
            "running_longest_wait_s": max(b - a for a, b in zip(marks, marks[1:])),
            "running_tokens_meanwhile": len(during), "running_tokens": len(arrived)}


def generate(client, seed: int = 7) -> dict:
    started = time.perf_counter()
    response = client.post("/generate", json={"prompt": "a lighthouse on a cliff at dusk", "n": 1, "seed": seed})
    response.raise_for_status()
    return {"image_s": time.perf_counter() - started}


def generate_together(url: str, count: int) -> dict:
    """`count` image requests at once (n=1, each its own seed): images/s over all of them."""
    import concurrent.futures

    import httpx

    def one(i):
        with httpx.Client(base_url=url, timeout=3600) as client:
            return generate(client, seed=100 + i)["image_s"]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        seconds = list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    return {"images": count, "wall_s": wall, "images_per_s": count / wall, "slowest_s": max(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "janus-server" / "bench")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens of the understanding request")
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--write-only", action="store_true")
    parser.add_argument("--no-image", action="store_true", help="skip the image request (about 5 min on 2 cores)")
    parser.add_argument("--no-understand", action="store_true", help="skip the understanding requests")
    parser.add_argument("--understand-concurrency", default="", help="also these numbers of understanding requests "
                        "at once, e.g. 1,8: tokens/s over all of them")
    parser.add_argument("--beside", action="store_true", help="also the understanding request sent while a text "
                        "answer streams: the stream's longest wait, the new request's first token")
    parser.add_argument("--images-together", type=int, default=0, help="also this many image requests at once "
                        "(e.g. 4): images/s against one alone")
    parser.add_argument("--repo", type=Path, default=REPO, help="serve this checkout's code (to compare two versions "
                        "in one run; the same interpreter)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--log", type=Path, default=None, help="write the server's log here")
    parser.add_argument("serve_args", nargs="*", help="after --: more flags for janus-server serve")
    args = parser.parse_args()

    folder = ensure_checkpoint(args.cache)
    if args.write_only:
        return
    available = host_available_bytes()
    if available < NEEDED_MEMORY:
        sys.exit(f"only {available / 1e9:.1f} GB of memory is available; serving Janus-1.3B on CPU needs "
                 f"{NEEDED_MEMORY / 1e9:.0f} GB or more: stop other large processes first")

    import httpx

    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--port", str(port),
               "--home", str(args.cache), "--offline", "--no-log-json", *args.serve_args]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("JANUS_")}
    environment["PYTHONPATH"] = str(args.repo.resolve())
    started = time.perf_counter()
    server = subprocess.Popen(command, env=environment, cwd=args.repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log_lines: list[str] = []
    threading.Thread(target=lambda: log_lines.extend(server.stderr), daemon=True).start()
    sampler = MemorySampler(server.pid)
    sampler.start()
    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result: dict = {"model": MODEL, "checkpoint": str(folder), "available_before_bytes": available,
                    "serve_args": args.serve_args, "repo": str(args.repo), "commit": commit}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=3600) as client:
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited ({server.returncode})")
                try:
                    ready = client.get("/ready")
                except httpx.TransportError:
                    ready = None
                if ready is not None and ready.status_code == 200:
                    break
                if ready is not None and ready.json()["error"]["code"] == "model_load_failed":
                    raise RuntimeError(ready.json()["error"]["message"])
                if time.perf_counter() - started > args.ready_timeout:
                    raise RuntimeError(f"not ready after {args.ready_timeout:.0f} s")
                time.sleep(0.5)
            result["ready_s"] = time.perf_counter() - started
            result["kv_cache"] = ready.json()["kv_cache"]
            result["rss_at_ready_bytes"] = sampler.peak_sum
            if not args.no_understand:
                result["understand"] = understand(client, args.tokens)
            levels = [int(c) for c in args.understand_concurrency.split(",") if c]
            result["understand_together"] = [understand_together(f"http://127.0.0.1:{port}", args.tokens, c)
                                             for c in levels]
            if args.beside:
                result["beside"] = understand_beside(f"http://127.0.0.1:{port}", args.tokens)
            if not args.no_image:
                result.update(generate(client))
            if args.images_together:
                result["images_together"] = generate_together(f"http://127.0.0.1:{port}", args.images_together)
    except Exception as error:  # noqa: BLE001 - reported with what was measured so far
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        sampler.stop.set()
        sampler.join()
    if args.log:
        args.log.write_text("".join(log_lines))
    result["peak_rss_tree_bytes"] = sampler.peak_sum
    result["peak_rss_each_bytes"] = sorted(sampler.peaks.values(), reverse=True)
    if "error" in result:
        result["log_tail"] = log_lines[-15:]
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    if "error" in result:
        sys.exit(1)


def report(r: dict) -> None:
    print(f"{r['model']} (random weights, BF16 safetensors) served by {r['repo']} at {r['commit']}, flags: "
          f"{' '.join(r['serve_args']) or 'none'}")
    print(f"memory available before start: {r['available_before_bytes'] / 1e9:.1f} GB")
    if "ready_s" in r:
        print(f"/ready after {r['ready_s']:.1f} s, {r['rss_at_ready_bytes'] / 1e9:.1f} GB resident (process tree)")
        for cache in r["kv_cache"]:
            print(f"  worker {cache['worker']} ({cache['device']}): KV cache {cache['bytes'] / 1e9:.1f} GB, "
                  f"{cache['rows']} rows x {cache['row_length']} positions; {cache['images_at_once']} images or "
                  f"{cache['understanding_at_once']} understanding requests at once; "
                  f"{cache['free_bytes'] / 1e9:.1f} GB was free after loading {cache['loaded_bytes'] / 1e9:.1f} GB "
                  f"(the weights alone {cache['weights_bytes'] / 1e9:.1f} GB)")
    if "understand" in r:
        u = r["understand"]
        print(f"understanding (1 image, a {u['prompt_tokens']}-token prompt, {u['tokens']} tokens): first token {u['first_token_s']:.1f} s, "
              f"then {u['ms_per_token']:.0f} ms per token; {u['total_s']:.1f} s in all")
    for level in r.get("understand_together", []):
        print(f"understanding, {level['concurrency']} at once ({level['tokens']} tokens): {level['tokens_per_s']:.2f} "
              f"tokens/s; median first token {level['first_token_s_median']:.1f} s, then "
              f"{level['ms_per_token_median']:.0f} ms per token")
    if "beside" in r:
        b = r["beside"]
        print(f"an understanding request ({b['new_prompt_tokens']}-token prompt) beside a streaming answer: its "
              f"first token {b['new_first_token_s']:.1f} s; meanwhile the stream made {b['running_tokens_meanwhile']} "
              f"tokens and waited {b['running_longest_wait_s']:.1f} s at most")
    if "image_s" in r:
        print(f"one image: {r['image_s']:.1f} s ({r['image_s'] / 576 * 1e3:.0f} ms per image token, VQ decode included)")
    if "images_together" in r:
        t = r["images_together"]
        alone = f"; {t['images_per_s'] * r['image_s']:.2f}x the images/s of one alone" if "image_s" in r else ""
        print(f"{t['images']} images at once: {t['wall_s']:.1f} s, {t['images_per_s'] * 3600:.1f} images/hour{alone}")
    print(f"peak resident memory: {r['peak_rss_tree_bytes'] / 1e9:.1f} GB for the process tree; each process "
          f"{', '.join(f'{b / 1e9:.2f}' for b in r['peak_rss_each_bytes'])} GB")
    if "error" in r:
        print(f"FAILED: {r['error']}")
        print("".join(r.get("log_tail", [])))


if __name__ == "__main__":
    main()

"""Memory soak: a real `janus-server serve` under mixed load, its processes' RSS sampled over time.

Starts the server (janus-tiny on CPU by default), then keeps `--concurrency` understanding requests
(with an image) and as many image requests running for `--minutes`, and every `--every` seconds
prints the resident memory of the API process and of each of its child processes (the model
worker). At the end it prints each process's growth over the second half of
the run, in MiB per minute: a leak keeps growing there, a warm-up levels off.

    python bench/soak.py --minutes 20
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def process_tree(pid: int) -> dict[str, int]:
    """The API process and its descendants, named by their command line's last word."""
    named = {"api": pid}
    pending = children(pid)
    while pending:
        child = pending.pop(0)
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(command).decode(errors="replace")
        if "resource_tracker" in text:
            kind = "resource_tracker"
        elif "spawn_main" in text:
            kind = "child"
        else:
            kind = Path(command[0].decode(errors="replace")).name or "child"
        name, n = kind, 2
        while name in named:
            name, n = f"{kind}{n}", n + 1
        named[name] = child
        pending.extend(children(child))
    return named


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_b64(i: int) -> str:
    rng = np.random.default_rng(i)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def load(url: str, kinds: list[str], concurrency: int, until: float, counts: dict[str, int]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def understand(worker: int) -> None:
            i = 0
            while time.monotonic() < until:
                i += 1
                response = await http.post("/understand", json={
                    "question": f"Describe picture {i}.", "images": [png_b64(worker * 1000 + i)],
                    "max_new_tokens": 48, "temperature": 0.7, "seed": i})
                counts["understand" if response.status_code == 200 else f"understand {response.status_code}"] += 1

        async def generate(worker: int) -> None:
            i = 0
            while time.monotonic() < until:
                i += 1
                response = await http.post("/generate", json={
                    "prompt": f"a lighthouse number {worker}-{i}", "n": 1, "seed": i})
                counts["generate" if response.status_code == 200 else f"generate {response.status_code}"] += 1

        calls = {"understand": understand, "generate": generate}
        await asyncio.gather(*(calls[kind](w) for kind in kinds for w in range(concurrency)))


async def sample(pid: int, until: float, every: float, rows: list[tuple[float, dict[str, float]]],
                 counts: dict[str, int]) -> None:
    started = time.monotonic()
    while True:
        now = time.monotonic()
        sizes = {name: rss_mib(p) for name, p in process_tree(pid).items()}
        sizes = {k: v for k, v in sizes.items() if v is not None and k != "resource_tracker"}
        rows.append((now - started, sizes))
        print(f"{(now - started) / 60:6.1f} min  " + "  ".join(f"{k} {v:7.1f} MiB" for k, v in sizes.items())
              + f"   answered: {dict(counts)}", flush=True)
        if now >= until:
            return
        await asyncio.sleep(min(every, max(0.0, until - now)))


def slope_mib_per_min(points: list[tuple[float, float]]) -> float:
    t = np.array([p[0] for p in points]) / 60
    y = np.array([p[1] for p in points])
    return float(np.polyfit(t, y, 1)[0]) if len(points) >= 2 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--every", type=float, default=30, help="seconds between RSS samples")
    parser.add_argument("--concurrency", type=int, default=2, help="of each kind (2: 4 requests at once)")
    parser.add_argument("--kinds", default="understand,generate", help="understand, generate or both")
    parser.add_argument("--model", default="janus-tiny")
    parser.add_argument("serve_args", nargs="*", help="more `janus-server serve` flags, after --")
    args = parser.parse_args()

    port = free_port()
    home = os.environ.get("JANUS_HOME") or tempfile.mkdtemp(prefix="janus-soak-")
    env = {**os.environ, "JANUS_HOME": home, "JANUS_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "server.cli", "serve", "--model", args.model, "--devices", "cpu",
               "--port", str(port), *args.serve_args]
    server = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("the server did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.5)
        until = time.monotonic() + args.minutes * 60
        rows: list[tuple[float, dict[str, float]]] = []
        counts: dict[str, int] = __import__("collections").Counter()

        async def run() -> None:
            await asyncio.gather(load(url, args.kinds.split(","), args.concurrency, until, counts),
                                 sample(server.pid, until, args.every, rows, counts))

        asyncio.run(run())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(120)

    half = rows[-1][0] / 2
    print(f"\nanswered: {dict(counts)}")
    print("growth over the second half of the run (linear fit), MiB per minute:")
    for name in rows[-1][1]:
        points = [(t, sizes[name]) for t, sizes in rows if t >= half and name in sizes]
        first = next(sizes[name] for _, sizes in rows if name in sizes)
        print(f"  {name:8s} {slope_mib_per_min(points):+7.2f}   (from {first:.1f} to {rows[-1][1][name]:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark in the spirit of vLLM's benchmark_serving.

Drives the engine in-process (default) or a running server over HTTP (--url)
at several concurrency levels, for understanding and for text-to-image, and
prints requests/s, images/s, tokens/s, TTFT, time per output token and p50/p95
latency. In engine mode it runs the same load a second time with batching
switched off (one request at a time per worker) and prints the ratio.

    python bench/serve_bench.py --model janus-tiny --concurrency 1,2,4,8,16
    python bench/serve_bench.py --url http://127.0.0.1:8000 --kind generate
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.client import EngineClient  # noqa: E402
from server.engine.types import (  # noqa: E402
    EngineConfig, GenerateRequest, ProgressEvent, TokenEvent, UnderstandRequest,
)


@dataclasses.dataclass
class Sample:
    latency: float
    ttft: float | None
    tokens: int
    images: int


def test_image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8))


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(samples: list[Sample], wall: float) -> dict:
    tokens = sum(s.tokens for s in samples)
    images = sum(s.images for s in samples)
    latencies = [s.latency for s in samples]
    ttfts = [s.ttft for s in samples if s.ttft is not None]
    tpots = [(s.latency - s.ttft) / (s.tokens - 1) for s in samples if s.ttft is not None and s.tokens > 1]
    return {
        "requests_per_s": len(samples) / wall, "images_per_s": images / wall, "tokens_per_s": tokens / wall,
        "ttft_p50": percentile(ttfts, 50), "tpot_p50": percentile(tpots, 50),
        "latency_p50": percentile(latencies, 50), "latency_p95": percentile(latencies, 95),
    }


class EngineTarget:
    def __init__(self, engine: EngineClient, max_new_tokens: int, n_images: int):
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.n_images = n_images

    async def understand(self, i: int) -> Sample:
        start = time.perf_counter()
        ttft, tokens = None, 0
        request = UnderstandRequest(messages=[{"role": "user", "content": "Describe this picture.", "images": 1}],
                                    images=[test_image(i)], max_new_tokens=self.max_new_tokens)
        async for item in self.engine.understand_stream(request):
            if isinstance(item, TokenEvent) and ttft is None:
                ttft = time.perf_counter() - start
            if not isinstance(item, TokenEvent):
                tokens = item.usage.completion_tokens
        return Sample(time.perf_counter() - start, ttft, tokens, 0)

    async def generate(self, i: int) -> Sample:
        start = time.perf_counter()
        ttft = None
        async for item in self.engine.generate_images_stream(
                GenerateRequest(prompt=f"a watercolor of a lighthouse, take {i}", n=self.n_images, seed=i)):
            if isinstance(item, ProgressEvent) and ttft is None:
                ttft = time.perf_counter() - start
        return Sample(time.perf_counter() - start, ttft, 576, self.n_images)


class HTTPTarget:
    def __init__(self, url: str, max_new_tokens: int, n_images: int, api_key: str | None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=url, timeout=3600, headers=headers)
        self.max_new_tokens = max_new_tokens
        self.n_images = n_images

    async def understand(self, i: int) -> Sample:
        buffer = io.BytesIO()
        test_image(i).save(buffer, format="PNG")
        body = {"image": base64.b64encode(buffer.getvalue()).decode(), "question": "Describe this picture.",
                "max_new_tokens": self.max_new_tokens, "stream": True}
        start = time.perf_counter()
        ttft, tokens = None, 0
        async with self.client.stream("POST", "/understand", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if ttft is None and event.get("text"):
                    ttft = time.perf_counter() - start
                if "usage" in event:
                    tokens = event["usage"]["completion_tokens"]
        return Sample(time.perf_counter() - start, ttft, tokens, 0)

    async def generate(self, i: int) -> Sample:
        start = time.perf_counter()
        response = await self.client.post("/generate", json={"prompt": f"a lighthouse, take {i}",
                                                             "n": self.n_images, "seed": i})
        response.raise_for_status()
        return Sample(time.perf_counter() - start, None, 576, self.n_images)


async def run_level(target, kind: str, concurrency: int, requests: int) -> dict:
    """`requests` requests, at most `concurrency` in flight at any time.

    kind "mixed": `requests` understanding and `requests` image requests at once, each kind
    with `concurrency` in flight. Tokens/s, TTFT and TPOT are the understanding requests',
    over the time until the last of them ended; images/s the image requests', likewise."""
    calls = {"understand": [target.understand], "generate": [target.generate],
             "mixed": [target.understand, target.generate]}[kind]
    start = time.perf_counter()

    async def group(call) -> tuple[list[Sample], float]:
        gate = asyncio.Semaphore(concurrency)

        async def one(i):
            async with gate:
                return await call(i)

        samples = await asyncio.gather(*(one(i) for i in range(requests)))
        return samples, time.perf_counter() - start

    groups = await asyncio.gather(*(group(call) for call in calls))
    stats = summarize(*groups[0])
    if kind == "mixed":
        images = summarize(*groups[1])
        everything = groups[0][0] + groups[1][0]
        stats.update(images_per_s=images["images_per_s"],
                     requests_per_s=len(everything) / max(wall for _, wall in groups),
                     latency_p50=percentile([s.latency for s in everything], 50),
                     latency_p95=percentile([s.latency for s in everything], 95))
    return stats


async def start_engine(args, no_batching: bool) -> EngineClient:
    config = EngineConfig(model=args.model, home=args.home, devices=args.devices.split(","),
                          max_batch_rows=args.max_batch_rows, max_cache_tokens=args.max_cache_tokens,
                          max_new_tokens_limit=args.max_new_tokens,  # rows as short as the load allows
                          max_queue=10_000, max_running_requests=1 if no_batching else 0,
                          cpu_engine=args.cpu_engine, cpu_vq=args.cpu_vq,
                          cpu_vision=args.cpu_vision, threads=args.threads)
    engine = EngineClient(config)
    await engine.start()
    await engine.wait_ready(timeout=1800)
    return engine


def print_row(label, kind, concurrency, stats, baseline=None):
    ratio = "".join(f"  {key.split('_')[0]} x{stats[key] / baseline[key]:.2f}" for key in keys(kind)) if baseline else ""
    ratio = f"{ratio} vs one-at-a-time" if ratio else ""
    print(f"{label:<12} {kind:<10} c={concurrency:<3} req/s {stats['requests_per_s']:7.3f}  "
          f"img/s {stats['images_per_s']:7.3f}  tok/s {stats['tokens_per_s']:8.2f}  "
          f"TTFT p50 {stats['ttft_p50']:7.3f}s  TPOT p50 {stats['tpot_p50'] * 1000:8.2f}ms  "
          f"latency p50 {stats['latency_p50']:7.2f}s p95 {stats['latency_p95']:7.2f}s{ratio}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="janus-tiny")
    parser.add_argument("--home", default=None)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--url", default=None, help="benchmark a running server instead of an in-process engine")
    parser.add_argument("--api-key", default=os.environ.get("JANUS_API_KEY"))
    parser.add_argument("--kind", default="understand,generate",
                        help="comma list of understand, generate, mixed (both kinds at once, --concurrency each)")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--requests", type=int, default=0, help="per level; 0: --rounds x concurrency (at least 8)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client when --requests is 0; more "
                        "rounds weigh the start and end of a closed-loop run (all clients starting together) less")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--images", type=int, default=1, help="images per generate request")
    parser.add_argument("--max-batch-rows", type=int, default=32)
    parser.add_argument("--max-cache-tokens", type=int, default=32 * 1024, help="at most; the cache is sized from "
                        "free memory, its rows as long as an image and a question plus --max-new-tokens")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: all cores)")
    parser.add_argument("--cpu-engine", default="eager", choices=["auto", "eager", "openvino"], help="CPU decoder layers")
    parser.add_argument("--cpu-vq", default="auto", choices=["auto", "eager", "openvino"], help="CPU VQ decoder")
    parser.add_argument("--cpu-vision", default="auto", choices=["auto", "eager", "openvino"],
                        help="CPU image encoder")
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-request-at-a-time run")
    parser.add_argument("--bound", action="store_true",
                        help="generate: after the runs, measure what one image costs in CPU time (VQ decode and "
                             "language-model steps, each alone on one thread) and print the images/s the cores "
                             "could make at most, next to the measured rates")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    kinds = args.kind.split(",")

    def requests_for(c):
        return args.requests or max(8, args.rounds * c)

    results: dict[tuple, dict] = {}
    if args.url:
        target = HTTPTarget(args.url, args.max_new_tokens, args.images, args.api_key)
        for kind in kinds:
            for c in levels:
                results[kind, c] = await run_level(target, kind, c, requests_for(c))
                print_row("http", kind, c, results[kind, c])
        return
    modes = [("batched", False)] + ([] if args.no_baseline else [("one-at-once", True)])
    for label, no_batching in modes:
        engine = await start_engine(args, no_batching)
        target = EngineTarget(engine, args.max_new_tokens, args.images)
        try:
            for kind in kinds:  # warm-up: first calls of each path are slower
                await run_level(target, kind, 1, 1)
            for kind in kinds:
                for c in levels:
                    results[label, kind, c] = stats = await run_level(target, kind, c, requests_for(c))
                    baseline = results.get(("batched", kind, c)) if no_batching else None
                    print_row(label, kind, c, stats)
                    if baseline:
                        print_row("  batched", kind, c, baseline, stats)
        finally:
            await engine.stop()
    if args.bound and "generate" in kinds:
        print_bound(args, levels, results)
    print("\nsummary (batched engine)")
    for kind in kinds:
        for key in keys(kind):
            base = results["batched", kind, levels[0]][key]
            for c in levels:
                value = results["batched", kind, c][key]
                print(f"  {kind:<10} c={c:<3} {key} {value:8.3f}  x{value / base:5.2f} vs c={levels[0]}")


def generation_cost(model_path: str, concurrencies: list[int], rounds: int = 3) -> dict:
    """CPU seconds one image costs, measured in this process with nothing else running.

    vq: the one-thread OpenVINO VQ decode of one image, as the worker's VQ thread runs it
    while rows are stepping. lm[c]: c image requests prefilled and stepped to their last
    code together in one DecodeBatch on one Paddle thread (as the worker steps janus-tiny),
    divided by c. Left out: the API process's work, so the bound
    cores / (vq + lm[c]) is one the server cannot reach, only approach.
    """
    import paddle

    from model.cpu_engine import CpuVQDecoder
    from model.generation import IMAGE_TOKENS, DecodeBatch, image_seeds
    from model.loader import load_model
    from model.processor import JanusProcessor
    from model.runtime.cpu import limit_blas_threads, use_cpu_threads
    from timing import median_seconds  # bench/timing.py

    paddle.set_device("cpu")
    limit_blas_threads()
    use_cpu_threads(1)
    model = load_model(model_path)
    processor = JanusProcessor.from_folder(model_path)
    prompt_ids = processor.encode_generation("a watercolor of a lighthouse")
    decoder = CpuVQDecoder(model, single_thread_copy=True)
    codes = np.random.default_rng(0).integers(0, model.config.gen_vision.codebook_size, (1, IMAGE_TOKENS))
    cost = {"vq": median_seconds(lambda: decoder.decode(codes, single_thread=True), rounds), "lm": {}}
    for c in concurrencies:
        batch = DecodeBatch(model, slots=2 * c, max_len=len(prompt_ids) + IMAGE_TOKENS)

        def images():
            for key in range(c):
                batch.add_images(key, prompt_ids, pad_id=processor.pad_id, n=1, seeds=image_seeds(key, 1))
            while len(batch):
                batch.step()

        cost["lm"][c] = median_seconds(images, rounds) / c
    return cost


def print_bound(args, levels: list[int], results: dict) -> None:
    from model.hub import resolve_model

    cores = len(os.sched_getaffinity(0))
    cost = generation_cost(resolve_model(args.model, args.home, offline=True), levels)
    lm = ", ".join(f"c={c} {cost['lm'][c]:.3f}" for c in levels)
    print(f"\ngeneration bound on {cores} cores: an image costs a one-thread VQ decode of {cost['vq']:.3f} s "
          f"and language-model steps of ({lm}) s, each measured alone")
    base = results["batched", "generate", levels[0]]["images_per_s"]
    for c in levels:
        bound = cores / (cost["vq"] + cost["lm"][c])
        measured = results["batched", "generate", c]["images_per_s"]
        print(f"  generate   c={c:<3} at most {bound:6.3f} img/s, x{bound / base:5.2f} the measured c={levels[0]}; "
              f"measured {measured:6.3f} img/s, {measured / bound:4.0%} of the bound", flush=True)


def keys(kind: str) -> list[str]:
    """The throughput figures a kind is judged by."""
    return {"understand": ["tokens_per_s"], "generate": ["images_per_s"],
            "mixed": ["tokens_per_s", "images_per_s"]}[kind]


if __name__ == "__main__":
    asyncio.run(main())

"""Decode-step latency of the full-size Janus-1.3B language model (random weights), against a memory floor.

    .venv/bin/python bench/decode_bench.py --batches 2,8,32 --steps 8 --context 64

Builds the 'deepseek-ai/Janus-1.3B' preset lazily and fills only what a text-to-image
decode step reads (decoder layers, final norm, gen_aligner, gen_embed, gen_head), in
float32 on CPU. Per batch size: a prefill of --context tokens (one row, copied to the
others), then --steps decode steps (embed_image_tokens -> forward_hidden -> image_logits);
prints the median.

The floor is the bytes a step must read (weights + the used KV cache) divided by the
memory bandwidth measured in the same run with a large numpy copy (a copy reads and
writes every byte, so bandwidth = 2 x bytes / time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # Paddle pins 1 thread unless told
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from model.config import JanusConfig  # noqa: E402
from model.janus import JanusModel  # noqa: E402
from model.loader import keep_freed_memory  # noqa: E402


def build_model(name: str, seed: int) -> tuple[JanusModel, int]:
    """The preset with random decode-path weights; returns it and the bytes one decode step reads."""
    config = JanusConfig.from_name(name)
    with paddle.LazyGuard():
        model = JanusModel(config)
    parts = [model.language_model.model.layers, model.language_model.model.norm, model.gen_embed,
             model.gen_aligner, model.gen_head]
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 22, dtype=np.float32)  # tiled: drawing 1.3 B normals would take longer than the bench
    step_bytes = 0
    for part in parts:
        for name_, param in part.named_parameters():
            shape = list(param.shape)
            if len(shape) == 1:
                value = np.ones(shape, np.float32) if "norm" in name_ else np.zeros(shape, np.float32)
            else:
                value = np.resize(pool, shape) * np.float32(1.0 / np.sqrt(shape[0]))
            param.set_value(value)
            param.stop_gradient = True
            if part is not model.gen_embed:  # an embedding step reads one row, not the table
                step_bytes += value.nbytes
    model.eval()
    return model, step_bytes


def copy_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Memory traffic (read + write) per second of np.copyto on an array much larger than the caches."""
    src = np.ones(int(gigabytes * 2**30) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def time_decode(model: JanusModel, batch: int, context: int, steps: int, block_size: int) -> list[float]:
    hidden_size = model.config.hidden_size
    cache = model.new_cache(batch, context + steps + 1, block_size=block_size)
    slots = np.arange(batch)
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, context, hidden_size), dtype=np.float32)
    model.image_logits(model.forward_hidden(prompt, cache, [0], [0])[:, -1:])
    # Prefill one row and copy its cache to the others: a batched prefill costs minutes on CPU.
    for k, v in zip(cache.k, cache.v):
        k[:, 1:] = k[:, :1]
        v[:, 1:] = v[:, :1]
    codes = np.zeros((batch, 1), np.int64)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        embeds = model.embed_image_tokens(codes)
        hidden = model.forward_hidden(embeds, cache, slots, np.full(batch, context + step))
        logits = model.image_logits(hidden).numpy()
        times.append(time.perf_counter() - start)
        codes = logits.argmax(-1).astype(np.int64)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek-ai/Janus-1.3B")
    parser.add_argument("--batches", default="2,8,32", help="comma-separated batch sizes (rows)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per batch size")
    parser.add_argument("--context", type=int, default=64, help="tokens cached before the timed steps")
    parser.add_argument("--block-size", type=int, default=64, help="KV cache block size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings alone")
    parser.add_argument("--paddle-matmul", action="store_true",
                        help="keep the projections in Paddle's matmul (llama.linear sends the large ones to numpy)")
    args = parser.parse_args()
    if args.paddle_matmul:
        import model.llama as llama

        llama.CPU_NUMPY_LINEAR = False
    batches = [int(b) for b in args.batches.split(",")]
    if not args.default_malloc:
        keep_freed_memory()  # as load_model does on CPU

    start = time.perf_counter()
    model, weight_bytes = build_model(args.model, args.seed)
    print(f"{args.model}: random float32 decode-path weights in {time.perf_counter() - start:.1f} s, "
          f"{weight_bytes / 1e9:.2f} GB read per step; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"MKL_DEBUG_CPU_TYPE={os.environ.get('MKL_DEBUG_CPU_TYPE', 'unset')}; projections in "
          f"{'Paddle' if args.paddle_matmul else 'numpy when large (llama.linear)'}")
    bandwidth = copy_bandwidth()
    print(f"memory bandwidth (numpy copy, read + write): {bandwidth / 1e9:.1f} GB/s")
    lm = model.config.language
    kv_bytes_per_token = 2 * lm.num_hidden_layers * lm.num_key_value_heads * lm.head_dim * 4
    print(f"{'batch':>5} {'median ms/step':>15} {'min':>8} {'floor ms':>9} {'step/floor':>10}")
    for batch in batches:
        times = time_decode(model, batch, args.context, args.steps, args.block_size)
        # The cache is read in whole blocks up to the current position.
        blocks = -(-(args.context + args.steps) // args.block_size)
        kv_bytes = batch * blocks * args.block_size * kv_bytes_per_token
        floor = (weight_bytes + kv_bytes) / bandwidth
        median = statistics.median(times)
        print(f"{batch:>5} {median * 1e3:>15.1f} {min(times) * 1e3:>8.1f} {floor * 1e3:>9.1f} {median / floor:>10.2f}")


if __name__ == "__main__":
    main()

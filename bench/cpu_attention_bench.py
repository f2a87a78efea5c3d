"""Decode attention over the blocked KV cache on CPU: Paddle's path against the numpy one.

    .venv/bin/python bench/cpu_attention_bench.py

Times one layer's attention of one new token per row (the decode step) through
model.llama.Attention with CPU_NUMPY_ATTENTION off (Paddle: gather of the rows' blocks,
batched matmuls) and on (model/cpu_attention.py: numpy on zero-copy views of the cache),
for Janus-1.3B's attention shape and janus-tiny's, at several batch sizes and cached lengths.
Prints medians and the ratio, measured in the same run.
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

import model.llama as llama  # noqa: E402
from model.config import LlamaConfig  # noqa: E402

SHAPES = {  # name: (hidden, heads, kv_heads)
    "janus-1.3b": (2048, 16, 16),
    "janus-tiny": (64, 4, 4),
}


def time_attention(config: LlamaConfig, batch: int, context: int, slots: int, repeats: int) -> float:
    model = llama.LlamaModel(config)  # one layer
    model.eval()
    attention = model.layers[0].self_attn
    cache = llama.KVCache(1, slots, context + 8, config.num_key_value_heads, config.head_dim)
    rng = np.random.default_rng(0)
    for tensor in cache.k + cache.v:
        tensor.set_value(rng.standard_normal(tensor.shape, dtype=np.float32))
    x = paddle.to_tensor(rng.standard_normal((batch, 1, config.hidden_size), dtype=np.float32))
    rows = np.arange(1, 1 + batch)  # not every slot: the general case
    times = []
    with paddle.no_grad():
        for i in range(repeats + 2):
            step = model._step(cache, rows, np.full(batch, context), batch, 1)
            start = time.perf_counter()
            attention(x, cache.k[0], cache.v[0], step)
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="2,8,16")
    parser.add_argument("--contexts", default="64,640")
    parser.add_argument("--slots", type=int, default=32, help="cache rows (the worker's max_batch_rows)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; one layer, one new token per row; median ms")
    print(f"{'shape':<11} {'batch':>5} {'context':>7} {'paddle':>9} {'numpy':>9} {'ratio':>6}")
    for name, (hidden, heads, kv_heads) in SHAPES.items():
        config = LlamaConfig(vocab_size=16, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                             num_attention_heads=heads, num_key_value_heads=kv_heads)
        for batch in (int(b) for b in args.batches.split(",")):
            for context in (int(c) for c in args.contexts.split(",")):
                result = {}
                for flag in (False, True):
                    llama.CPU_NUMPY_ATTENTION = flag
                    result[flag] = time_attention(config, batch, context, args.slots, args.repeats)
                print(f"{name:<11} {batch:>5} {context:>7} {result[False] * 1e3:>9.2f} {result[True] * 1e3:>9.2f} "
                      f"{result[False] / result[True]:>6.1f}", flush=True)


if __name__ == "__main__":
    main()

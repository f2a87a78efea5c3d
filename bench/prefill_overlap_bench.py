"""Decode steps while another thread prefills a long prompt: the CPU worker's prefill thread, measured.

    .venv/bin/python bench/prefill_overlap_bench.py                 # full-size Janus-1.3B LM, random weights
    .venv/bin/python bench/prefill_overlap_bench.py --layers 4      # a quick look

The CPU runtime (model/runtime/cpu.py) prefills understanding prompts in a thread
while the worker's loop keeps stepping the running rows. This times, in one run and on the same
cache: a prompt's prefill alone; decode steps of the running rows alone; and both at once,
steps on the loop's thread and the prefill in another, with Paddle's threads and the large
numpy products' threads (each one setting for the process) at half the cores, as the
runtime sets them. Without the thread, every running row would wait for the
whole prefill. Prints medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # Paddle pins 1 thread unless told
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from cpu_decode_floor import build_model, fill_cache  # noqa: E402
from model import cpu_blas  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the 24 of Janus-1.3B")
    parser.add_argument("--prompt", type=int, default=620, help="prompt tokens (576 image + a question)")
    parser.add_argument("--rows", type=int, default=2, help="running rows stepping meanwhile")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = int(os.environ["OMP_NUM_THREADS"])
    cpu_blas.configure(gemm_threads=cores, small_threads=1)  # as the worker sets numpy's BLAS
    model = build_model(layers=args.layers)
    hidden = model.config.hidden_size
    cache = model.new_cache(args.rows + 1, args.prompt + 64, dtype="float32")
    fill_cache(cache, args.rows, 64)
    rng = np.random.default_rng(3)
    prompt = paddle.to_tensor(rng.standard_normal((1, args.prompt, hidden)).astype(np.float32))
    token = paddle.to_tensor(rng.standard_normal((args.rows, 1, hidden)).astype(np.float32))
    rows, starts = list(range(args.rows)), [64] * args.rows

    def prefill():
        with paddle.no_grad():
            model(prompt, cache, [args.rows], [0]).numpy()

    def step():
        with paddle.no_grad():
            model(token, cache, rows, starts).numpy()

    def timed(call) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    step(), prefill()  # warm-up
    prefill_alone = statistics.median(timed(prefill) for _ in range(args.rounds))
    step_alone = statistics.median(timed(step) for _ in range(max(5, args.rounds)))
    overlapped_steps, overlapped_prefills = [], []
    for _ in range(args.rounds):
        done = threading.Event()
        took = []

        def in_thread():
            took.append(timed(prefill))
            done.set()

        paddle.base.core.set_num_threads(max(1, cores // 2))
        cpu_blas.configure(gemm_threads=max(1, cores // 2), small_threads=1)
        worker = threading.Thread(target=in_thread)
        worker.start()
        while not done.is_set():
            overlapped_steps.append(timed(step))
        worker.join()
        overlapped_prefills.extend(took)
        paddle.base.core.set_num_threads(cores)
        cpu_blas.configure(gemm_threads=cores, small_threads=1)
    print(f"{model.config.num_hidden_layers} layers, hidden {hidden}, {cores} cores; prompt {args.prompt} tokens, "
          f"{args.rows} running rows; medians of {args.rounds} rounds")
    print(f"prefill alone:                         {prefill_alone:8.2f} s")
    print(f"decode step alone:                     {step_alone * 1e3:8.1f} ms")
    print(f"prefill in a thread, steps meanwhile:  {statistics.median(overlapped_prefills):8.2f} s, "
          f"{len(overlapped_steps) / args.rounds:.0f} steps of {statistics.median(overlapped_steps) * 1e3:.1f} ms each")
    print(f"inline, the running rows would wait    {prefill_alone:8.2f} s for each such prompt")


if __name__ == "__main__":
    main()

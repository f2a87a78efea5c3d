"""ms per decode step of the full-size Janus-1.3B LM on CPU, float32, next to the memory floor.

In ONE run (so that ratios share the machine's current speed):
  floor   = weight bytes read per step / bandwidth of a large array copy
            (numpy copy of a 1 GiB array; bandwidth counts bytes read + written, as STREAM
            Copy does; the faster of one and two copying threads, median of several)
  eager   = model.forward_hidden through Paddle eager (MKL), batch 2 and 8, 64 cached tokens
  engine  = model/cpu_engine.py CpuDecodeEngine (Paddle Inference + OpenVINO, fp32), same steps
Prints medians and ratios step/floor (against the median floor, and paired with the floor
measured in the same round), and the engine's error against eager. Each timed step follows
0.3 s of rest; eager runs with Intel OpenMP's default blocktime (200 ms), the engine with 0.

    OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_decode_floor.py [--engines openvino,onednn,plain]

Needs about 17 GB of RAM for the default (eager weights + OpenVINO's copy) and a few
minutes; each extra engine adds a full copy of the weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before paddle is imported

import numpy as np  # noqa: E402
import paddle  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.config import JanusConfig  # noqa: E402
from model.cpu_engine import CpuDecodeEngine, quiet_openmp  # noqa: E402
from model.llama import LlamaModel  # noqa: E402


def build_model(seed: int = 0, layers: int | None = None) -> LlamaModel:
    """Full-size LM with random weights, initialised from numpy (paddle's initialisers take minutes)."""
    config = JanusConfig.from_name("deepseek-ai/Janus-1.3B").language
    if layers:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    paddle.nn.initializer.set_global_initializer(paddle.nn.initializer.Constant(0.0))
    try:
        model = LlamaModel(config)
    finally:
        paddle.nn.initializer.set_global_initializer(None)
    model.eval()
    del model.embed_tokens  # 0.8 GB the bench never reads: it feeds embeddings directly
    rng = np.random.default_rng(seed)
    # A random block tiled with a period prime to every width: random-looking weights in seconds.
    base = rng.standard_normal((1 << 22) + 7).astype(np.float32)
    for name, param in model.named_parameters():
        if len(param.shape) == 1:
            param.set_value(np.float32(1.0) + np.float32(0.1) * np.resize(base[int(rng.integers(1 << 20)):], param.shape))
        else:
            std = np.float32(1.0 / np.sqrt(param.shape[0]))
            param.set_value(std * np.resize(base[int(rng.integers(1 << 20)):], param.shape))
    return model


def step_weight_bytes(model: LlamaModel) -> int:
    """Bytes one decode step must read: every layer weight and the final norm."""
    return sum(int(np.prod(p.shape)) * 4 for p in model.parameters())


def copy_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> dict:  # a 1.07 GB array
    """GB/s of a numpy copy of a large float32 array (read + written bytes), with 1 and 2 threads."""
    src = np.ones(size_bytes // 4, np.float32)
    dst = np.empty_like(src)
    result = {}
    for threads in (1, 2):
        chunk = src.size // threads
        parts = [slice(i * chunk, (i + 1) * chunk) for i in range(threads)]

        def copy():
            if threads == 1:
                np.copyto(dst, src)
                return
            workers = [threading.Thread(target=np.copyto, args=(dst[p], src[p])) for p in parts]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

        copy()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            copy()
            times.append(time.perf_counter() - started)
        result[threads] = 2 * src.nbytes / float(np.median(times)) / 1e9
    return result


def fill_cache(cache, rows: int, cached: int, seed: int = 1) -> None:
    """Random keys/values at positions 0..cached-1 of the first `rows` slots (no prefill needed to time a step)."""
    rng = np.random.default_rng(seed)
    bs = cache.block_size
    for tensor in cache.k + cache.v:
        view = np.from_dlpack(tensor)  # [blocks, slots, kv_heads, block, D], shared with the tensor
        for pos0 in range(0, cached, bs):
            n = min(bs, cached - pos0)
            view[pos0 // bs, :rows, :, :n] = rng.standard_normal(view[0, :rows, :, :n].shape).astype(np.float32)


def median_ms(times) -> float:
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="2,8")
    parser.add_argument("--cached", type=int, default=64, help="tokens already in the cache of every row")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per (engine, batch)")
    parser.add_argument("--engines", default="openvino", help="comma list of openvino, onednn, plain")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick check of the bench")
    parser.add_argument("--after-eager-head", action="store_true",
                        help="also time engine steps right after an eager gen_head-sized matmul, "
                             "with OpenMP blocktime 0 (+head) and 200 ms, its default (+head/spin)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    threads = int(os.environ["OMP_NUM_THREADS"])
    print(f"paddle {paddle.__version__}, OMP_NUM_THREADS={threads}, cpus {os.cpu_count()}", flush=True)

    started = time.perf_counter()
    model = build_model(layers=args.layers)
    weight_bytes = step_weight_bytes(model)
    print(f"model built in {time.perf_counter() - started:.0f} s; weight bytes per step {weight_bytes / 1e9:.3f} GB",
          flush=True)
    cache = model.new_cache(max(batches), args.cached + 8, dtype="float32")
    fill_cache(cache, max(batches), args.cached)
    rng = np.random.default_rng(2)
    embeds = {b: paddle.to_tensor(rng.standard_normal((b, 1, model.config.hidden_size)).astype(np.float32))
              for b in batches}
    slots = {b: list(range(b)) for b in batches}
    start = {b: [args.cached] * b for b in batches}

    # name -> (step function, OpenMP blocktime in ms, what runs untimed right before the step)
    head = paddle.to_tensor(rng.standard_normal((model.config.hidden_size, 16384)).astype(np.float32) * 0.02)

    def eager_head(b):  # an eager matmul of gen_head's size, as the worker runs between two steps
        (paddle.ones([b, model.config.hidden_size]) @ head).numpy()

    runners = {}
    if not args.no_eager:
        def eager(b):
            with paddle.no_grad():
                return model(embeds[b], cache, slots[b], start[b]).numpy()
        runners["eager"] = (eager, 200, None)
    for name in engines:
        started = time.perf_counter()
        engine = CpuDecodeEngine(model, threads=threads, engine=name)
        print(f"{name}: built in {time.perf_counter() - started:.0f} s", flush=True)
        run = (lambda e: lambda b: e.forward_hidden(embeds[b], cache, slots[b], start[b]).numpy())(engine)
        runners[name] = (run, 0, None)
        if args.after_eager_head:
            runners[name + "+head"] = (run, 0, eager_head)
            runners[name + "+head/spin"] = (run, 200, eager_head)

    # Exactness against eager at the same inputs (each step rewrites the same cache position).
    if "eager" in runners:
        for b in batches:
            reference = runners["eager"][0](b)
            for name in engines:
                out = runners[name][0](b)
                err = float(np.abs(out - reference).max() / np.abs(reference).max())
                print(f"{name} batch {b}: max |engine - eager| / max |eager| = {err:.2e}", flush=True)

    times = {(name, b): [] for name in runners for b in batches}
    bandwidth = {1: [], 2: []}
    for run, _, _ in runners.values():  # warm-up: first calls allocate
        for b in batches:
            run(b)
    for _ in range(args.rounds):
        for threads_bw, value in copy_bandwidth().items():
            bandwidth[threads_bw].append(value)
        for b in batches:
            for name, (run, blocktime, before) in runners.items():
                quiet_openmp(blocktime)
                time.sleep(0.3)  # let the previous runner's spinning OpenMP/TBB threads go idle
                if before is not None:
                    before(b)
                t0 = time.perf_counter()
                run(b)
                times[(name, b)].append(time.perf_counter() - t0)

    bw = {t: float(np.median(v)) for t, v in bandwidth.items()}
    best = max(bw.values())
    floor_ms = weight_bytes / (best * 1e9) * 1e3
    round_floor_ms = weight_bytes / np.maximum(bandwidth[1], bandwidth[2]) / 1e6  # each round's own floor
    print()
    print(f"copy bandwidth (read+write, median of {args.rounds}): 1 thread {bw[1]:.1f} GB/s, "
          f"2 threads {bw[2]:.1f} GB/s")
    print(f"floor = {weight_bytes / 1e9:.3f} GB / {best:.1f} GB/s = {floor_ms:.0f} ms per step "
          f"(rounds: {' '.join(f'{f:.0f}' for f in round_floor_ms)})")
    print(f"{'runner':>22} {'batch':>5} {'median ms':>10} {'min':>7} {'max':>7} {'x floor':>8} "
          f"{'x round floor':>14} {'vs eager':>9}")
    for b in batches:
        for name in runners:
            t = np.array(times[(name, b)])
            speedup = ""
            if "eager" in runners and name != "eager":
                speedup = f"{np.median(times[('eager', b)]) / np.median(t):.2f}x"
            paired = float(np.median(t * 1e3 / round_floor_ms))
            print(f"{name:>22} {b:>5} {median_ms(t):>10.1f} {t.min() * 1e3:>7.1f} {t.max() * 1e3:>7.1f} "
                  f"{median_ms(t) / floor_ms:>8.2f} {paired:>14.2f} {speedup:>9}")


if __name__ == "__main__":
    main()

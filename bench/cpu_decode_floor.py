"""ms per decode step of the full-size Janus-1.3B LM on CPU, float32, next to the memory floor.

In ONE run (so that ratios share the machine's current speed):
  floor   = weight bytes read per step / bandwidth of a large array copy
            (numpy copy of a 1 GiB array; bandwidth counts bytes read + written, as STREAM
            Copy does; the faster of one and two copying threads, median of several)
  read    = for reference, the same bytes read without writing (two threads summing halves
            of the array): what a step would take if it did nothing but read its weights
  eager   = model.forward_hidden through Paddle eager (MKL), batch 2 and 8, 64 cached tokens
  engine  = model/cpu_engine.py CpuDecodeEngine (Paddle Inference + OpenVINO, fp32), same steps
Prints medians and ratios step/floor (against the median floor, and paired with the floor
measured in the same round), and the engine's error against eager. On a shared machine the
last columns keep only the steps during which other processes used < 0.1 core (/proc/stat).
Each timed step follows 0.3 s of rest.

    OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_decode_floor.py [--engines openvino,onednn,plain]

Eager is timed first; building the engine then frees the eager layer weights
(release_eager_weights), so the default needs about 12 GB of RAM at peak and a few minutes;
--keep-eager interleaves eager with the engine instead (about 17 GB).
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
from model.cpu_engine import CpuDecodeEngine  # noqa: E402
from model.llama import LlamaModel  # noqa: E402
from timing import median_seconds  # noqa: E402  (bench/timing.py)


QUIET = 0.1  # a step counts as quiet when other processes took under a tenth of a core meanwhile


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


def in_threads(function, argument_lists) -> None:
    """function(*arguments) for each of `argument_lists` on its own thread (numpy releases the GIL), all joined."""
    workers = [threading.Thread(target=function, args=arguments) for arguments in argument_lists]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


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
            in_threads(np.copyto, [(dst[p], src[p]) for p in parts])

        result[threads] = 2 * src.nbytes / median_seconds(copy, repeats) / 1e9
    # For reference, not the floor: reading alone (no writes), a sum over each half on its own thread,
    # and weight streaming by a library kernel (OpenBLAS sgemv, numpy's threads).
    halves = [(src[: src.size // 2],), (src[src.size // 2:],)]

    def read():
        in_threads(np.add.reduce, halves)

    result["read"] = src.nbytes / median_seconds(read, repeats) / 1e9
    matrix, vector = src.reshape(-1, 2048), np.ones(2048, np.float32)
    result["gemv"] = src.nbytes / median_seconds(lambda: matrix @ vector, repeats) / 1e9
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


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, steal included; ticks of this process), in USER_HZ."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])


def foreign_load(before: tuple[int, int], after: tuple[int, int], seconds: float) -> float:
    """Cores' worth of CPU that other processes (or the hypervisor) took during an interval."""
    hz = os.sysconf("SC_CLK_TCK")
    return ((after[0] - before[0]) - (after[1] - before[1])) / hz / seconds


def median_ms(times) -> float:
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="2,8")
    parser.add_argument("--cached", type=int, default=64, help="tokens already in the cache of every row")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per (runner, batch)")
    parser.add_argument("--engines", default="openvino", help="comma list of plain, onednn, openvino (run in turn)")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--keep-eager", action="store_true",
                        help="keep the eager weights and interleave eager with the last engine (+4.9 GB)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick check of the bench")
    parser.add_argument("--after-eager-head", action="store_true",
                        help="also time engine steps right after an eager gen_head-sized matmul (+head), "
                             "as in the worker's loop, where MKL's OpenMP threads may still spin")
    parser.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens (batch 1)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    engines = sorted((e for e in args.engines.split(",") if e), key=lambda e: e == "openvino")
    threads = int(os.environ["OMP_NUM_THREADS"])
    print(f"paddle {paddle.__version__}, OMP_NUM_THREADS={threads}, cpus {os.cpu_count()}", flush=True)

    started = time.perf_counter()
    model = build_model(layers=args.layers)
    weight_bytes = step_weight_bytes(model)
    hidden = model.config.hidden_size
    print(f"model built in {time.perf_counter() - started:.0f} s; weight bytes per step {weight_bytes / 1e9:.3f} GB",
          flush=True)
    cache = model.new_cache(max(batches), args.cached + 8, dtype="float32")
    fill_cache(cache, max(batches), args.cached)
    rng = np.random.default_rng(2)
    embeds = {b: paddle.to_tensor(rng.standard_normal((b, 1, hidden)).astype(np.float32)) for b in batches}
    slots = {b: list(range(b)) for b in batches}
    start = {b: [args.cached] * b for b in batches}
    prefill_embeds = paddle.to_tensor(rng.standard_normal((1, max(args.prefill, 1), hidden)).astype(np.float32))
    prefill_cache = model.new_cache(1, max(args.prefill, 1), dtype="float32") if args.prefill else None
    head = paddle.to_tensor(rng.standard_normal((hidden, 16384)).astype(np.float32) * 0.02)

    def eager_head(b):  # an eager matmul of gen_head's size, as the worker runs between two steps
        (paddle.ones([b, hidden]) @ head).numpy()

    def eager_step(b):
        with paddle.no_grad():
            return model(embeds[b], cache, slots[b], start[b]).numpy()

    def eager_prefill():
        with paddle.no_grad():
            return model(prefill_embeds, prefill_cache, [0], [0]).numpy()

    times: dict = {}
    bandwidth: dict = {1: [], 2: [], "read": [], "gemv": []}
    paired: dict = {}  # (runner, batch) -> step time / floor of the same round
    foreign: dict = {}  # (runner, batch) -> cores other processes used during the step
    prefill_times: dict = {}
    reference: dict = {}

    def measure(runners: dict, prefills: dict) -> None:
        """runners: name -> (step(b), untimed call right before the step or None)."""
        for run, _ in runners.values():  # warm-up: first calls allocate
            for b in batches:
                run(b)
        for _ in range(args.rounds):
            bw = copy_bandwidth()
            for t, value in bw.items():
                bandwidth[t].append(value)
            floor = weight_bytes / max(bw[1], bw[2]) / 1e9
            for b in batches:
                for name, (run, before) in runners.items():
                    time.sleep(0.3)  # let the previous runner's spinning OpenMP/TBB threads go idle
                    if before is not None:
                        before(b)
                    ticks = cpu_ticks()
                    t0 = time.perf_counter()
                    run(b)
                    elapsed = time.perf_counter() - t0
                    times.setdefault((name, b), []).append(elapsed)
                    paired.setdefault((name, b), []).append(elapsed / floor)
                    foreign.setdefault((name, b), []).append(foreign_load(ticks, cpu_ticks(), elapsed))
        for name, run in prefills.items():
            for _ in range(3):
                t0 = time.perf_counter()
                run()
                prefill_times.setdefault(name, []).append(time.perf_counter() - t0)

    eager_runners = {} if args.no_eager else {"eager": (eager_step, None)}
    eager_prefills = {"eager": eager_prefill} if args.prefill and not args.no_eager else {}
    if eager_runners:
        for b in batches:
            reference[b] = eager_step(b)
        if args.prefill:
            reference["prefill"] = eager_prefill()
        if not args.keep_eager:
            measure(eager_runners, eager_prefills)
    for index, name in enumerate(engines):
        last = index == len(engines) - 1
        release = last and not args.keep_eager  # frees 4.9 GB: eager is measured before this point
        started = time.perf_counter()
        engine = CpuDecodeEngine(model, threads=threads, engine=name, release_eager_weights=release)
        print(f"{name}: built in {time.perf_counter() - started:.0f} s", flush=True)

        def run(b, engine=engine):
            return engine.forward_hidden(embeds[b], cache, slots[b], start[b]).numpy()

        for b in batches:
            if b in reference:  # each step rewrites the same cache position: same inputs, same answer
                err = float(np.abs(run(b) - reference[b]).max() / np.abs(reference[b]).max())
                print(f"{name} batch {b}: max |engine - eager| / max |eager| = {err:.2e}", flush=True)
        runners = {name: (run, None)}
        if args.after_eager_head:
            runners[name + "+head"] = (run, eager_head)
        prefills = {}
        if args.prefill:
            prefills[name] = lambda engine=engine: engine.forward_hidden(prefill_embeds, prefill_cache, [0], [0]).numpy()
            if "prefill" in reference:
                err = float(np.abs(prefills[name]() - reference["prefill"]).max() / np.abs(reference["prefill"]).max())
                print(f"{name} prefill {args.prefill}: max |engine - eager| / max |eager| = {err:.2e}", flush=True)
        if last and args.keep_eager:
            runners = {**eager_runners, **runners}
            prefills = {**eager_prefills, **prefills}
        measure(runners, prefills)
        if not last:
            del engine, run  # Paddle Inference frees a plain/oneDNN predictor's weights with it

    bw = {t: float(np.median(v)) for t, v in bandwidth.items()}
    best = max(bw[1], bw[2])
    floor_ms = weight_bytes / (best * 1e9) * 1e3
    print()
    print(f"copy bandwidth (read+write, median of {len(bandwidth[1])} rounds): 1 thread {bw[1]:.1f} GB/s, "
          f"2 threads {bw[2]:.1f} GB/s")
    print(f"floor = {weight_bytes / 1e9:.3f} GB / {best:.1f} GB/s = {floor_ms:.0f} ms per step")
    read_ms = weight_bytes / bw["read"] / 1e6
    print(f"(for reference: reading alone, two threads summing a 1 GiB array, runs at {bw['read']:.1f} GB/s: "
          f"{read_ms:.0f} ms for the weights, {read_ms / floor_ms:.2f}x the floor, before any arithmetic;")
    print(f" OpenBLAS sgemv reads a 1 GiB matrix at {bw['gemv']:.1f} GB/s: "
          f"{weight_bytes / bw['gemv'] / 1e6:.0f} ms for the weights, {weight_bytes / bw['gemv'] / 1e6 / floor_ms:.2f}x)")
    print(f"{'runner':>22} {'batch':>5} {'median ms':>10} {'min':>7} {'max':>7} {'x floor':>8} "
          f"{'x round floor':>14} {'vs eager':>9} {'quiet steps':>12} {'quiet median':>13} {'x floor':>8}")
    for b in batches:
        for name in dict.fromkeys(n for n, bb in times if bb == b):
            t = np.array(times[(name, b)])
            speedup = ""
            if ("eager", b) in times and name != "eager":
                speedup = f"{np.median(times[('eager', b)]) / np.median(t):.2f}x"
            quiet = t[np.array(foreign[(name, b)]) < QUIET]
            quiet_cols = f"{len(quiet):>5} of {len(t):<4}"
            if len(quiet):
                quiet_cols += f" {median_ms(quiet):>13.1f} {median_ms(quiet) / floor_ms:>8.2f}"
            print(f"{name:>22} {b:>5} {median_ms(t):>10.1f} {t.min() * 1e3:>7.1f} {t.max() * 1e3:>7.1f} "
                  f"{median_ms(t) / floor_ms:>8.2f} {np.median(paired[(name, b)]):>14.2f} {speedup:>9} {quiet_cols}")
    for name, t in prefill_times.items():
        print(f"prefill {args.prefill} tokens, {name}: median {np.median(t):.2f} s (min {min(t):.2f})")


if __name__ == "__main__":
    main()

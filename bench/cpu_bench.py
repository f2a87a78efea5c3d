"""The CPU decoder (model/cpu_decoder.py) in every precision this CPU runs, against the official code and the
memory floor, on Janus-1.3B's language model (random weights), in one run.

    .venv/bin/python bench/cpu_bench.py [--peer /path/to/python] [--json]
    .venv/bin/python bench/cpu_bench.py --modes exact,int8 --rows 2,8 --cached 64 --layers 4   # a quick look

Each mode runs in its own process, one after the other (never two at once: memory), and so does
each peer run. A mode's process builds the model, times eager Paddle on the same inputs first
(the reference), builds the decoder (freeing the eager layers), then times:
- a decode step at each --rows x --cached (median of --rounds; every step rewrites the same
  cache position, so all see the same inputs);
- a prefill of one --prefill-token prompt;
- the error against eager: max and mean relative error of image and text logits (random heads of
  the real sizes on the final hidden), and greedy agreement over --agree steps of image and
  text decoding, teacher-forced by eager's tokens so that one early miss does not decide the rest.
Its peak resident memory (VmHWM, which includes the build, when eager and programs coexist) and its
resident memory once serving (after the build) are reported too.

The floor: the bytes a step must read (the mode's weights) over the memory bandwidth measured in the
same process: the faster of a 2-thread read of a 1 GiB array and the official script's own
measure. With --peer PYTHON, ../shared/peer/official_cpu_step.py runs with that interpreter at
float32 and bfloat16 (2 rows: one image), after the modes; every figure is then also printed as
a ratio to the peer's.

--json: one JSON object per line (mode, rows, cached, decode_ms_median, peak_rss_bytes, ...; the
peer's lines carry impl "peer" and dtype).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # importing Paddle would pin it to 1
ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peer"


# ---- the parent: one process per mode, then the peer

def run_child(argv: list[str], timeout: float) -> list[dict]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-3000:])
        return [{"error": f"{' '.join(argv[:3])}... exited {done.returncode}", "seconds": time.perf_counter() - started}]
    return lines


def supported_modes(asked: list[str]) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from model.cpu_decoder import PrecisionUnavailable, check_precision

    modes = []
    for mode in asked:
        try:
            check_precision(mode)
        except PrecisionUnavailable as error:
            print(f"# {mode}: skipped ({error})", file=sys.stderr)
            continue
        modes.append(mode)
    return modes


def parent(args) -> None:
    results = []
    for mode in supported_modes(args.modes.split(",")):
        argv = [sys.executable, __file__, "--child", mode, "--rows", args.rows, "--cached", args.cached,
                "--rounds", str(args.rounds), "--prefill", str(args.prefill), "--agree", str(args.agree)]
        if args.layers:
            argv += ["--layers", str(args.layers)]
        if args.vq_overlap and not results:
            argv += ["--vq-overlap", str(args.vq_overlap)]
        print(f"# {mode} ...", file=sys.stderr, flush=True)
        results += run_child(argv, args.timeout)
    if args.peer:
        for dtype in ("float32", "bfloat16"):
            print(f"# peer {dtype} ...", file=sys.stderr, flush=True)
            for task in ("generate", "understand"):
                for line in run_child([args.peer, str(PEER / "official_cpu_step.py"), "--janus-src", str(PEER),
                                       "--dtype", dtype, "--task", task, "--steps", "12"], args.timeout):
                    results.append({**line, "impl": "peer", "peer": line.get("impl"), "task": task})
    report(results, args.json)


def report(results: list[dict], as_json: bool) -> None:
    peer_steps = {r["dtype"]: r["decode_ms_median"] for r in results
                  if r.get("impl") == "peer" and r.get("task") == "generate" and "decode_ms_median" in r}
    for r in results:
        if r.get("kind") == "step":
            for dtype, ms in peer_steps.items():
                if r["rows"] == 2:
                    r[f"vs_peer_{dtype}"] = round(r["decode_ms_median"] / ms, 3)
    if as_json:
        for r in results:
            print(json.dumps(r))
        return
    for r in results:
        if "error" in r:
            print(f"ERROR {r['error']}")
    steps = [r for r in results if r.get("kind") == "step"]
    if steps:
        print(f"{'mode':<6} {'rows':>4} {'cached':>6} {'ms/step':>8} {'x floor':>8} {'x peer fp32':>11} "
              f"{'x peer bf16':>11}")
        for r in steps:
            print(f"{r['mode']:<6} {r['rows']:>4} {r['cached']:>6} {r['decode_ms_median']:>8.1f} "
                  f"{r['x_floor']:>8.2f} {r.get('vs_peer_float32', float('nan')):>11.2f} "
                  f"{r.get('vs_peer_bfloat16', float('nan')):>11.2f}")
    for r in results:
        if r.get("kind") == "mode":
            print(f"{r['mode']}: weights {r['weight_bytes'] / 1e9:.2f} GB, floor {r['floor_ms']:.0f} ms "
                  f"(read {r['read_gbs']:.1f} GB/s), built in {r['build_s']:.0f} s; prefill {r['prefill_tokens']} "
                  f"tokens {r['prefill_s']:.2f} s (eager {r['eager_prefill_s']:.2f} s); memory: peak "
                  f"{r['peak_rss_bytes'] / 1e9:.1f} GB, serving {r['serving_rss_bytes'] / 1e9:.1f} GB")
            print(f"    error vs eager: image logits max {r['image_logits_max_rel']:.1e} mean "
                  f"{r['image_logits_mean_rel']:.1e}, text logits max {r['text_logits_max_rel']:.1e} mean "
                  f"{r['text_logits_mean_rel']:.1e}; greedy agreement image {r['image_agree']:.3f}, "
                  f"text {r['text_agree']:.3f} over {r['agree_steps']} steps")
    for r in results:
        if r.get("kind") == "vq_overlap":
            print(f"VQ decode beside {r['rows']}-row steps ({r['step_ms_alone']} ms alone; one image "
                  f"{r['vq_s_alone_all_cores']} s on all cores, {r['vq_s_alone_one_core']} s on one):")
            for way in ("one_core", "all_cores"):
                w = r[f"beside_{way}"]
                print(f"    image on {way.replace('_', ' ')}: decoded in {w['vq_s']} s, {w['steps']} steps meanwhile "
                      f"({w['step_ms']} ms each); {w['x_one_after_the_other']}x the wall time of one after the other")
    for r in results:
        if r.get("impl") == "peer" and "decode_ms_median" in r:
            if r["task"] == "generate":
                print(f"peer {r['dtype']}: {r['decode_ms_median']:.1f} ms per step at {r['rows']} rows "
                      f"(floor {r['floor_ms']:.0f} ms by its own read bandwidth {r['read_bw_gbs']} GB/s), "
                      f"~{r['s_per_image_est']:.0f} s per image")
            else:
                print(f"peer {r['dtype']} understanding: first token {r['first_token_ms'] / 1e3:.1f} s, "
                      f"{r['decode_ms_median']:.0f} ms per token")


# ---- a child: one mode

def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import paddle

    from model.cpu_decoder import CpuDecoder
    from model.selfcheck import cpu_name, cpu_read_bandwidth, random_language_model

    mode = args.child
    rows_list = [int(r) for r in args.rows.split(",")]
    cached_list = [int(c) for c in args.cached.split(",")]
    model = random_language_model(args.layers)
    hidden = model.config.hidden_size
    rng = np.random.default_rng(1)
    # Random heads of the real sizes: logits are where an error shows to a user.
    image_head = (rng.standard_normal((hidden, 16384), np.float32) / np.sqrt(hidden)).astype(np.float32)
    text_head = np.resize(image_head, (hidden, 102400))
    embed_table = (rng.standard_normal((16384, hidden), np.float32)).astype(np.float32)
    most_rows, longest = max(rows_list), max(cached_list)

    # A small cache (2 rows) for the comparisons with eager, a full one for the timings, made after the
    # decoder has freed the eager layers (Janus-1.3B: 32 rows of 600 positions are 7.6 GB).
    small = random_cache(model, 2, longest + args.agree + 2)
    embeds = {b: rng.standard_normal((b, 1, hidden), np.float32) for b in rows_list}
    two = rng.standard_normal((2, 1, hidden), np.float32)
    prompt = rng.standard_normal((1, args.prefill, hidden), np.float32)
    prefill_cache = model.new_cache(1, args.prefill, dtype="float32")

    def eager_forward(x, target, slots, start):
        with paddle.no_grad():
            return model(paddle.to_tensor(x), target, slots, start).numpy()

    def fast_forward(x, target, slots, start):
        return decoder.forward_hidden(x, target, slots, start).numpy()

    def greedy(forward, head, rows, steps, teacher=None):
        """Greedy decoding in `small` from position `longest`, feeding each step's argmax (or teacher's)."""
        x = embed_table[:rows][:, None]
        tokens, logits = [], []
        for step in range(steps):
            h = forward(x, small, list(range(rows)), [longest + step] * rows)[:, -1]
            logits.append(h @ head)
            tokens.append(logits[-1].argmax(-1))
            x = embed_table[(tokens[-1] if teacher is None else teacher[step]) % len(embed_table)][:, None]
        return np.array(tokens), np.array(logits)

    # Eager first: the reference, while its weights are there.
    reference = {c: eager_forward(two, small, [0, 1], [c, c]) for c in cached_list}
    started = time.perf_counter()
    eager_prefill = eager_forward(prompt, prefill_cache, [0], [0])
    eager_prefill_s = time.perf_counter() - started
    agree_rows = {"image": 2, "text": 1}
    heads = {"image": image_head, "text": text_head}
    eager_greedy = {kind: greedy(eager_forward, heads[kind], agree_rows[kind], args.agree) for kind in agree_rows}
    started = time.perf_counter()
    decoder = CpuDecoder(model, precision=mode, release_eager=True)
    build_s = time.perf_counter() - started
    serving_rss = rss_bytes("VmRSS")
    errors = {}
    for kind in agree_rows:
        want_tokens, want_logits = eager_greedy[kind]
        got_tokens, got_logits = greedy(fast_forward, heads[kind], agree_rows[kind], args.agree, teacher=want_tokens)
        rel = np.abs(got_logits - want_logits) / np.abs(want_logits).max(axis=-1, keepdims=True)
        errors[kind] = (float(rel.max()), float(rel.mean()), float((got_tokens == want_tokens).mean()))
    hidden_errors = {}
    for c in cached_list:
        got, want = fast_forward(two, small, [0, 1], [c, c]), reference[c]
        hidden_errors[c] = float(np.abs(got - want).max() / np.abs(want).max())
    small = None  # 2 rows: freed before the full cache is made
    read_gbs = cpu_read_bandwidth() / 1e9
    weight_bytes = decoder.weight_bytes
    floor_ms = weight_bytes / (read_gbs * 1e9) * 1e3
    cache = random_cache(model, most_rows, longest + 1)
    lines = []
    for b in rows_list:
        for c in cached_list:
            slots, start = list(range(b)), [c] * b
            times = []
            fast_forward(embeds[b], cache, slots, start)
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                fast_forward(embeds[b], cache, slots, start)
                times.append(time.perf_counter() - t0)
            ms = float(np.median(times)) * 1e3
            lines.append({"kind": "step", "mode": mode, "rows": b, "cached": c, "decode_ms_median": round(ms, 1),
                          "decode_ms_min": round(min(times) * 1e3, 1), "x_floor": round(ms / floor_ms, 2)})
    del cache
    started = time.perf_counter()
    got = decoder.forward_hidden(prompt, prefill_cache, [0], [0]).numpy()
    prefill_s = time.perf_counter() - started
    summary = {"kind": "mode", "mode": mode, "weight_bytes": weight_bytes, "read_gbs": round(read_gbs, 1),
               "floor_ms": round(floor_ms, 1), "build_s": round(build_s, 1), "prefill_tokens": args.prefill,
               "prefill_s": round(prefill_s, 2), "eager_prefill_s": round(eager_prefill_s, 2),
               "prefill_max_rel": float(np.abs(got - eager_prefill).max() / np.abs(eager_prefill).max()),
               "hidden_max_rel_2_rows": max(hidden_errors.values()),
               "image_logits_max_rel": errors["image"][0], "image_logits_mean_rel": errors["image"][1],
               "image_agree": errors["image"][2], "text_logits_max_rel": errors["text"][0],
               "text_logits_mean_rel": errors["text"][1], "text_agree": errors["text"][2],
               "agree_steps": args.agree, "serving_rss_bytes": serving_rss, "peak_rss_bytes": rss_bytes("VmHWM"),
               "layers": len(model.layers), "threads": decoder.threads, "cpu": cpu_name()}
    for line in lines:
        line["peak_rss_bytes"] = summary["peak_rss_bytes"]
        print(json.dumps(line), flush=True)
    print(json.dumps(summary), flush=True)
    if args.vq_overlap:
        print(json.dumps(vq_overlap(fast_forward, model, args.vq_overlap, cached_list[0], args.rounds)), flush=True)


def vq_overlap(forward, model, rows: int, cached: int, rounds: int) -> dict:
    """The CPU runtime's VQ thread beside decode steps (model/runtime/cpu.py): one image decoded on one
    core while `rows` rows keep stepping, against the same on all cores, and against the two one after the
    other (steps paused while the image decodes on all cores). For each way: seconds until the image is
    decoded, steps done meanwhile, and that wall time over what the same work takes one after the other."""
    import types

    import numpy as np

    from model.config import JanusConfig
    from model.cpu_engine import CpuVQDecoder
    from model.vq import VQModel
    from timing import fill_random, median_seconds

    vq = VQModel(JanusConfig.from_name("deepseek-ai/Janus-1.3B").gen_vision)
    vq.eval()
    fill_random(vq, lambda shape: (1.0, 1.0 if shape[0] > 1 else 0.0) if len(shape) == 1
                else (1.0 / np.sqrt(np.prod(shape[1:])), 0.0))
    decoder = CpuVQDecoder(types.SimpleNamespace(gen_vision_model=vq), single_thread_copy=True)
    codes = np.random.default_rng(3).integers(0, vq.config.codebook_size, (1, 576))
    cache = random_cache(model, rows, cached + 1, seed=5)
    x = np.random.default_rng(4).standard_normal((rows, 1, model.config.hidden_size), np.float32)

    def step():
        forward(x, cache, list(range(rows)), [cached] * rows)

    step_s = median_seconds(step, rounds)
    alone = {single: median_seconds(lambda single=single: decoder.decode(codes, single_thread=single), rounds)
             for single in (True, False)}
    result = {"kind": "vq_overlap", "rows": rows, "step_ms_alone": round(step_s * 1e3, 1),
              "vq_s_alone_all_cores": round(alone[False], 2), "vq_s_alone_one_core": round(alone[True], 2)}
    for single in (True, False):
        finished = threading.Event()
        vq_seconds = []

        def decode(single=single):
            t0 = time.perf_counter()
            decoder.decode(codes, single_thread=single)
            vq_seconds.append(time.perf_counter() - t0)
            finished.set()

        steps = 0
        started = time.perf_counter()
        thread = threading.Thread(target=decode)
        thread.start()
        while not finished.is_set():
            step()
            steps += 1
        wall = time.perf_counter() - started
        thread.join()
        sequential = alone[False] + steps * step_s
        name = "one_core" if single else "all_cores"
        result[f"beside_{name}"] = {"vq_s": round(vq_seconds[0], 2), "steps": steps, "wall_s": round(wall, 2),
                                    "step_ms": round((wall / steps) * 1e3, 1) if steps else None,
                                    "x_one_after_the_other": round(wall / sequential, 3)}
    return result


def random_cache(model, rows: int, length: int, seed: int = 2):
    """A float32 KV cache of `rows` x `length` with random keys and values in every position a step reads."""
    import numpy as np

    cache = model.new_cache(rows, length, dtype="float32")
    fill = np.random.default_rng(seed)
    for t in cache.k + cache.v:
        view = np.from_dlpack(t)
        view[...] = fill.standard_normal(view.shape[1:], np.float32)[None] * 0.5
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="exact,int8,int4,bf16", help="the ones this CPU cannot run are skipped")
    parser.add_argument("--rows", default="2,32")
    parser.add_argument("--cached", default="64,600")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=620, help="tokens of the timed prompt")
    parser.add_argument("--agree", type=int, default=32, help="greedy steps compared with eager, image and text")
    parser.add_argument("--vq-overlap", type=int, default=0, help="also time a VQ decode beside steps of this many "
                        "rows (the CPU runtime's VQ thread), in the first mode")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick look at the bench")
    parser.add_argument("--peer", default=None, help="a Python with the official code's requirements (torch...)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each process may take")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()

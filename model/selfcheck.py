"""`janus-server check`: does this machine run Janus as the reference does, and how fast?

Run on the machine that will serve, on the device and dtype it will serve with:

1. The golden set (the official implementation's outputs for janus-tiny, tests/golden/janus-tiny)
   through the runtime that serves on that device: the prefill and every decode step of two
   understanding prompts and the 576 guided steps of two images, each fed the reference's tokens
   (teacher-forced), so that one early miss does not hide how far the rest are; the images the VQ
   decoder makes of the reference's codes; and the sampler against its float64 definition. Reported:
   the largest error of the logits against the tolerance for the dtype, and how often the greedy
   token (the image token after guidance) is the reference's.
2. The decode step of Janus-1.3B's language model (random weights; --layers to time fewer of its
   layers) at each --rows, with --cached positions in the cache: eager Paddle, and the runtime's own
   step where it has one (the CPU runtime's programs); medians of --rounds. Against the floor: the
   bytes of the timed layers' weights over the memory bandwidth measured in the same run. The eager
   step's Paddle operations are counted with Paddle's profiler, per step and per layer.

It prints a summary and writes everything to a JSON report; it exits 1 when a golden check fails.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN_PLACES = (Path(__file__).resolve().parents[1] / "tests" / "golden" / "janus-tiny",  # a checkout
                 Path("/opt/janus-server/golden/janus-tiny"))  # the container images
# The largest error of the logits against the reference's float32 values: float32 as the golden tests
# allow; bfloat16 keeps 8 bits of mantissa, so a logit of janus-tiny's size (|x| < 10) moves by up to
# about 0.04 per rounding, and errors add over the layers. Provisional until measured on a GPU: the
# report gives the measured error beside it.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.1}
IMAGE_TOKENS = 576


def find_golden(explicit: str | None = None) -> Path:
    for place in ([Path(explicit)] if explicit else [Path(p) for p in [os.environ.get("JANUS_GOLDEN")] if p]
                  + list(GOLDEN_PLACES)):
        if (place / "cases.npz").is_file():
            return place
    raise FileNotFoundError("the golden set (cases.npz of janus-tiny) was not found; give its folder with --golden")


# ---- 1. the golden set through the device's runtime

@dataclasses.dataclass
class Comparison:
    name: str
    max_abs_error: float
    tolerance: float
    agreement: float  # share of the reference's greedy tokens reproduced
    compared: int  # values or tokens compared

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_error <= self.tolerance and self.agreement == 1.0)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


def golden_check(golden: Path, device: str, dtype: str, runtime_class=None) -> tuple[list[Comparison], dict[str, Any]]:
    """The golden cases through the runtime `device` serves with (or a `runtime_class` of model/runtime/);
    (comparisons, what ran)."""
    from .runtime.device import load, make_runtime
    from .sampling import cfg

    with np.load(golden / "cases.npz") as data:
        cases = {name: data[name] for name in data.files}
    special = json.loads((golden / "cases.json").read_text())["special_token_ids"]
    model = load(str(golden), dtype, device)
    ids = {"eos_id": special["eos_token_id"], "pad_id": special["tokenizer.pad_token_id"]}
    runtime = runtime_class(model, **ids) if runtime_class else make_runtime(model, device, **ids)
    longest = max(cases[f"understanding.{c}.input_ids"].shape[1] + 24 for c in ("conv1", "conv2"))
    runtime.open_cache(4, max(longest, cases["generation.input_ids"].shape[1] + IMAGE_TOKENS))
    batch = runtime.batch
    tolerance = TOLERANCE[model.dtype_name]
    results = []

    def numpy(tensor) -> np.ndarray:
        return np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor, np.float32)

    for conv in ("conv1", "conv2"):
        p = f"understanding.{conv}."
        ids, generated, expected = cases[p + "input_ids"][0], cases[p + "generated_ids"][0], cases[p + "step_logits"]
        slot = batch.reserve_text(len(ids), len(generated))
        try:
            got = [numpy(batch.prefill_text(slot, ids, image_mask=cases[p + "images_seq_mask"][0],
                                            pixel_values=cases[p + "pixel_values"][0]))[0]]
            for i in range(1, len(generated)):
                hidden = batch.forward_hidden(model.embed_tokens(generated[None, i - 1:i]), batch.cache,
                                              np.array([slot]), np.array([len(ids) + i - 1]))
                got.append(numpy(batch.text_logits(hidden[:, -1]))[0])
        finally:
            batch.pool.give_back([slot])
        got = np.stack(got)
        results.append(Comparison(f"understanding {conv}: prefill and {len(generated) - 1} steps",
                                  float(np.abs(got - expected).max()), tolerance,
                                  float((got.argmax(-1) == generated).mean()), got.size))

    g = "generation."
    ids, tokens, expected = (cases[g + "input_ids"].astype(np.int64), cases[g + "image_tokens"].astype(np.int64),
                             cases[g + "cfg_logits_all_steps"])
    slots = batch.pool.take(len(ids))
    try:
        hidden = batch.forward_hidden(model.embed_tokens(ids), batch.cache, np.array(slots), np.zeros(len(ids), np.int64))
        got = np.empty_like(expected)
        for step in range(tokens.shape[1]):
            logits = batch.image_logits(hidden[:, -1])
            got[:, step] = numpy(cfg(logits[0::2], logits[1::2], 5.0))
            if step + 1 < tokens.shape[1]:
                embeds = model.embed_image_tokens(np.repeat(tokens[:, step], 2)[:, None])
                hidden = batch.forward_hidden(embeds, batch.cache, np.array(slots),
                                              np.full(len(ids), ids.shape[1] + step, np.int64))
    finally:
        batch.pool.give_back(slots)
    results.append(Comparison(f"generation: {tokens.shape[0]} images x {tokens.shape[1]} guided steps",
                              float(np.abs(got - expected).max()), tolerance,
                              float((got.argmax(-1) == tokens).mean()), got.size))

    decoded = runtime.decode_images(cases["vq_decode.codes"])
    while not decoded.done() and runtime.run_piece():  # a runtime that decodes in pieces between steps
        pass
    images, _ = decoded.result()
    want = cases["vq_decode.images_uint8"]
    diff = np.abs(images.astype(np.int16) - want.astype(np.int16))
    # uint8 truncation: a value on an integer boundary may flip by one (as the golden tests allow)
    results.append(Comparison("VQ decode: 2 images (uint8, off-by-one pixels allowed)", float(diff.max()), 1.0,
                              float((diff <= 1).mean()), diff.size))
    results.append(sampler_check())
    return results, {**runtime.describe(), "golden": str(golden)}


def sampler_check() -> Comparison:
    """The device sampler (model/sampling.py) against its float64 definition on fixed logits: every draw must
    be a token its row keeps, at the place the row's random number points to."""
    from .sampling import RowParams, SamplingParams, reference_draw, sample, uniforms
    from .tensors import from_numpy

    rng = np.random.default_rng(0)
    settings = [SamplingParams(), SamplingParams(1.0), SamplingParams(0.7, top_k=5), SamplingParams(1.3, top_p=0.8),
                SamplingParams(1.0, top_k=50, top_p=0.9), SamplingParams(0.05)]
    agree = total = 0
    for trial in range(8):
        logits = (rng.standard_normal((len(settings), 16384)) * 4).astype(np.float32)
        u = uniforms(np.arange(len(settings)) + 100 * trial, np.full(len(settings), trial))
        tokens = sample(from_numpy(logits), RowParams.of(settings, u)).numpy()
        for row, params in enumerate(settings):
            agree += reference_draw(logits[row], params, float(u[row]), int(tokens[row]))
            total += 1
    return Comparison("sampling: 48 draws against the float64 definition", 0.0, 0.0, agree / total, total)


# ---- 2. the decode step of Janus-1.3B's language model

def random_language_model(layers: int | None = None, dtype: str = "float32"):
    """Janus-1.3B's LlamaModel (or its first `layers` layers) with random weights, filled from numpy
    (Paddle's initialisers take minutes), without its token embeddings (steps are fed embeddings)."""
    import paddle

    from .config import JanusConfig
    from .llama import LlamaModel

    config = JanusConfig.from_name("deepseek-ai/Janus-1.3B").language
    if layers:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    paddle.nn.initializer.set_global_initializer(paddle.nn.initializer.Constant(0.0))
    try:
        model = LlamaModel(config)
    finally:
        paddle.nn.initializer.set_global_initializer(None)
    model.eval()
    del model.embed_tokens
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1 << 22) + 7).astype(np.float32)  # tiled with a period prime to every width
    for _, param in model.named_parameters():
        offset = int(rng.integers(1 << 20))
        if len(param.shape) == 1:
            param.set_value(np.float32(1.0) + np.float32(0.1) * np.resize(base[offset:], param.shape))
        else:
            param.set_value(np.float32(1.0 / np.sqrt(param.shape[0])) * np.resize(base[offset:], param.shape))
    if dtype != "float32":
        model.to(dtype=dtype)
    return model


def cpu_read_bandwidth() -> float:
    """Bytes/s reading a 1 GiB float32 array, each half summed by its own thread (numpy releases the GIL)."""
    src = np.ones(1 << 28, np.float32)
    halves = [src[: src.size // 2], src[src.size // 2:]]
    best = float("inf")
    for _ in range(5):
        threads = [threading.Thread(target=np.add.reduce, args=(h,)) for h in halves]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - started)
    return src.nbytes / best


def device_bandwidth(device: str) -> float:
    """Bytes/s the device's memory moves: on CPU a read (cpu_read_bandwidth), on a GPU a 1 GiB copy (read and
    write counted), best of 5."""
    if device == "cpu":
        return cpu_read_bandwidth()
    import paddle

    src = paddle.ones([1 << 28], dtype="float32")
    best = float("inf")
    for _ in range(5):
        paddle.device.synchronize()
        started = time.perf_counter()
        copy = src.clone()
        paddle.device.synchronize()
        best = min(best, time.perf_counter() - started)
        del copy
    return 2 * (1 << 30) / best


def count_ops(run, within: str | None = None, as_one: tuple[str, ...] = ()) -> dict[str, int]:
    """Paddle operations (dygraph operators) launched by run(), by name, from Paddle's profiler; `within`: only
    those under events of that name (paddle.profiler.RecordEvent); an event named in `as_one` counts as one
    operation of its name, whatever it ran (a GPU's one kernel where the CPU composes several)."""
    import paddle.profiler as profiler

    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda _: None)
    prof.start()
    try:
        run()
    finally:
        prof.stop()
    counts: dict[str, int] = {}

    def walk(node, inside: bool):
        inside = inside or node.name == within
        if node.name in as_one:
            if inside:
                counts[node.name] = counts.get(node.name, 0) + 1
            return
        if node.type == profiler.TracerEventType.Operator and inside:
            name = node.name.replace(" dygraph", "")
            counts[name] = counts.get(name, 0) + 1
        for child in node.children_node:
            walk(child, inside)

    for root in prof.profiler_result.get_data().values():
        walk(root, within is None)
    return counts


def median_ms(run, rounds: int) -> float:
    """The median milliseconds of run() over `rounds`, after one run, the device's queue waited for each time."""
    from .graphs import synchronize

    run()
    synchronize()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def step_timing(device: str, dtype: str, *, layers: int | None, rows: list[int], cached: int,
                rounds: int, kernels: dict[str, Any] | None = None) -> dict[str, Any]:
    """The decode step of Janus-1.3B's language model, eager and the runtime's own, at each of `rows`; the static
    step with the `kernels` the GPU runtime chose (describe()'s fused_kernels, in_place_attention), else its
    defaults for the device."""
    import paddle

    from .tensors import from_numpy

    model = random_language_model(layers, dtype)
    weight_bytes = sum(int(p.numel()) * p.element_size() for p in model.parameters())
    bandwidth = device_bandwidth(device)
    floor_ms = weight_bytes / bandwidth * 1e3
    hidden = model.config.hidden_size
    rng = np.random.default_rng(1)
    cache = model.new_cache(max(rows), cached + 1, dtype=dtype)
    embeds = {b: from_numpy(rng.standard_normal((b, 1, hidden)).astype(np.float32)).astype(dtype) for b in rows}

    def eager(b):
        with paddle.no_grad():
            model(embeds[b], cache, np.arange(b), np.full(b, cached))

    lines = [{"step": "eager", "rows": b, "cached": cached, "ms_median": round(median_ms(lambda: eager(b), rounds), 2)}
             for b in rows]
    ops = count_ops(lambda: eager(min(rows)))
    from .static_step import StaticStep  # the GPU runtime's step (on CPU unfused)

    kernels = kernels or {}
    static = StaticStep(model, dtype, fused=kernels.get("fused_kernels"), in_place=kernels.get("in_place_attention"))
    static_cache = static.new_cache(max(rows), cached + 1)
    for b in rows:
        ms = median_ms(lambda: static.forward_hidden(embeds[b], static_cache, np.arange(b), np.full(b, cached)), rounds)
        lines.append({"step": "static", "rows": b, "cached": cached, "ms_median": round(ms, 2)})
    static_ops = count_ops(lambda: static.forward_hidden(embeds[min(rows)], static_cache, np.arange(min(rows)),
                                                         np.full(min(rows), cached)))
    from .graphs import CapturedSteps

    graphs = CapturedSteps(static, device)
    captured = "not available here (CUDA graphs need a GPU and a CUDA build of Paddle)"
    if graphs.available:
        static.runner = graphs
        for b in rows:
            ms = median_ms(lambda: static.forward_hidden(embeds[b], static_cache, np.arange(b), np.full(b, cached)),
                           rounds)
            lines.append({"step": "captured", "rows": b, "cached": cached, "ms_median": round(ms, 2)})
        captured = f"{len(graphs.graphs)} graphs; eager buckets: {graphs.refused or 'none'}"
        static.runner = static.step
    if device == "cpu":  # the CPU runtime's own step: its programs (the eager layers are freed)
        from .cpu_decoder import CpuDecoder

        decoder = CpuDecoder(model, precision="exact", release_eager=True)
        for b in rows:
            ms = median_ms(lambda: decoder.forward_hidden(embeds[b], cache, np.arange(b), np.full(b, cached)), rounds)
            lines.append({"step": "openvino", "rows": b, "cached": cached, "ms_median": round(ms, 2)})
    for line in lines:
        line["x_floor"] = round(line["ms_median"] / floor_ms, 2)
    return {"layers": model.config.num_hidden_layers, "dtype": dtype, "weight_bytes": weight_bytes,
            "bandwidth_gbs": round(bandwidth / 1e9, 1), "floor_ms": round(floor_ms, 2), "steps": lines,
            "captured": captured, "ops_per_step": sum(ops.values()),
            "ops_per_layer": round(sum(ops.values()) / model.config.num_hidden_layers, 1), "ops": ops,
            "static_ops_per_step": sum(static_ops.values()), "static_fused_kernels": static.fused,
            "static_in_place_attention": static.in_place}


# ---- the command

def run(args) -> int:
    from .runtime.device import pick_device

    device = pick_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    report: dict[str, Any] = {"device": device, "dtype": dtype, "machine": platform.machine(),
                              "processor": cpu_name(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    golden = find_golden(args.golden)
    comparisons, ran = golden_check(golden, device, dtype)
    report["runtime"] = ran
    report["golden"] = [c.as_dict() for c in comparisons]
    report["passed"] = all(c.passed for c in comparisons)
    print(f"janus-server check on {device} ({report['processor']}), {dtype}, runtime {ran.get('runtime')}")
    for c in comparisons:
        print(f"  {'ok  ' if c.passed else 'FAIL'} {c.name}: max error {c.max_abs_error:.2e} (tolerance "
              f"{c.tolerance:g}), agreement {c.agreement:.3f}")
    if not args.no_timing:
        rows = [int(r) for r in args.rows.split(",")]
        timing = step_timing(device, dtype, layers=args.layers, rows=rows, cached=args.cached, rounds=args.rounds,
                             kernels=ran)
        report["timing"] = timing
        print(f"  decode step, Janus-1.3B's language model ({timing['layers']} layers, "
              f"{timing['weight_bytes'] / 1e9:.2f} GB of weights), {args.cached} cached positions; floor "
              f"{timing['floor_ms']:.1f} ms at {timing['bandwidth_gbs']} GB/s:")
        for line in timing["steps"]:
            print(f"    {line['step']:<9} {line['rows']:>3} rows: {line['ms_median']:8.2f} ms ({line['x_floor']:.2f}x "
                  f"the floor)")
        print(f"    captured: {timing['captured']}")
        print(f"    Paddle operations per step at {min(rows)} rows: eager {timing['ops_per_step']} "
              f"({timing['ops_per_layer']} per layer), static {timing['static_ops_per_step']}"
              f"{' (fused kernels' if timing['static_fused_kernels'] else ' (unfused'}"
              f"{', in-place attention)' if timing['static_in_place_attention'] else ')'}")
    Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    print(f"  report: {args.report}; {'passed' if report['passed'] else 'FAILED'}")
    return 0 if report["passed"] else 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

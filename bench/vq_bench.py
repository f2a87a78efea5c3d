"""VQ image decoder on CPU: eager Paddle against the OpenVINO program (model/cpu_engine.py).

    .venv/bin/python bench/vq_bench.py                       # janus-tiny (the golden checkpoint)
    .venv/bin/python bench/vq_bench.py --model deepseek-ai/Janus-1.3B   # full-size VQ-16, random weights

Times one 384x384 image (576 codes) per call, in one run: eager Paddle, and the OpenVINO
program on all threads and on one, exported with the layout-free GroupNorm (the default)
and with Paddle's own group_norm. Prints medians, the ratios to eager, and each program's
largest difference from eager.
"""
from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # Paddle pins 1 thread unless told
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from model.config import JanusConfig  # noqa: E402
from model.cpu_engine import CpuVQDecoder  # noqa: E402
from model.vq import VQModel  # noqa: E402
from timing import fill_random, median_seconds  # noqa: E402  (bench/timing.py)

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "janus-tiny"


def load_vq(name: str):
    if name == "janus-tiny":
        from model.loader import load_model

        return load_model(GOLDEN).gen_vision_model
    vq = VQModel(JanusConfig.from_name(name).gen_vision)
    vq.eval()
    fill_random(vq, lambda shape: (1.0, 1.0 if shape[0] > 1 else 0.0) if len(shape) == 1
                else (1.0 / np.sqrt(np.prod(shape[1:])), 0.0))
    return vq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="janus-tiny", help="janus-tiny or a preset name (random weights)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    threads = int(os.environ["OMP_NUM_THREADS"])
    vq = load_vq(args.model)
    holder = types.SimpleNamespace(gen_vision_model=vq)
    codes = np.random.default_rng(1).integers(0, vq.config.codebook_size, (1, 576))
    with paddle.no_grad():
        eager = vq.decode_codes(paddle.to_tensor(codes)).numpy()
    eager_s = median_seconds(lambda: vq.decode_codes(paddle.to_tensor(codes)).numpy(), args.rounds)
    print(f"{args.model}, {threads} threads, one 384x384 image, median of {args.rounds}")
    print(f"{'path':<44} {'seconds':>8} {'vs eager':>9} {'max |diff|':>11}")
    print(f"{'eager Paddle':<44} {eager_s:>8.3f} {1.0:>8.2f}x {0.0:>11.1e}")
    for layout_free in (True, False):
        decoder = CpuVQDecoder(holder, threads=threads, single_thread_copy=True, layout_free_norms=layout_free)
        norm = "layout-free GroupNorm" if layout_free else "Paddle group_norm"
        diff = float(np.abs(decoder.decode(codes) - eager).max())
        for single in (False, True):
            seconds = median_seconds(lambda: decoder.decode(codes, single_thread=single), args.rounds)
            label = f"OpenVINO, {norm}, {1 if single else threads} thread(s)"
            print(f"{label:<44} {seconds:>8.3f} {eager_s / seconds:>8.2f}x {diff:>11.1e}", flush=True)
        del decoder


if __name__ == "__main__":
    main()

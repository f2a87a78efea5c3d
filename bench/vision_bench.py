"""Image encoder (SigLIP + aligner) on CPU: eager Paddle against the OpenVINO model (model/cpu_vision.py).

    .venv/bin/python bench/vision_bench.py                       # janus-tiny (the golden checkpoint)
    .venv/bin/python bench/vision_bench.py --model deepseek-ai/Janus-1.3B   # full-size SigLIP-L, random weights

Times one 384x384 image per call, in one run: eager Paddle (with its numpy attention and,
for large layers, numpy projections on CPU, as the worker runs it), and the OpenVINO model on all threads and on one. Prints
medians, the ratios to eager, each model's largest difference from eager, and how long
the OpenVINO model took to build.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # Paddle pins 1 thread unless told
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402

from model.config import JanusConfig  # noqa: E402
from model.cpu_vision import CpuVisionEncoder  # noqa: E402
from model.janus import MlpProjector  # noqa: E402
from model.siglip import SigLIPVisionTower  # noqa: E402
from timing import fill_random, median_seconds  # noqa: E402  (bench/timing.py)

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "janus-tiny"


class Encoder(nn.Layer):
    """What CpuVisionEncoder reads from a JanusModel, without the rest of the model."""

    def __init__(self, config: JanusConfig):
        super().__init__()
        self.vision_model = SigLIPVisionTower(config.vision)
        self.aligner = MlpProjector(config.aligner)

    @paddle.no_grad()
    def encode_images(self, pixels):
        return self.aligner(self.vision_model(pixels))


def load_encoder(name: str):
    if name == "janus-tiny":
        from model.loader import load_model

        return load_model(GOLDEN)
    encoder = Encoder(JanusConfig.from_name(name))
    encoder.eval()
    fill_random(encoder, lambda shape: (1.0, 1.0) if len(shape) == 1 else (0.02, 0.0))
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="janus-tiny", help="janus-tiny or a preset name (random weights)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    threads = int(os.environ["OMP_NUM_THREADS"])
    model = load_encoder(args.model)
    size = model.vision_model.config.image_size
    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    eager = model.encode_images(paddle.to_tensor(pixels)).numpy()
    eager_s = median_seconds(lambda: model.encode_images(paddle.to_tensor(pixels)).numpy(), args.rounds)
    print(f"{args.model}, {threads} threads, one {size}x{size} image, median of {args.rounds}")
    print(f"{'path':<28} {'seconds':>8} {'vs eager':>9} {'max |diff|':>11} {'build s':>8}")
    print(f"{'eager Paddle':<28} {eager_s:>8.4f} {1.0:>8.2f}x {0.0:>11.1e}")
    for count in sorted({threads, 1}, reverse=True):
        encoder = CpuVisionEncoder(model, threads=count)
        diff = float(np.abs(encoder.encode(pixels) - eager).max())
        seconds = median_seconds(lambda: encoder.encode(pixels), args.rounds)
        label = f"OpenVINO, {count} thread(s)"
        print(f"{label:<28} {seconds:>8.4f} {eager_s / seconds:>8.2f}x {diff:>11.1e} {encoder.build_seconds:>8.1f}")
        del encoder


if __name__ == "__main__":
    main()

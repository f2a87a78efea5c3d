"""What generation previews (`preview_every`) cost.

1. Their parts, each timed alone: fitting the palette (one VQ decode, at worker start), the
   previews of n images at one step (a table lookup), and encoding them as the stream sends them
   (24x24 PNGs, base64).
2. Whole streamed generations through the engine, the same seeds with previews every K steps and
   without, interleaved, and the ratio of their medians.

    python bench/preview_bench.py --model janus-tiny --every 48,12 --n 1,4
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import median_seconds  # noqa: E402  (bench/timing.py)
from server.engine.client import EngineClient  # noqa: E402
from server.engine.types import EngineConfig, GenerateRequest  # noqa: E402


def part_costs(model_path: Path, n: int) -> None:
    from model.generation import decode_images
    from model.loader import load_model
    from model.preview import PreviewPalette
    from server.images import image_bytes

    model = load_model(model_path)
    codebook = model.gen_vision_model.codebook.weight.numpy()
    fit = median_seconds(lambda: PreviewPalette.fit(codebook, lambda c: decode_images(model, c)), 3)
    print(f"palette fit with the eager VQ decoder: {fit * 1e3:.1f} ms")
    try:  # what a CPU worker fits with, when the openvino package is installed
        from model.cpu_engine import CpuVQDecoder
        from model.generation import to_uint8_images

        program = CpuVQDecoder(model, single_thread_copy=True)
        fit = median_seconds(lambda: PreviewPalette.fit(codebook, lambda c: to_uint8_images(program.decode(c))), 3)
        print(f"palette fit with the OpenVINO VQ decoder: {fit * 1e3:.1f} ms")
    except Exception as error:  # noqa: BLE001 - only a figure less
        print(f"(no OpenVINO VQ decoder: {error})")
    palette = PreviewPalette.fit(codebook, lambda c: decode_images(model, c))
    codes = np.random.default_rng(0).integers(0, len(codebook), (n, 288))
    lookup = median_seconds(lambda: palette.previews(codes), 200)
    previews = palette.previews(codes)
    encode = median_seconds(lambda: [base64.b64encode(image_bytes(p)).decode() for p in previews], 200)
    print(f"previews of {n} image(s) at step 288: lookup {lookup * 1e6:.0f} us, "
          f"24x24 PNG + base64 {encode * 1e6:.0f} us")


async def streamed(engine: EngineClient, n: int, every: int, seed: int) -> float:
    started = time.perf_counter()
    async for _ in engine.generate_images_stream(
            GenerateRequest(prompt="a lighthouse at dusk", n=n, seed=seed, preview_every=every)):
        pass
    return time.perf_counter() - started


async def end_to_end(args) -> None:
    engine = EngineClient(EngineConfig(model=args.model, home=args.home, devices=["cpu"], max_queue=1000))
    await engine.start()
    await engine.wait_ready(timeout=1800)
    try:
        await streamed(engine, 1, 0, 0)  # warm up
        for n in args.n:
            for every in args.every:
                plain, previewed = [], []
                for round_ in range(args.rounds):  # interleaved, so drift hits both alike
                    plain.append(await streamed(engine, n, 0, round_))
                    previewed.append(await streamed(engine, n, every, round_))
                a, b = statistics.median(plain), statistics.median(previewed)
                print(f"n={n} preview_every={every}: {b:.3f} s against {a:.3f} s without previews "
                      f"(median of {args.rounds}): {b / a:.3f}x")
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="janus-tiny")
    parser.add_argument("--home", default=None)
    parser.add_argument("--every", default="48,12", help="comma-separated preview_every values")
    parser.add_argument("--n", default="1,4", help="comma-separated images per request")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.every = [int(v) for v in args.every.split(",")]
    args.n = [int(v) for v in args.n.split(",")]
    from model.hub import resolve_model

    path = Path(resolve_model(args.model, args.home))
    for n in args.n:
        part_costs(path, n)
    asyncio.run(end_to_end(args))


if __name__ == "__main__":
    main()

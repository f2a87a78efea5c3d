"""Work in pieces: the image encoder, a prompt's prefill and the VQ decoder, cut so that a runtime can run a
request's start or its images between decode steps, one piece at a time, on the thread and stream that step
(model/runtime/gpu.py), and the running rows never wait for more than one piece.

A piece of work is a generator: it does a piece of its work at each `next()`, yields None between pieces and
returns its result. `drain` runs one to its end (what the one-call forms, such as JanusModel.encode_images,
do). Its pieces are run under paddle.no_grad() one at a time by `advance`; paddle's no_grad cannot decorate a
generator (it would hold its state across the yields, and drop the result).
"""
from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

import paddle

Result = TypeVar("Result")
Pieces = Generator[None, None, Result]


def drain(pieces: Pieces[Result]) -> Result:
    """Run every piece; the result."""
    while True:
        done, result = advance(pieces)
        if done:
            return result


def advance(pieces: Pieces[Any]) -> tuple[bool, Any]:
    """Run the next piece: (False, None) when more follow, (True, the result) when that was the last."""
    with paddle.no_grad():
        try:
            next(pieces)
        except StopIteration as stop:
            return True, stop.value
    return False, None


def every(count: int | None, index: int) -> bool:
    """Whether a piece ends before item `index` of a sequence cut every `count` items (None: never)."""
    return bool(count) and index > 0 and index % count == 0

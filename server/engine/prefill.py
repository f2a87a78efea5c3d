"""Understanding prefills in a process of their own, writing into the worker's KV cache (CPU).

The worker's prefill thread (server/engine/worker.py) overlaps a prompt's prefill with the
decode steps of the running rows, but both hold the GIL for every Paddle op they dispatch.
On a small model, where an op costs less than its dispatch, the two threads mostly wait for
each other: a janus-tiny 8-row step took 2.5 ms alone and 4.2-4.8 ms beside the thread. So
the prefill runs in a child process of the worker, with the model loaded a second time. The
KV cache lives in shared memory (one memfd per buffer, handed to the child at its start), so
the child writes the prompt's keys and values straight into the row reserved for it; only the
last position's logits come back. The prefill thread stays: it hands a job to the child and
waits, without the GIL, for the answer.

The child exits when the worker's end of the socket closes (the worker stopped or died); a
child that dies makes the worker exit, and the engine client restarts the worker.

Messages to the child:  the setup dict, then (slot, input_ids, image_mask, pixel_values, threads)
Messages from it:      ("ready", programs) | ("fatal", message), then ("ok", logits) | ("error", exception)
"""
from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np


class SharedBuffers:
    """Zeroed numpy arrays, each in a memfd of its own, which a child process can map too."""

    def __init__(self):
        self.specs: list[tuple[int, tuple[int, ...], str]] = []  # (fd, shape, dtype) per buffer
        self.arrays: list[np.ndarray] = []  # the worker's mappings (its cache tensors hold them too, via DLPack)

    def allocate(self, shape, dtype: str) -> np.ndarray:
        shape = tuple(int(n) for n in shape)
        fd = os.memfd_create("janus-kv-cache")
        os.ftruncate(fd, _nbytes(shape, dtype))
        array = _map(fd, shape, dtype)
        self.specs.append((fd, shape, dtype))
        self.arrays.append(array)
        return array

    @property
    def fds(self) -> list[int]:
        return [fd for fd, _, _ in self.specs]

    def close_fds(self) -> None:
        """The mappings stay; the descriptors are only needed until the child has mapped them."""
        for fd in self.fds:
            os.close(fd)
        self.specs = [(-1, shape, dtype) for _, shape, dtype in self.specs]


def attach(specs) -> list[np.ndarray]:
    """The child's views of the parent's buffers (descriptors inherited at the same numbers)."""
    arrays = []
    for fd, shape, dtype in specs:
        arrays.append(_map(fd, shape, dtype))
        os.close(fd)  # the mapping keeps the memory
    return arrays


def _nbytes(shape, dtype) -> int:
    return max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)  # mmap refuses 0 bytes


def _map(fd: int, shape, dtype) -> np.ndarray:
    return np.frombuffer(mmap.mmap(fd, _nbytes(shape, dtype)), dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class PrefillProcess:
    """The worker's handle on its prefill child: start it, run prompts through it, stop it."""

    def __init__(self, config, buffers: SharedBuffers, *, slots: int, row_length: int):
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        # Paddle's OpenMP threads sleep 1 ms after the child's last op, not Intel OpenMP's default 200:
        # the child works in bursts, and a spinning pool takes a core from the decode loop and the API
        # process meanwhile. Measured on the 2-core dev box, janus-tiny understanding one request at a
        # time: the child used 67 % of a core with the default and 12 % with 1 ms; the requests ran at
        # 354 and 400 tokens/s (within the noise).
        env.setdefault("KMP_BLOCKTIME", "1")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from server.engine.prefill import main; main()", str(theirs.fileno())],
            pass_fds=[theirs.fileno(), *buffers.fds], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send({"config": config, "buffers": buffers.specs, "slots": slots, "row_length": row_length})
        buffers.close_fds()
        try:
            reply = self.conn.recv()
        except EOFError:
            reply = ("fatal", f"the prefill process exited with status {self.process.wait()}")
        if reply[0] != "ready":
            self.close()
            raise RuntimeError(f"prefill process: {reply[1]}")
        self.programs = reply[1]

    def prefill(self, slot: int, input_ids, *, image_mask=None, pixel_values=None, threads: int = 1) -> np.ndarray:
        """Run one prompt into cache row `slot`; its last position's logits. Raises what the child raised,
        or PrefillProcessDied."""
        try:
            self.conn.send((slot, np.asarray(input_ids), image_mask, pixel_values, threads))
            status, value = self.conn.recv()
        except (EOFError, OSError) as error:
            raise PrefillProcessDied(f"the prefill process died ({type(error).__name__})") from error
        if status == "error":
            raise value
        return value

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        self.conn.close()  # the child reads EOF and exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class PrefillProcessDied(RuntimeError):
    pass


def main() -> None:
    """The child: load the model, map the cache, then prefill the prompts it is sent until EOF."""
    conn = Connection(int(sys.argv[1]))
    try:
        setup = conn.recv()
    except EOFError:  # the worker is gone already
        return
    config = setup["config"]
    try:
        import paddle  # noqa: F401 - before ignore_stop_signals

        from model.generation import DecodeBatch
        from server.engine.worker import ignore_stop_signals, image_encoder, load_worker_model, use_cpu_threads

        ignore_stop_signals()

        arrays = iter(attach(setup["buffers"]))

        def allocate(shape, dtype):
            array = next(arrays)
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise RuntimeError(f"shared cache buffer is {array.shape} {array.dtype}, wanted {shape} {dtype}")
            return array

        model = load_worker_model(config, "cpu")
        batch = DecodeBatch(model, slots=setup["slots"], max_len=setup["row_length"], allocate=allocate)
        vision = image_encoder(model, "cpu", config)
    except Exception as error:  # noqa: BLE001 - reported to the worker, which fails to start
        conn.send(("fatal", f"{type(error).__name__}: {error}"))
        return
    threads = [0]
    if vision is not None:
        batch.encode_images = lambda pixels: vision.encode_images(pixels, single_thread=threads[0] == 1)
    conn.send(("ready", ["image encoder"] if vision is not None else []))
    while True:
        try:
            slot, input_ids, image_mask, pixel_values, want = conn.recv()
        except (EOFError, OSError):
            return
        if want != threads[0]:
            use_cpu_threads(want)
            threads[0] = want
        try:
            reply = ("ok", batch.prefill_text(slot, input_ids, image_mask=image_mask, pixel_values=pixel_values))
        except Exception as error:  # noqa: BLE001 - that request fails alone
            reply = ("error", error)
        try:
            try:
                conn.send(reply)
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                conn.send(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))
        except OSError:
            return

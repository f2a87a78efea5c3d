"""The CPU runtime: OpenVINO programs for the language model's layers (model/cpu_decoder.py), the image
encoder and the VQ decoder, with the slow parts in background threads (the interface:
model/runtime/__init__.py); with a program store, also the output heads (model/cpu_heads.py). Embeddings
and sampling stay in eager Paddle and numpy.

- The decoder's programs are built from the loaded weights at start, in the chosen precision
  (`cpu_precision`: exact float32 by default; int8, int4, bf16 on request), and the eager copy of
  the layers' weights is freed once they are compiled. `cpu_engine="eager"` keeps the eager
  Paddle layers instead (the reference; also what "auto" falls back to without OpenVINO).
- With the OpenVINO decoder, prompts are prefilled on the loop's thread (its programs take one caller),
  between the steps: a prompt that arrives while rows run, in chunks of PREFILL_CHUNK tokens, one per
  turn (model/runtime/eager.py), so that the running rows wait for a chunk, not for the whole prompt.
- With eager layers, understanding prompts (SigLIP and a prefill of hundreds of tokens) are run by a prefill thread into
  cache rows reserved for them, while the running rows keep stepping; each joins at the first
  `poll()` after its prefill (DecodeBatch.reserve_text / prefill_text / start_text). Paddle's kernels
  and the OpenVINO image encoder release the GIL, so the two run on different cores.
- Finished image codes are VQ-decoded by a thread running the OpenVINO decoder (one call that
  releases the GIL), on every core, beside the steps.
- With eager layers, steps take half the cores while a prefill runs (share_cores); with the
  OpenVINO decoder, numpy's BLAS keeps to one thread (one_blas_thread).
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..cpu_engine import cpu_threads
from ..generation import to_uint8_images
from ..llama import numpy_attention
from .eager import EagerRuntime, done

log = logging.getLogger("janus.worker")

# Prompt tokens per piece beside running rows, with the OpenVINO decoder: no longer than the image encoder's
# piece (one OpenVINO call, which cannot be cut). Measured through the server at Janus-1.3B's sizes
# (bench/fullsize_serve.py --beside, 2-core AVX-512 EPYC, exact float32): a 695-token understanding prompt sent
# while a text answer streams. Whole, the stream waited 13.0 s and the new request's first token came at 13.1 s;
# in chunks of 256, 10.1 s and 17.3 s; of 128, 5.0 s and 17.7 s; of 64, 3.1 s and 18.6 s (the image encoder's
# piece about 3 s of it). Each chunk reads the weights again, and the running rows step after each with fewer
# rows than they would later have together: 8 prompts at once, cut once the first had joined, took 114 s whole,
# 146 s at 128, 154 s at 64; a burst that arrives when no rows run is prefilled whole (model/runtime/eager.py):
# 119 s.
PREFILL_CHUNK = 64


@dataclasses.dataclass
class Prefill:
    """An understanding prompt the prefill thread runs into its reserved cache row."""

    rid: str
    slot: int
    payload: dict[str, Any]
    future: Future  # done once the prompt has joined the batch (in poll(), on the loop's thread)
    computed: Future = dataclasses.field(default_factory=Future)  # done when the thread is done with it
    cancelled: bool = False
    logits: Any = None
    error: BaseException | None = None


def use_cpu_threads(threads: int, *, blas: bool = True) -> None:
    """Paddle's thread count for this process, and (`blas`) the large numpy products' (model/cpu_blas.py)."""
    import paddle

    from .. import cpu_blas

    paddle.base.core.set_num_threads(threads)
    if blas and cpu_blas.configured():
        cpu_blas.configure(gemm_threads=threads, small_threads=1)


def one_blas_thread() -> None:
    """Numpy's BLAS to one thread for every product, the eager heads' included: with the OpenVINO decoder.

    OpenBLAS's threads spin for a while after a product and take the cores from the OpenVINO
    program that follows. Measured at Janus-1.3B's widths (6 layers, 2 rows, 300 cached, 2-core
    AVX2 EPYC): a step took 81 ms alone and 119 ms after a gen_head-sized product on 2 BLAS threads
    (8.7 ms); after the same product on one thread (13.8 ms), 69 ms.
    """
    from .. import cpu_blas

    cpu_blas.configure(gemm_threads=1, small_threads=1)


def limit_blas_threads() -> None:
    """Numpy's BLAS to one thread, but for the large products of llama.linear (model/cpu_blas.py).

    Paddle's OpenMP threads keep spinning for a while after each op; a second pool of BLAS
    threads then fights them for the same cores. Measured on the 2-core dev box, janus-tiny
    understanding prefill (SigLIP + 620-token prompt): 46-170 ms with both pools, 27-32 ms so.
    The large products (llama.linear: Janus-1.3B's projections and heads) take the cores the
    loop may use, which share_cores keeps up to date. Eager layers only (`--cpu-engine eager`);
    with the OpenVINO decoder, one_blas_thread. At Janus-1.3B's widths (6 layers, eager, 2-core
    AVX2 EPYC) the loop alone runs as fast either way (620-token prefill 5.0-5.6 s against
    5.2-5.4 s, 8-row step 195-220 against 186-213 ms); share_cores' full-size measurement of the
    prefill thread beside the loop was made with it.
    """
    from .. import cpu_blas

    cpu_blas.configure(gemm_threads=cpu_threads(), small_threads=1)


def program_store(program: str, model_path: str, folder: str, threads: int | None = None, **settings):
    """The ProgramStore entry of `program` (as describe() names it) for this checkpoint, thread count (default:
    cpu_threads(), what the programs take) and `settings`, keyed by the source of the code that builds it."""
    from .. import cpu_decoder, cpu_engine, cpu_heads, cpu_vision, vq
    from ..cpu_programs import ProgramStore

    sources = {"decoder": [cpu_decoder.__file__], "image encoder": [cpu_vision.__file__, cpu_engine.__file__],
               "VQ decoder": [cpu_engine.__file__, vq.__file__],  # exported from model/vq.py's layers
               "heads": [cpu_heads.__file__]}[program]
    return ProgramStore.for_checkpoint(model_path, folder, sources, program=program, threads=threads or cpu_threads(),
                                       **settings)


def decoder_store(model_path: str, folder: str, precision: str, threads: int | None = None):
    """The ProgramStore entry of the decoder's programs for this checkpoint, precision and thread count."""
    from ..cpu_decoder import ACTIVATION_GROUP

    return program_store("decoder", model_path, folder, threads, precision=precision, activation_group=ACTIVATION_GROUP)


def program_stores(model_path: str, folder: str, *, cpu_engine: str, cpu_precision: str, cpu_vision: str,
                   cpu_vq: str) -> dict:
    """The ProgramStore entries of the OpenVINO programs CpuRuntime builds with these settings, by name (as
    describe() names them). The image encoder's only beside the OpenVINO decoder (alone, it is compiled twice)."""
    stores = {}
    if cpu_engine != "eager":
        stores["decoder"] = decoder_store(model_path, folder, cpu_precision)
        stores["heads"] = program_store("heads", model_path, folder)  # model/cpu_heads.py: they run only from one
        if cpu_vision != "eager":
            stores["image encoder"] = program_store("image encoder", model_path, folder)
    if cpu_vq != "eager":
        stores["VQ decoder"] = program_store("VQ decoder", model_path, folder)  # with the preview palette
    return stores


def held_parameters(stores: dict) -> tuple[str, ...]:
    """The parameters the loader need not read: those of the programs whose entries in `stores` are complete."""
    from ..cpu_decoder import HELD_PARAMETERS as DECODER
    from ..cpu_engine import VQ_HELD_PARAMETERS as VQ
    from ..cpu_heads import HELD_PARAMETERS as HEADS
    from ..cpu_vision import HELD_PARAMETERS as VISION

    held = {"decoder": DECODER, "image encoder": VISION, "VQ decoder": VQ, "heads": HEADS}
    return tuple(prefix for name, store in stores.items() if store.complete() for prefix in held[name])


def make_cpu_program(what: str, choice: str, build):
    """An OpenVINO program from `build()` when asked for ("openvino"), or with "auto" when the openvino
    package is installed; None (eager Paddle) otherwise, or when "auto" cannot build it."""
    if choice == "eager":
        return None
    from ..cpu_engine import openvino_runtime_available

    if choice == "auto" and not openvino_runtime_available():
        return None
    from ..cpu_programs import ProgramStoreError

    try:
        return build()
    except ProgramStoreError:
        raise  # its weights were not loaded: eager cannot take over (the worker loads them and starts again)
    except Exception:
        if choice == "openvino":
            raise
        log.warning("OpenVINO %s unavailable, running it in eager Paddle", what, exc_info=True)
        return None


def warmed(program):
    """`program` after its warm_up(): the first request does not pay for what its first run sets up."""
    program.warm_up()
    return program


class CpuRuntime(EagerRuntime):
    name = "cpu"

    def __init__(self, model, *, eos_id: int, pad_id: int, cpu_engine: str = "auto", cpu_precision: str = "exact",
                 cpu_vq: str = "auto", cpu_vision: str = "auto", previews: bool = True, program_stores=None,
                 prefill_chunk: int | None | str = "auto"):
        """`program_stores`: where the compiled programs are imported from or saved, by name (program_stores);
        the VQ decoder's entry also keeps the preview palette. `prefill_chunk`: prompt tokens per piece between the
        steps beside running requests (model/runtime/eager.py); "auto": PREFILL_CHUNK with the OpenVINO decoder,
        else None (every prompt whole; understanding prompts in the prefill thread)."""
        from ..cpu_decoder import CpuDecoder, check_precision

        limit_blas_threads()
        if cpu_engine == "eager" and cpu_precision != "exact":
            raise ValueError(f"--cpu-precision {cpu_precision} needs the OpenVINO decoder, not --cpu-engine eager")
        if cpu_engine != "eager":
            check_precision(cpu_precision)  # before minutes of building: a clear refusal (bf16 without the CPU for it)
        self.build_s: dict[str, float] = {}  # seconds each program took to build or import
        self.stores = stores = dict(program_stores or {})
        self.decoder = self.timed("decoder", cpu_engine, lambda: warmed(CpuDecoder(
            model, precision=cpu_precision, release_eager=True, store=stores.get("decoder"))))
        self.heads = None
        if self.decoder is not None:
            one_blas_thread()
            if stores.get("heads") is not None:
                self.heads = self.make_heads(model, stores["heads"])
        if self.decoder is None and cpu_precision != "exact":
            raise RuntimeError(f"--cpu-precision {cpu_precision} needs the openvino package")
        # The prefill thread writes its rows of the cache through numpy views (llama.numpy_attention);
        # the OpenVINO decoder takes one caller.
        self.prefill_thread = self.decoder is None and numpy_attention(model.language_model.lm_head.weight)
        from ..cpu_engine import CpuVQDecoder
        from ..cpu_vision import CpuVisionEncoder

        # Beside the prefill thread the image encoder runs on one core while rows step (a second compiled copy);
        # with the decoder, prompts are prefilled in the loop, on every core, and one copy does.
        inline = self.decoder is not None
        self.vision = self.timed("image encoder", cpu_vision, lambda: warmed(CpuVisionEncoder(
            model, single_thread_copy=not inline, release_eager=inline,
            store=stores.get("image encoder") if inline else None)))
        self.vq_decoder = self.timed("VQ decoder", cpu_vq, lambda: CpuVQDecoder(model, store=stores.get("VQ decoder")))
        self.cores = cpu_threads()
        self.step_threads = self.cores
        self.prefills: dict[str, Prefill] = {}  # in the thread or done, not yet joined
        self.prefill_jobs: queue.Queue = queue.Queue()
        self.prefill_done: queue.Queue = queue.Queue()
        self.vq_jobs: queue.Queue = queue.Queue()
        super().__init__(model, eos_id=eos_id, pad_id=pad_id, previews=previews,
                         prefill_chunk=(PREFILL_CHUNK if self.decoder is not None else None) if prefill_chunk == "auto"
                         else prefill_chunk)
        if self.prefill_thread:
            threading.Thread(target=self.prefill_loop, name="prefill", daemon=True).start()
        if self.vq_decoder is not None:
            threading.Thread(target=self.vq_loop, name="vq-decode", daemon=True).start()

    def make_heads(self, model, store):
        """The heads as programs (model/cpu_heads.py), or None (eager) when their store cannot hold them."""
        from ..cpu_engine import EngineUnavailable
        from ..cpu_heads import CpuHeads
        from ..cpu_programs import ProgramStoreError

        try:
            return self.timed("heads", "openvino", lambda: CpuHeads(model, store))
        except ProgramStoreError:
            raise  # their weights were not loaded: the worker loads them and starts again
        except EngineUnavailable as error:
            log.warning("the output heads stay eager: %s", error)
        except Exception:  # noqa: BLE001 - the eager heads serve
            log.warning("the output heads stay eager", exc_info=True)
        return None

    def timed(self, what: str, choice: str, build):
        """make_cpu_program, its seconds kept in build_s."""
        started = time.perf_counter()
        program = make_cpu_program(what, choice, build)
        if program is not None:
            self.build_s[what] = round(time.perf_counter() - started, 1)
        return program

    def open_cache(self, slots: int, row_length: int) -> None:
        super().open_cache(slots, row_length)
        if self.decoder is not None:
            self.batch.forward_hidden = self.decoder.forward_hidden
        if self.vision is not None:
            self.batch.encode_images = self.encode_images
        if self.heads is not None:
            self.batch.text_logits, self.batch.image_logits = self.heads.text_logits, self.heads.image_logits

    def fit_palette(self):
        """The preview palette kept beside the VQ decoder's imported program, else fitted (one VQ decode: seconds
        at Janus-1.3B's sizes) and kept there for the next start."""
        from ..preview import PreviewPalette

        store = self.stores.get("VQ decoder") if self.vq_decoder is not None else None
        if store is not None and self.vq_decoder.imported:
            colors = store.array("palette")
            if colors is not None and colors.shape == (self.model.config.gen_vision.codebook_size, 3):
                return PreviewPalette(colors.astype(np.uint8))
        palette = super().fit_palette()
        if store is not None:
            store.put_array("palette", palette.colors)
        return palette

    def cache_allocator(self):
        """float32: the cache in memory the OS provides as it is first written (cpu_memory.lazy_zeros): no
        start-up time spent zeroing gigabytes."""
        from ..cpu_memory import lazy_zeros

        return lazy_zeros if self.model.dtype_name == "float32" else None

    def describe(self) -> dict[str, Any]:
        named = (("decoder", self.decoder), ("image encoder", self.vision), ("VQ decoder", self.vq_decoder),
                 ("heads", self.heads))
        programs = [name for name, program in named if program is not None]
        described = {**super().describe(), "programs": programs, "programs_s": dict(self.build_s)}
        if self.prefill_thread:
            described["prefill"] = "thread"
        if self.decoder is not None:
            described["precision"] = self.decoder.precision
            described["decoder_programs"] = "imported" if self.decoder.store is not None else "built"
        described["imported"] = [name for name, program in named if program is not None and program.imported]
        return described

    # ---- prefills in the background

    def start(self, kind: str, rid: str, payload: dict[str, Any]) -> Future:
        if kind != "understand" or not self.prefill_thread:
            return super().start(kind, rid, payload)
        try:
            slot = self.batch.reserve_text(len(payload["input_ids"]), payload["max_new_tokens"])
        except Exception as error:  # noqa: BLE001 - this request fails alone
            return done(error=error)
        job = Prefill(rid, slot, payload, Future())
        self.prefills[rid] = job
        self.prefill_jobs.put(job)
        return job.future

    def prefill_loop(self) -> None:
        """Thread: run each reserved understanding prompt into its cache row; poll() joins it."""
        while True:
            job = self.prefill_jobs.get()
            if not job.cancelled:
                payload = job.payload
                try:
                    job.logits = self.batch.prefill_text(job.slot, payload["input_ids"],
                                                         image_mask=payload["image_mask"],
                                                         pixel_values=payload["pixel_values"])
                except Exception as error:  # noqa: BLE001 - this request fails alone
                    job.error = error
            self.prefill_done.put(job)
            job.computed.set_result(None)  # wakes a loop with nothing to step (Scheduler.in_flight)

    def background(self) -> list[Future]:
        return [job.computed for job in self.prefills.values()]

    def poll(self) -> None:
        """Prompts whose prefill is done join the batch (or fail, or are dropped, alone)."""
        super().poll()
        while True:
            try:
                job = self.prefill_done.get_nowait()
            except queue.Empty:
                return
            del self.prefills[job.rid]
            if job.cancelled or job.error is not None:
                self.batch.pool.give_back([job.slot])
                if job.cancelled:
                    job.future.cancel()
                else:
                    job.future.set_exception(job.error)
                continue
            events = self.batch.start_text(job.rid, job.slot, len(job.payload["input_ids"]), job.logits,
                                           **self.text_options(job.payload))
            job.future.set_result(events)

    def remove(self, rid: str) -> None:
        if rid in self.prefills:  # its row is freed when the thread is done with it
            self.prefills[rid].cancelled = True
        else:
            super().remove(rid)

    def encode_images(self, pixels):
        """The vision program, on one core while the prefill thread runs beside stepping rows, else on all
        (as the VQ thread does)."""
        return self.vision.encode_images(pixels, single_thread=self.prefill_thread and bool(self.batch.sequences))

    # ---- steps

    def step(self):
        self.share_cores()
        return super().step()

    def free_cores(self, shared: bool) -> int:
        """The cores, halved when `shared` by the loop and a prefill."""
        return max(1, self.cores // 2) if shared else self.cores

    def share_cores(self) -> None:
        """Paddle's threads (eager layers only: the prefill thread runs there): half the cores while the
        prefill thread runs, all otherwise.

        Both at once on the same cores stall each other: Paddle's OpenMP ops wait at their
        barriers for a thread that is off the core, and Paddle's thread count is one setting for the
        whole process, so the loop and the prefill thread share it: half the cores each.
        At Janus-1.3B's sizes (bench/fullsize_serve.py --understand-concurrency 8, 2 cores, one
        session): 8 understanding requests at once made 1.68 tokens/s with this sharing and 1.38
        without it, and their median time per token after the first was 517 against 2244 ms (the
        steps beside each prefill).
        """
        want = self.free_cores(shared=bool(self.prefills))
        if want != self.step_threads:
            use_cpu_threads(want, blas=self.decoder is None)
            self.step_threads = want

    # ---- images in the background

    def decode(self, codes) -> np.ndarray:
        if self.vq_decoder is None:
            return super().decode(codes)
        return to_uint8_images(self.vq_decoder.decode(codes))

    def decode_images(self, codes) -> Future:
        if self.vq_decoder is None:
            return super().decode_images(codes)
        future: Future = Future()
        self.vq_jobs.put((codes, future))
        return future

    def vq_loop(self) -> None:
        """Thread: decode finished image codes with the VQ program."""
        while True:
            codes, future = self.vq_jobs.get()
            if not future.set_running_or_notify_cancel():  # cancelled while it waited
                continue
            # On every core, beside the steps. Measured at Janus-1.3B's sizes (bench/cpu_bench.py
            # --vq-overlap 8, 2-core AVX2 EPYC, OpenVINO decoder): one image decoded beside 8-row steps
            # took 0.874x the wall time of the two one after the other on all cores, 0.924x when it kept
            # to one core (a second, one-thread compiled copy, which this runtime used to keep).
            started = time.perf_counter()
            try:
                images = to_uint8_images(self.vq_decoder.decode(codes))
            except Exception as error:  # noqa: BLE001 - this request fails alone
                future.set_exception(error)
            else:
                future.set_result((images, time.perf_counter() - started))

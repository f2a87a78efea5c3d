"""What crosses between routes, the engine client and the model worker.

Routes build `UnderstandRequest` / `GenerateRequest`; the client answers with
`UnderstandResult` / `GenerateResult`, or streams `TokenEvent` /
`ProgressEvent` followed by the result. Failures are the `EngineError`
subclasses below; the HTTP layer maps each to one status code.
"""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any

IMAGE_TOKENS = 576  # codes per generated image (24 x 24)
DEFAULT_MEMORY_FRACTION = 0.7  # of the memory free after loading, for the KV cache (server/engine/memory.py)


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass
class UnderstandRequest:
    """Images + conversation -> text.

    `messages`: [{"role": "system"|"user"|"assistant", "content": str,
    "images": int}] where "images" counts how many of `images` belong to that
    message (in order); their placeholders go before the text unless the text
    contains `<image_placeholder>` itself.
    """

    messages: list[dict[str, Any]]
    images: list[Any] = dataclasses.field(default_factory=list)  # PIL images, already checked
    system_prompt: str | None = None  # None: the model's default understanding prompt
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    timeout: float | None = None  # seconds, queue + run; None: the engine's setting
    request_id: str = dataclasses.field(default_factory=new_request_id)


@dataclasses.dataclass
class GenerateRequest:
    """Prompt -> n images with classifier-free guidance."""

    prompt: str
    n: int = 1
    cfg_weight: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: a random seed, reported back per image
    preview_every: int = 0  # streamed: previews every this many steps (model/preview.py); 0: none
    timeout: float | None = None
    request_id: str = dataclasses.field(default_factory=new_request_id)


@dataclasses.dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "images": self.images,
        }


@dataclasses.dataclass
class Timings:
    """Seconds spent in each phase of one request."""

    queue: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    vq_decode: float = 0.0
    total: float = 0.0
    first_token: float | None = None  # seconds from arrival to the first token (understanding)

    def as_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TokenEvent:
    """New text of a streamed understanding request."""

    text: str
    token_ids: list[int]


@dataclasses.dataclass
class ProgressEvent:
    """A streamed generation request has finished `step` of `total` image-token steps; with
    `preview_every`, every that many steps also the previews so far ([n, 24, 24, 3] uint8)."""

    step: int
    total: int
    previews: Any = None


@dataclasses.dataclass
class UnderstandResult:
    request_id: str
    text: str
    finish_reason: str  # "stop" | "length"
    usage: Usage
    timings: Timings
    token_ids: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GenerateResult:
    request_id: str
    images: list[Any]  # numpy uint8 [384, 384, 3] each
    seeds: list[int]  # the seed of each image: n=1 with that seed gives that image again
    usage: Usage
    timings: Timings


class EngineError(Exception):
    """Base of every failure the engine reports to a caller."""

    status = 500
    code = "engine_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(EngineError):
    """The request cannot run on this model (e.g. longer than the context)."""

    status = 400
    code = "invalid_request"


class OverloadedError(EngineError):
    """The wait queue is full; try again after `retry_after` seconds."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class EngineNotReadyError(EngineError):
    status = 503
    code = "not_ready"

    def __init__(self, message: str, *, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


class WorkerRestartedError(EngineError):
    """The worker running this request died; it is being restarted."""

    status = 503
    code = "worker_restarted"

    def __init__(self, message: str, *, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(EngineError):
    status = 504
    code = "timeout"


class RequestFailedError(EngineError):
    """The model failed on this request alone (its batch-mates go on)."""

    status = 500
    code = "inference_failed"


@dataclasses.dataclass
class EngineConfig:
    """How the engine runs; `server.settings.Settings` fills it from env and flags."""

    model: str = "deepseek-ai/Janus-1.3B"  # known id, or a local checkpoint folder
    home: str | None = None  # model cache folder; None: $JANUS_HOME or ~/.cache/janus-server
    devices: list[str] = dataclasses.field(default_factory=lambda: ["auto"])  # "cpu", "0", "1", ...; one worker each
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    max_queue: int = 64  # requests waiting in the API process before "overloaded"
    # The KV cache takes memory_fraction of what a worker's device has free once the model is loaded
    # (server/engine/memory.py); max_batch_rows and max_cache_tokens only bound it.
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    max_batch_rows: int = 32  # rows (1 per understanding request, 2 per image) in one worker batch, at most
    max_cache_tokens: int | None = None  # KV-cache positions per worker, over all rows, at most (None: no bound)
    max_new_tokens_limit: int = 2048  # the longest answer a request may ask for; every cache row holds one
    max_running_requests: int = 0  # per worker; 0: as many as the rows allow (1 switches batching off)
    request_timeout: float = 600.0  # seconds, queue + run
    restart_delay: float = 1.0  # seconds before a worker that died while loading is started again; doubles each time
    offline: bool = False  # never download
    threads: int | None = None  # CPU threads per worker (OMP_NUM_THREADS); None: all cores / workers
    cpu_engine: str = "auto"  # CPU decoder layers: "openvino" programs (model/cpu_decoder.py), "eager" Paddle, "auto"
    cpu_precision: str = "exact"  # the OpenVINO decoder's: "exact" (float32), "int8", "int4", "bf16" (lossy, opt-in)
    program_cache: str = "auto"  # compiled CPU decoder programs: "auto" (<home>/programs), "off", or a folder
    cpu_vq: str = "auto"  # CPU VQ decoder: "openvino" (in a thread beside the decode loop), "eager", "auto"
    cpu_vision: str = "auto"  # CPU image encoder (SigLIP + aligner): "openvino", "eager", "auto"
    prefill_chunk: int | None = None  # prompt tokens per piece beside running requests; None: the runtime's; 0: whole

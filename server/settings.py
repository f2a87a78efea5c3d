"""Server settings: environment variables JANUS_<NAME>, overridden by `janus-server serve --<name>` flags."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.engine.types import DEFAULT_MEMORY_FRACTION, EngineConfig

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JANUS_", extra="forbid")

    model: str = Field(
        "deepseek-ai/Janus-1.3B", description="Known model id, a local checkpoint folder, or 'janus-tiny'."
    )
    home: str | None = Field(None, description="Model cache folder (default $JANUS_HOME or ~/.cache/janus-server).")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    devices: CommaList = Field(
        default_factory=lambda: ["auto"], description="Comma-separated: auto, cpu, or GPU ids; one worker each."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads per worker (default: all cores / workers).")
    cpu_engine: Literal["auto", "eager", "openvino"] = Field(
        "auto", description="CPU language-model layers: OpenVINO programs built from the weights (one copy of the "
        "weights, in --cpu-precision), eager Paddle (the reference), or auto (OpenVINO when installed).")
    cpu_precision: Literal["exact", "int8", "int4", "bf16"] = Field(
        "exact", description="Precision of the CPU decoder's programs: exact (float32, the reference's outputs), or "
        "the lossy, faster int8 and int4 (weights) and bf16 (compute; CPUs with AMX or AVX512-BF16 only).")
    program_cache: str = Field(
        "auto", description="Folder for the CPU decoder's compiled programs, so that a later start imports them "
        "instead of reading those weights and compiling: auto (<home>/programs), off, or a folder.")
    cpu_vq: Literal["auto", "eager", "openvino"] = Field(
        "auto", description="CPU VQ image decoder: OpenVINO (about 4x faster, runs beside the decode loop), "
        "eager Paddle, or auto (OpenVINO when the openvino package is installed).")
    prefill_chunk: int | None = Field(
        None, ge=0, description="Prompt tokens prefilled per piece between the decode steps while other requests "
        "run, so that their answers wait for a piece instead of a whole prompt (one that arrives when none run is "
        "prefilled whole): default 64 with the OpenVINO CPU decoder and 512 on GPU; 0 prefills every prompt whole.")
    cpu_vision: Literal["auto", "eager", "openvino"] = Field(
        "auto", description="CPU image encoder for understanding (SigLIP + aligner): OpenVINO (one call that "
        "releases the GIL, so it overlaps the decode loop), eager Paddle, or auto (OpenVINO when installed).")
    api_key: SecretStr | None = Field(
        None, description="If set, requests need 'Authorization: Bearer <key>' (not /health, /ready, /metrics)."
    )
    cors_origins: CommaList = Field(default_factory=list, description="Comma-separated origins allowed by CORS.")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest request body.")
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a connection may take to send a request's headers before it is closed.")
    max_connections: int = Field(
        1024, ge=1, description="Connections served at once; a request on one more gets 503 and is closed.")
    max_images: int = Field(4, ge=1, description="Most images in one understanding request.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest width x height of an uploaded image.")
    max_prompt_chars: int = Field(65536, ge=1, description="Longest prompt / conversation text, in characters.")
    max_new_tokens_limit: int = Field(
        2048, ge=1, description="Largest max_new_tokens / max_tokens a request may ask for; every KV-cache row "
        "holds one image and a question plus this many tokens."
    )
    max_queue: int = Field(64, ge=1, description="Requests waiting before the server answers 429.")
    memory_fraction: float = Field(
        DEFAULT_MEMORY_FRACTION, gt=0, le=1, description="Share of the memory free once the model is loaded (host "
        "RAM on CPU, the GPU's own on GPU) that a worker's KV cache takes; the rest is room for activations.")
    max_batch_rows: int = Field(
        32, ge=1, description="Most rows in one worker batch (1 per text request, 2 per image); fewer if memory is short.")
    max_cache_tokens: int | None = Field(
        None, ge=1, description="Most KV-cache positions per worker, over all rows (default: as memory allows).")
    max_running_requests: int = Field(
        0, ge=0, description="Requests running at once per worker; 0: as many as the rows allow, 1: no batching."
    )
    request_timeout: float = Field(600.0, gt=0, description="Seconds a request may wait and run before 504.")
    offline: bool = Field(False, description="Never download a model.")
    allow_remote_images: bool = Field(False, description="Fetch http(s) image URLs in requests.")
    allow_private_image_hosts: bool = Field(
        False, description="Also fetch image URLs whose host is a private, loopback or link-local address."
    )
    remote_image_timeout: float = Field(10.0, gt=0, description="Seconds to fetch one remote image.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_json: bool = Field(True, description="Log one JSON object per line (else plain text).")
    timeout_graceful_shutdown: float = Field(
        60.0, ge=0, description="Seconds to let running requests finish after SIGTERM."
    )

    @field_validator("devices", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            home=self.home,
            devices=list(self.devices),
            dtype=self.dtype,
            max_queue=self.max_queue,
            max_batch_rows=self.max_batch_rows,
            max_cache_tokens=self.max_cache_tokens,
            memory_fraction=self.memory_fraction,
            max_new_tokens_limit=self.max_new_tokens_limit,
            max_running_requests=self.max_running_requests,
            request_timeout=self.request_timeout,
            offline=self.offline,
            threads=self.threads,
            cpu_engine=self.cpu_engine,
            cpu_precision=self.cpu_precision,
            program_cache=self.program_cache,
            cpu_vq=self.cpu_vq,
            cpu_vision=self.cpu_vision,
            prefill_chunk=self.prefill_chunk,
        )

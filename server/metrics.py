"""Prometheus metrics: one CollectorRegistry per app, engine stats read at scrape time."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.types import UnderstandResult

if TYPE_CHECKING:
    from server.engine.client import EngineClient

log = logging.getLogger("janus.metrics")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)


class EngineStatsCollector(Collector):
    """Reads EngineClient.stats() on each scrape."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.engine.stats()
        except Exception:  # a scrape must not fail because the engine is starting or stopping
            log.debug("engine stats unavailable", exc_info=True)
            return
        gauges = {
            "janus_queue_length": ("Requests waiting for a worker.", stats.queue_length),
            "janus_running_rows": ("Batch rows running in the workers.", stats.running_rows),
            "janus_running_requests": ("Requests running in the workers.", stats.running_requests),
            "janus_workers_alive": ("Model workers up.", stats.workers_alive),
            "janus_workers_total": ("Model workers configured.", stats.workers_total),
            "janus_steps_per_second": ("Decode steps per second over all workers.", stats.steps_per_second),
        }
        for name, (documentation, value) in gauges.items():
            yield GaugeMetricFamily(name, documentation, value=value)
        yield CounterMetricFamily(
            "janus_tokens_generated", "Text tokens generated.", value=stats.tokens_generated_total
        )
        yield CounterMetricFamily(
            "janus_images_generated", "Images generated.", value=stats.images_generated_total
        )
        yield CounterMetricFamily("janus_decode_steps", "Batched decode steps run.", value=stats.steps_total)
        caches = {
            "janus_kv_cache_bytes": ("Bytes of each worker's KV cache, as it sized it from free memory.", "bytes"),
            "janus_kv_cache_rows": ("Rows of each worker's KV cache (1 per understanding request, 2 per image).",
                                    "rows"),
            "janus_kv_cache_row_positions": ("Positions per KV-cache row: the longest prompt and answer.", "row_length"),
            "janus_kv_cache_images_at_once": ("Images a worker's KV cache holds at once.", "images_at_once"),
            "janus_memory_free_bytes": ("Memory a worker's device had free once the model was loaded.", "free_bytes"),
        }
        for name, (documentation, key) in caches.items():
            family = GaugeMetricFamily(name, documentation, labels=["worker", "device"])
            for cache in self.engine.caches:
                family.add_metric([str(cache["worker"]), cache["device"]], cache[key])
            yield family
        yield CounterMetricFamily(
            "janus_worker_restarts", "Model workers restarted after dying.", value=stats.worker_restarts_total
        )
        deaths = CounterMetricFamily(
            "janus_worker_deaths", "Model worker processes that died, by cause (killed_while_loading is most "
            "likely the OOM killer).", labels=["cause"])
        for cause, count in stats.worker_deaths.items():
            deaths.add_metric([cause], count)
        yield deaths


class ServerMetrics:
    def __init__(self, engine: EngineClient):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "janus_requests", "HTTP requests by route and status.", ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "janus_request_duration_seconds", "HTTP request latency, to the end of the response.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "janus_time_to_first_token_seconds", "Understanding requests: arrival to the first token.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "janus_time_per_output_token_seconds", "Understanding requests: seconds per token after the first.",
            buckets=TOKEN_BUCKETS, registry=self.registry,
        )
        self.registry.register(EngineStatsCollector(engine))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_latency.labels(route).observe(seconds)

    def observe_understanding(self, result: UnderstandResult) -> None:
        first_token = result.timings.first_token
        if first_token is None:
            return
        self.time_to_first_token.observe(first_token)
        later_tokens = result.usage.completion_tokens - 1
        if later_tokens > 0:
            self.time_per_output_token.observe(max(0.0, result.timings.total - first_token) / later_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

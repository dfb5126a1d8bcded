"""Prometheus metrics: HTTP and generation counters, latency histograms, and the engine's own state."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..request import RequestOutput
from .engine_loop import LoopSnapshot, RequestStream

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses",
             "/v1/messages", "/v1/messages/count_tokens", "/v1/prompts", "/tokenize", "/detokenize")
METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS")


def endpoint_label(path: str) -> str:
    """A bounded label: known routes, /v1/prompts/{name}, or 'other'."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/prompts/"):
        return "/v1/prompts/{name}"
    return "other"


class _EngineCollector:
    """Exports the loop's latest snapshot of the engine (read on the loop thread, so always consistent)."""

    def __init__(self, snapshot: Callable[[], LoopSnapshot]):
        self._snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        s = self._snapshot()
        yield GaugeMetricFamily("softprompt_queue_depth", "Requests waiting to join the running batch", value=s.waiting)
        yield GaugeMetricFamily("softprompt_running_batch_size", "Requests in the running batch", value=s.running)
        yield GaugeMetricFamily("softprompt_kv_blocks_total", "Blocks in the KV pool", value=s.kv_blocks_total)
        yield GaugeMetricFamily("softprompt_kv_blocks_free", "Free blocks in the KV pool", value=s.kv_blocks_free)
        yield CounterMetricFamily("softprompt_prefix_cache_hits", "Prefix K/V cache hits", value=s.prefix_hits)
        yield CounterMetricFamily("softprompt_prefix_cache_misses", "Prefix K/V computations", value=s.prefix_misses)
        yield CounterMetricFamily("softprompt_prefix_cache_evictions", "Prefixes evicted", value=s.prefix_evictions)
        yield CounterMetricFamily("softprompt_block_cache_queried_tokens", "Input tokens of admitted requests looked "
                                  "up in the request-block cache", value=s.block_cache_queried_tokens)
        yield CounterMetricFamily("softprompt_block_cache_hit_tokens", "Of those, tokens whose K/V were cached",
                                  value=s.block_cache_hit_tokens)
        yield GaugeMetricFamily("softprompt_block_cache_blocks", "KV blocks holding cached request tokens",
                                value=s.block_cache_blocks)
        yield CounterMetricFamily("softprompt_preemptions", "Sequences preempted for recompute", value=s.preemptions)
        yield CounterMetricFamily("softprompt_engine_steps", "Engine steps run", value=s.steps)


class ServerMetrics:
    """One registry per app (several servers can live in one process, e.g. in tests)."""

    def __init__(self, snapshot: Callable[[], LoopSnapshot] | None = None):
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("softprompt_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "method", "code"], registry=r)
        self.requests = Counter("softprompt_requests", "Generation requests ended, by task and finish reason",
                                ["task", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("softprompt_prompt_tokens", "Input tokens of generation requests", ["task"],
                                     registry=r)
        self.generation_tokens = Counter("softprompt_generation_tokens", "Generated tokens", ["task"], registry=r)
        self.rejected = Counter("softprompt_rejected_requests", "Requests refused before reaching the engine",
                                ["reason"], registry=r)
        self.in_flight = Gauge("softprompt_requests_in_flight", "Engine requests accepted and not yet ended",
                               registry=r)
        self.ttft = Histogram("softprompt_time_to_first_token_seconds", "Time to first token", ["task"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("softprompt_inter_token_latency_seconds", "Time between a request's tokens", ["task"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("softprompt_request_latency_seconds", "Arrival to last token", ["task"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        if snapshot is not None:
            r.register(_EngineCollector(snapshot))
        self._lock = threading.Lock()
        self._progress: dict[str, tuple[int, float]] = {}  # request id -> (tokens seen, time of the last one)

    def observe_output(self, stream: RequestStream, out: RequestOutput, now: float) -> None:
        """Called on the loop thread for every output the engine returns."""
        task = stream.task
        with self._lock:
            seen, last = self._progress.get(out.request_id, (0, None))
            new = len(out.token_ids) - seen
            if out.finished:
                self._progress.pop(out.request_id, None)
            else:
                self._progress[out.request_id] = (len(out.token_ids), now)
        if new > 0:
            self.generation_tokens.labels(task).inc(new)
            if seen == 0 and out.timing is not None and out.timing.ttft is not None:
                self.ttft.labels(task).observe(out.timing.ttft)
            elif last is not None:
                self.itl.labels(task).observe((now - last) / new)
        if out.finished:
            self.requests.labels(task, out.finish_reason).inc()
            self.prompt_tokens.labels(task).inc(len(out.input_ids))
            if out.timing is not None and out.timing.latency is not None:
                self.latency.labels(task).observe(out.timing.latency)

    def observe_abort(self, stream: RequestStream, request_id: str) -> None:
        with self._lock:
            self._progress.pop(request_id, None)
        self.requests.labels(stream.task, "abort").inc()

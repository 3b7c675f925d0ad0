"""Observability: Prometheus metrics in the text exposition format, and one JSON log line per request.

No client library: a handful of counters, gauges and histograms rendered as the text format
(https://prometheus.io/docs/instrumenting/exposition_formats/) is all /metrics needs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Callable

ACCESS_LOG = "lorakit.serve.access"
TOKEN_RATE_WINDOW = 10.0  # seconds over which lorakit_generation_tokens_per_second is averaged


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for n, v in zip(names, values))
    return "{" + inner + "}"


class Counter:
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple, float] = {} if labels else {(): 0.0}
        self.lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(labels[n] for n in self.label_names)
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self.values.get(tuple(labels[n] for n in self.label_names), 0.0)

    def render(self) -> list[str]:
        with self.lock:
            return [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in sorted(self.values.items())]


class Gauge:
    """A value read when /metrics is scraped."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help_text, read

    def render(self) -> list[str]:
        return [f"{self.name} {self.read():g}"]


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.count, self.sum = 0, 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.count += 1
            self.sum += value
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1

    def render(self) -> list[str]:
        with self.lock:
            lines = [f'{self.name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
            return lines + [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:g}",
                            f"{self.name}_count {self.count}"]


class Metrics:
    """Every metric the server exports; engine, adapter cache and HTTP layer update them."""

    def __init__(self) -> None:
        seconds = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("lorakit_requests_total", "HTTP requests answered, by endpoint and status",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter("lorakit_prompt_tokens_total", "prompt tokens processed")
        self.generation_tokens = Counter("lorakit_generation_tokens_total", "tokens generated")
        self.finished = Counter("lorakit_sequences_finished_total", "generated sequences by finish reason",
                                ("reason",))
        self.batch_size = Histogram("lorakit_batch_size", "sequences per decoding step",
                                    (1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.prefill_batch_tokens = Histogram("lorakit_prefill_tokens_per_step", "prompt tokens per prefill step",
                                              (16, 64, 128, 256, 512, 1024, 2048))
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "time from arrival to the first token", seconds)
        self.latency = Histogram("lorakit_request_duration_seconds", "time from arrival to the last token", seconds)
        self.adapter_hits = Counter("lorakit_adapter_cache_hits_total",
                                    "requests whose adapter was already resident, by tier (compute, host)",
                                    ("tier",))
        self.adapter_loads = Counter("lorakit_adapter_loads_total",
                                     "adapters brought in, by source (disk -> host, host -> compute slot)",
                                     ("source",))
        self.adapter_evictions = Counter("lorakit_adapter_evictions_total", "adapters evicted, by tier", ("tier",))
        self.adapter_load_failures = Counter("lorakit_adapter_load_failures_total", "adapters that failed to load")
        self._token_times: deque[tuple[float, int]] = deque()
        self._token_lock = threading.Lock()
        self.gauges: list[Gauge] = [Gauge("lorakit_generation_tokens_per_second",
                                          f"tokens generated per second over the last {TOKEN_RATE_WINDOW:g} s",
                                          self.token_rate)]

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help_text, read))

    def tokens_generated(self, count: int) -> None:
        self.generation_tokens.inc(count)
        now = time.monotonic()
        with self._token_lock:
            self._token_times.append((now, count))
            while self._token_times and self._token_times[0][0] < now - TOKEN_RATE_WINDOW:
                self._token_times.popleft()

    def token_rate(self) -> float:
        now = time.monotonic()
        with self._token_lock:
            return sum(c for t, c in self._token_times if t >= now - TOKEN_RATE_WINDOW) / TOKEN_RATE_WINDOW

    def render(self) -> str:
        metrics = [self.requests, self.prompt_tokens, self.generation_tokens, self.finished, self.batch_size,
                   self.prefill_batch_tokens, self.ttft, self.latency, self.adapter_hits, self.adapter_loads,
                   self.adapter_evictions, self.adapter_load_failures, *self.gauges]
        lines = []
        for metric in metrics:
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}", *metric.render()]
        return "\n".join(lines) + "\n"


class AccessLog:
    """ASGI middleware: one JSON line per HTTP request when its response is complete (after the last streamed
    event), with what the handler put into `request.state.log` (model, token counts, ...)."""

    def __init__(self, app, metrics: Metrics, routes: frozenset[str] = frozenset(),
                 logger: logging.Logger | None = None) -> None:
        self.app, self.metrics = app, metrics
        self.routes = routes  # metric labels: these paths, every other path counts as "other"
        self.logger = logger or logging.getLogger(ACCESS_LOG)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        state["log"] = {}
        status = {"code": 500}
        logged = False

        def write() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            path = scope.get("path", "")
            record = {"ts": round(time.time(), 3), "method": scope.get("method"), "path": path,
                      "status": status["code"], "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                      "client": (scope.get("client") or ("", 0))[0], **state["log"]}
            self.metrics.requests.inc(endpoint=path if path in self.routes else "other", status=status["code"])
            self.logger.info(json.dumps(record, ensure_ascii=False))

        async def logging_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                write()  # before the last bytes go out: a client holding its whole answer finds the line written
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            write()  # a stream cut short by the client, or an exception

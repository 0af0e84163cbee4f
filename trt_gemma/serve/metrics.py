"""Prometheus metrics of one server app (its own CollectorRegistry, so several apps in one process never clash).

Names and buckets follow vLLM / NIM (docs/facts/serving-telemetry.md §2; vLLM v1/metrics/loggers.py, whose buckets
TRT-LLM's collector copies), unprefixed as NIM exports them, each with a `model_name` label:
  num_requests_running, num_requests_waiting, kv_cache_usage_perc (0..1)   gauges
  time_to_first_token_seconds, time_per_output_token_seconds, e2e_request_latency_seconds   histograms
  prompt_tokens_total, generation_tokens_total, request_success_total{finished_reason},
  request_error_total{http_code}                                          counters
plus ours:
  memory_bytes{kind}   kind = weights | kv_cache | device_used | device_total | host_rss | unified_available |
                       engine | activations (device runtimes)
                       (definitions in telemetry/snapshot.py; a kind this host cannot measure is omitted, never 0)
Gauges are computed at scrape time; nothing is drained by reading.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from trt_gemma.telemetry import MEMORY_KINDS
from trt_gemma.telemetry.fields import available

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, model_name: str, running: Callable[[], float], waiting: Callable[[], float],
                 kv_usage: Callable[[], float], memory: Callable[[], dict]):
        self.registry = r = CollectorRegistry()
        self.model_name = m = model_name
        lbl = ["model_name"]
        Gauge("num_requests_running", "Number of requests generating now.", lbl,
              registry=r).labels(m).set_function(running)
        Gauge("num_requests_waiting", "Number of admitted requests waiting for a generation slot.", lbl,
              registry=r).labels(m).set_function(waiting)
        Gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lbl,
              registry=r).labels(m).set_function(kv_usage)
        self.ttft = Histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.", lbl,
                              buckets=TTFT_BUCKETS, registry=r).labels(m)
        self.tpot = Histogram("time_per_output_token_seconds", "Decode time of each output token after the first.",
                              lbl, buckets=TPOT_BUCKETS, registry=r).labels(m)
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", lbl,
                             buckets=E2E_BUCKETS, registry=r).labels(m)
        self.prompt_tokens = Counter("prompt_tokens", "Prefilled prompt tokens.", lbl, registry=r).labels(m)
        self.generation_tokens = Counter("generation_tokens", "Generated tokens.", lbl, registry=r).labels(m)
        self._success = Counter("request_success", "Finished requests by finish reason (cancelled = client left).",
                                lbl + ["finished_reason"], registry=r)
        self._errors = Counter("request_error", "Requests answered with an HTTP error.", lbl + ["http_code"],
                               registry=r)
        r.register(_MemoryCollector(m, memory))

    def success(self, finished_reason: str) -> None:
        self._success.labels(self.model_name, finished_reason).inc()

    def error(self, http_code: int) -> None:
        self._errors.labels(self.model_name, str(http_code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _MemoryCollector:
    """memory_bytes{kind}: read from a fresh telemetry snapshot at each scrape."""

    def __init__(self, model_name: str, memory: Callable[[], dict]):
        self.model_name, self.memory = model_name, memory

    def collect(self):
        g = GaugeMetricFamily("memory_bytes", "Memory by kind in bytes (see trt_gemma/telemetry/snapshot.py).",
                              labels=["model_name", "kind"])
        try:
            values = self.memory()
        except Exception:  # a telemetry source failing must not break the scrape
            values = {}
        for kind in MEMORY_KINDS:
            v = values.get(kind)
            if available(v):
                g.add_metric([self.model_name, kind], float(v))
        yield g

    def describe(self):
        return []

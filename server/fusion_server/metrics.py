"""Prometheus metrics: a StatsSink that turns router stats into `fusion_*` metrics.

The CollectorRegistry is injected (tests use their own). Per-member gauges are read
at scrape time from the live engines, labelled `member`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FAST_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1)


class PrometheusSink:
    """Router metrics with the `fusion_` prefix."""

    def __init__(self, registry: CollectorRegistry, member_names: list[str]) -> None:
        self.member_names = member_names
        self.requests = Counter(
            "fusion_requests_total",
            "Requests by RPC and gRPC status code.",
            ["rpc", "code"],
            registry=registry,
        )
        self.running = Gauge(
            "fusion_running_requests", "Requests generating now.", registry=registry
        )
        self.e2e = Histogram(
            "fusion_request_duration_seconds",
            "Router time of a request, submit to release.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.fanout_seconds = Histogram(
            "fusion_step_fanout_seconds",
            "Time for all members to return one request's next top-k.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.fuse_seconds = Histogram(
            "fusion_fuse_seconds",
            "Time to align, fuse and sample one batch of ready requests.",
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.batch = Histogram(
            "fusion_fuse_batch_size",
            "Requests fused together in one vectorised call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.generated = Counter(
            "fusion_generated_tokens_total", "Fused tokens generated.", registry=registry
        )
        self.agree = Counter(
            "fusion_member_agreement_total",
            "Steps where the member's top-1 equals the fused choice.",
            ["member"],
            registry=registry,
        )
        self.engine_requests = Gauge(
            "fusion_member_engine_requests",
            "Requests the member's engine still tracks.",
            ["member"],
            registry=registry,
        )

    def track_members(self, members: list[Any]) -> None:
        for member in members:
            self.engine_requests.labels(member.name).set_function(member.num_engine_requests)

    def request_started(self) -> None:
        self.running.inc()

    def request_finished(self, request: Any, seconds: float) -> None:
        self.running.dec()
        self.e2e.observe(seconds)

    def fanout(self, seconds: float) -> None:
        self.fanout_seconds.observe(seconds)

    def fused(self, seconds: float, batch: int) -> None:
        self.fuse_seconds.observe(seconds)
        self.batch.observe(batch)

    def token(self, request: Any, agree: list[bool]) -> None:
        self.generated.inc()
        for name, same in zip(self.member_names, agree, strict=True):
            if same:
                self.agree.labels(name).inc()

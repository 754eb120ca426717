"""Plain router statistics; a metrics logger (metrics.py) turns them into Prometheus.

Contract: the router calls the `on_*` hooks; this class keeps cheap running totals
(read by tests and the benchmark), derives per-request latencies (time to first
token from arrival, including any queueing; inter-token latency between a request's
consecutive tokens) and forwards each event to an optional sink.
"""

from __future__ import annotations

import time
from typing import Any, Protocol


class StatsSink(Protocol):
    def request_queued(self, queued: int) -> None: ...
    def request_started(self, request: Any) -> None: ...
    def request_finished(self, request: Any, seconds: float) -> None: ...
    def fanout(self, seconds: float) -> None: ...
    def fused(self, seconds: float, batch: int) -> None: ...
    def token(
        self, request: Any, agree: list[bool], ttft: float | None, itl: float | None
    ) -> None: ...


class RouterStats:
    """Running totals of the router's work."""

    def __init__(self, sink: StatsSink | None = None) -> None:
        self.sink = sink
        self.requests = 0
        self.tokens = 0
        self.fuse_calls = 0
        self.fused_rows = 0
        self.fuse_seconds = 0.0

    def on_queue(self, queued: int) -> None:
        if self.sink:
            self.sink.request_queued(queued)

    def on_submit(self, request: Any) -> None:
        self.requests += 1
        if self.sink:
            self.sink.request_started(request)

    def on_release(self, request: Any) -> None:
        if self.sink:
            self.sink.request_finished(request, time.perf_counter() - request.started)

    def on_fanout(self, seconds: float) -> None:
        if self.sink:
            self.sink.fanout(seconds)

    def on_fuse(self, seconds: float, batch: int) -> None:
        self.fuse_calls += 1
        self.fused_rows += batch
        self.fuse_seconds += seconds
        if self.sink:
            self.sink.fused(seconds, batch)

    def on_token(self, request: Any, agree: list[bool]) -> None:
        self.tokens += 1
        now = time.perf_counter()
        last, request.last_token_at = request.last_token_at, now
        if self.sink:
            ttft = now - request.arrived if last is None else None
            itl = None if last is None else now - last
            self.sink.token(request, agree, ttft, itl)

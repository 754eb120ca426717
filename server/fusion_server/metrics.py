"""Prometheus metrics: a StatsSink that turns router stats into `fusion_*` metrics.

The CollectorRegistry is injected (tests use their own). Per-member figures carry a
`member` label: the engines' own scheduler figures (running/waiting requests,
KV-cache usage) arrive through a vLLM stat logger per member (engines/member.py),
the per-member step time is measured by the member's sessions, and the count of
requests an engine front-end still tracks is read at scrape time. The full list,
with units and meaning, is in docs/metrics.md.
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
        self.queued = Gauge(
            "fusion_queued_requests",
            "Requests waiting for a running slot (limits.max_queued_requests bounds it).",
            registry=registry,
        )
        self.ttft = Histogram(
            "fusion_time_to_first_token_seconds",
            "Arrival (queueing included) to the first fused token.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "fusion_inter_token_latency_seconds",
            "Time between consecutive fused tokens of one request.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "fusion_prompt_tokens_total",
            "Prompt tokens of admitted requests (shared tokenizer's count).",
            registry=registry,
        )
        self.policy_requests = Counter(
            "fusion_policy_requests_total",
            "Admitted requests by fusion policy in use.",
            ["policy"],
            registry=registry,
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
            "Requests the member's engine front-end still tracks (0 when no session leaks).",
            ["member"],
            registry=registry,
        )
        self.engine_running = Gauge(
            "fusion_member_engine_running_requests",
            "Requests the member engine's scheduler runs (vLLM's count at its last step).",
            ["member"],
            registry=registry,
        )
        self.engine_waiting = Gauge(
            "fusion_member_engine_waiting_requests",
            "Requests waiting in the member engine's scheduler.",
            ["member"],
            registry=registry,
        )
        self.kv_usage = Gauge(
            "fusion_member_kv_cache_usage_ratio",
            "Fraction of the member engine's KV-cache blocks in use (0-1).",
            ["member"],
            registry=registry,
        )
        self.member_step_seconds = Histogram(
            "fusion_member_step_seconds",
            "One session step on a member: ids sent to its top-k back.",
            ["member"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.member_up = Gauge(
            "fusion_member_up",
            "1 while the member's engine runs, 0 while it is dead or restarting.",
            ["member"],
            registry=registry,
        )
        self.member_restarts = Counter(
            "fusion_member_restarts_total",
            "Times the member's engine was restarted after it died.",
            ["member"],
            registry=registry,
        )

    def track_members(self, members: list[Any]) -> None:
        """Read engine figures from the members from now on (also after restarts)."""
        for member in members:
            name = member.name
            self.engine_requests.labels(name).set_function(member.num_engine_requests)
            self.member_up.labels(name).set_function(lambda m=member: float(m.running))
            self.member_restarts.labels(name)  # exported as 0 from the start
            self.member_step_seconds.labels(name)
            member.observer = self

    # -- EngineObserver (engines/member.py) ------------------------------------
    def engine_step(self, member: str, running: int, waiting: int, kv_usage: float) -> None:
        self.engine_running.labels(member).set(running)
        self.engine_waiting.labels(member).set(waiting)
        self.kv_usage.labels(member).set(kv_usage)

    def member_step(self, member: str, seconds: float) -> None:
        self.member_step_seconds.labels(member).observe(seconds)

    def member_restarted(self, member: str) -> None:
        self.member_restarts.labels(member).inc()

    # -- StatsSink (router/stats.py) -------------------------------------------
    def request_queued(self, queued: int) -> None:
        self.queued.set(queued)

    def request_started(self, request: Any) -> None:
        self.running.inc()
        self.prompt_tokens.inc(len(request.prompt_ids))
        self.policy_requests.labels(
            getattr(request.policy, "name", type(request.policy).__name__)
        ).inc()

    def request_finished(self, request: Any, seconds: float) -> None:
        self.running.dec()
        self.e2e.observe(seconds)

    def fanout(self, seconds: float) -> None:
        self.fanout_seconds.observe(seconds)

    def fused(self, seconds: float, batch: int) -> None:
        self.fuse_seconds.observe(seconds)
        self.batch.observe(batch)

    def token(self, request: Any, agree: list[bool], ttft: float | None, itl: float | None) -> None:
        self.generated.inc()
        if ttft is not None:
            self.ttft.observe(ttft)
        if itl is not None:
            self.itl.observe(itl)
        for name, same in zip(self.member_names, agree, strict=True):
            if same:
                self.agree.labels(name).inc()

"""Run the gRPC server: FusionService, health, reflection, metrics; start and stop engines.

Order of events: the gRPC port opens at once with health NOT_SERVING (so probes
and clients get a clean UNAVAILABLE); the members start one after another; health
turns SERVING once every engine is warm. SIGTERM/SIGINT: NOT_SERVING, stop taking
new requests, let in-flight ones finish for `server.grace_seconds`, shut engines down.

A watchdog checks the members twice a second. When one is down: health NOT_SERVING
(its in-flight requests have already failed with UNAVAILABLE, or go on without it
under degraded fusion); a dead local engine is restarted in place (with backoff if the
restart fails; `server.restart_members: false` leaves it down), a worker is relaunched
or reconnected by RemoteMember; SERVING again once every member is up -- the server
process never restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from fusion_client._proto.fusion.v1 import fusion_pb2, fusion_pb2_grpc

from .api.auth import AuthInterceptor
from .api.servicer import FusionServicer
from .config import EnsembleConfig, TLSConfig
from .metrics import PrometheusSink
from .router.ensemble import Ensemble
from .router.router import Router
from .router.stats import RouterStats

log = logging.getLogger(__name__)

SERVICE_NAME = fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].full_name
WATCH_SECONDS = 0.5
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


class FusionServer:
    """One ensemble behind one gRPC server."""

    def __init__(self, config: EnsembleConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.servicer = FusionServicer(config)
        self.health = (
            health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        )
        self.grpc_server: grpc.aio.Server | None = None
        self.ensemble: Ensemble | None = None
        self.port = 0
        self.metrics_port = 0
        self.sink: PrometheusSink | None = None
        self._stopped = asyncio.Event()
        self._watchdog: asyncio.Task | None = None
        self._member_failed = asyncio.Event()

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            result = self.health.set(service, status)
            if asyncio.iscoroutine(result):
                await result

    async def start(self) -> None:
        cfg = self.config.server
        interceptors = [AuthInterceptor(cfg.auth.load_tokens())] if cfg.auth else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.config.limits.max_message_bytes),
                ("grpc.max_send_message_length", self.config.limits.max_message_bytes),
            ],
        )
        fusion_pb2_grpc.add_FusionServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls is not None:
            self.port = server.add_secure_port(address, _server_credentials(cfg.tls))
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"server.port: cannot bind {cfg.host}:{cfg.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self.grpc_server = server
        if cfg.metrics_port >= 0:
            httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.registry)
            self.metrics_port = httpd.server_port
        log.info(
            "gRPC listening on %s:%d (metrics on %d); starting engines",
            cfg.host,
            self.port,
            self.metrics_port,
        )
        print(
            f"fusion: gRPC on {cfg.host}:{self.port}, metrics on :{self.metrics_port}; starting members",
            flush=True,
        )

        self.ensemble = await Ensemble.start(self.config)
        self.sink = sink = PrometheusSink(self.registry, self.ensemble.member_names)
        sink.track_members(self.ensemble.members)
        self.servicer.on_rpc_done = lambda rpc, code: sink.requests.labels(rpc, code).inc()
        limits = self.config.limits
        router = Router(
            self.ensemble,
            limits.max_concurrent_requests,
            RouterStats(sink),
            max_queued=limits.max_queued_requests,
            degrade=self.config.fusion.on_member_failure == "degrade",
        )
        router.on_engine_failure = self._member_failed.set
        router.start()
        self.servicer.router = router
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_members())
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        names = ", ".join(self.ensemble.member_names)
        print(f"fusion: SERVING the ensemble [{names}] on port {self.port}", flush=True)

    async def _watch_members(self) -> None:
        """Health follows the members: NOT_SERVING while any is down; restart dead local engines.

        Remote members (workers) are not restarted from here: a launched worker is
        relaunched and an `endpoint:` one reconnected by RemoteMember itself.
        """
        assert self.ensemble is not None
        serving = True
        while not self._stopped.is_set():
            with contextlib.suppress(asyncio.TimeoutError):  # woken early by a failing request
                await asyncio.wait_for(self._member_failed.wait(), WATCH_SECONDS)
            self._member_failed.clear()
            if self._stopped.is_set():
                return
            dead = [m for m in self.ensemble.members if not m.running]
            if dead and serving:
                log.error("member(s) down: %s; NOT_SERVING", ", ".join(m.name for m in dead))
                await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                serving = False
            elif not dead and not serving:
                log.info("all members up; SERVING")
                await self._set_health(health_pb2.HealthCheckResponse.SERVING)
                serving = True
            if self.config.server.restart_members:
                for member in dead:
                    if hasattr(member, "restart"):
                        await self._restart(member)

    async def _restart(self, member) -> None:
        for attempt, pause in enumerate((0.0, *RESTART_BACKOFF)):
            await asyncio.sleep(pause)
            if self._stopped.is_set():
                return
            try:
                await member.restart()
            except Exception:
                log.exception("member %s: restart %d failed", member.name, attempt + 1)
                continue
            if self.sink is not None:
                self.sink.member_restarted(member.name)
            return
        log.error("member %s: giving up after %d restarts", member.name, attempt + 1)

    async def stop(self) -> None:
        """Drain and shut down: NOT_SERVING, finish in-flight requests, stop engines."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.servicer.draining = True
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.config.server.grace_seconds)
        if self.servicer.router is not None:
            await self.servicer.router.stop()
        if self.ensemble is not None:
            self.ensemble.shutdown()
        log.info("server stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


def _server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """TLS from PEM files; a client CA means mutual TLS with client certificates required."""

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    ca = read(tls.client_ca_file) if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(read(tls.key_file), read(tls.cert_file))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def serve(config: EnsembleConfig) -> None:
    """Run until SIGTERM / SIGINT."""
    server = FusionServer(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    starting = asyncio.create_task(server.start())
    waiter = asyncio.create_task(stop_requested.wait())
    try:
        done, _ = await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()  # raise start-up errors
            await waiter
        else:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
    finally:
        print("fusion: shutting down", flush=True)
        await server.stop()

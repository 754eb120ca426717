"""`fusion worker`: one ensemble member (a local Member) served over gRPC (engine.proto).

Contract: the worker knows nothing of fusion, other members or text. It runs one
engine and answers the router's batched Step streams: each SessionStep that carries
ids is sent to that session (the first one opens it), and its top-k comes back in a
SessionResult; results that are ready together leave in one StepResponse. A stream
that ends (router gone) closes all its sessions. Health: NOT_SERVING until the
engine is warm, SERVING after; if the engine dies the worker exits non-zero so that
its supervisor (Kubernetes, or the `fusion serve` that launched it) can restart it.
SIGTERM: NOT_SERVING, streams get `grace` seconds, the engine shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import signal
import subprocess
import sys
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fusion_client._proto.fusion.v1 import engine_pb2 as pb
from fusion_client._proto.fusion.v1 import engine_pb2_grpc

from ..config import MemberConfig
from .member import EngineUnavailable, Member
from .remote import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EngineWorker"].full_name
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
)
"""Files sent in Info so the router loads the same tokenizer (weights never are)."""
WATCHDOG_S = 1.0


def tokenizer_files(model_dir: str) -> list[pb.TokenizerFile]:
    root = pathlib.Path(model_dir)
    return [
        pb.TokenizerFile(name=name, content=(root / name).read_bytes())
        for name in TOKENIZER_FILES
        if (root / name).is_file()
    ]


def step_error(err: BaseException) -> pb.StepError:
    if isinstance(err, EngineUnavailable) or type(err).__name__ in (
        "EngineDeadError",
        "EngineGenerateError",
    ):
        return pb.STEP_ERROR_UNAVAILABLE
    if isinstance(err, ValueError):
        return pb.STEP_ERROR_INVALID_INPUT
    return pb.STEP_ERROR_INTERNAL


class EngineWorkerServicer(engine_pb2_grpc.EngineWorkerServicer):
    """Info and Step over one started member (a Member, or a fake in unit tests)."""

    def __init__(self, member, fingerprint: str, files: list[pb.TokenizerFile]) -> None:
        self.member = member
        self.fingerprint = fingerprint
        self.files = files
        self.instance_id = uuid.uuid4().hex
        self.ready = False
        self.batches_in = 0
        """StepRequest messages received (all streams)."""
        self.steps_in = 0
        """SessionSteps received (all streams); steps_in / batches_in = batching factor."""
        self.batches_out = 0
        """StepResponse messages sent (all streams)."""

    async def Info(self, request, context):
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is not warm yet")
        m = self.member
        return pb.InfoResponse(
            model=str(m.config.model),
            vocab_size=m.vocab_size,
            max_model_len=m.max_model_len,
            top_k=m.top_k,
            tokenizer_fingerprint=self.fingerprint,
            tokenizer_files=self.files,
            engine_requests=m.num_engine_requests(),
            instance_id=self.instance_id,
        )

    async def Step(self, request_iterator, context):
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is not warm yet")
        await _Stream(self, context).run()


class _Stream:
    """One router connection: its sessions, their in-flight steps, the result batch."""

    def __init__(self, servicer: EngineWorkerServicer, context) -> None:
        self.servicer = servicer
        self.member = servicer.member
        self.context = context
        self.sessions: dict[int, tuple[object, asyncio.Task | None]] = {}
        self.results = pb.StepResponse()
        self.wake = asyncio.Event()
        # Engine request ids must be unique: several routers (replicas) may send the
        # same request id, so each stream adds its own tag.
        self.tag = uuid.uuid4().hex[:8]

    async def run(self) -> None:
        writer = asyncio.get_running_loop().create_task(self._write())
        try:
            while True:
                request = await self.context.read()
                if request is grpc.aio.EOF:
                    return
                self.servicer.batches_in += 1
                self.servicer.steps_in += len(request.steps)
                for step in request.steps:
                    if step.close:
                        self._close(step.session)
                    else:
                        self._send(step)
        finally:
            writer.cancel()
            for handle in list(self.sessions):
                self._close(handle)

    def _send(self, step: pb.SessionStep) -> None:
        entry = self.sessions.get(step.session)
        try:
            if entry is None:
                session = self.member.open_session(f"{step.request_id or step.session}@{self.tag}")
            else:
                session, previous = entry
                if previous is not None and not previous.done():
                    raise RuntimeError("a step was sent before the previous one was answered")
            session.send(list(step.token_ids), prompt_nll=step.prompt_nll)
        except Exception as err:
            self._failed(step.session, err)
            return
        task = asyncio.get_running_loop().create_task(self._answer(step.session, session))
        self.sessions[step.session] = (session, task)

    async def _answer(self, handle: int, session) -> None:
        try:
            top = await session.receive()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._failed(handle, err)
            return
        self.results.results.add(
            session=handle,
            token_ids=top.ids.tolist(),
            logprobs=top.logprobs.tolist(),
            prompt_nll=session.prompt_nll,
        )
        self.wake.set()

    def _failed(self, handle: int, err: BaseException) -> None:
        code = step_error(err)
        if code == pb.STEP_ERROR_INTERNAL:
            log.error("session %d failed", handle, exc_info=err)
        self.results.results.add(
            session=handle, error=code, error_message=f"{type(err).__name__}: {err}"
        )
        self.wake.set()
        self._close(handle)

    def _close(self, handle: int) -> None:
        entry = self.sessions.pop(handle, None)
        if entry is not None:
            asyncio.get_running_loop().create_task(_close_session(*entry))

    async def _write(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.results = self.results, pb.StepResponse()
            self.servicer.batches_out += 1
            await self.context.write(batch)


async def _close_session(session, task: asyncio.Task | None) -> None:
    """Stop a pending receive first: the session's output stream has one reader."""
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    await session.close()


# -- the process ----------------------------------------------------------------------
async def serve_worker(
    member_config: MemberConfig,
    top_k: int,
    address: str,
    grace: float = 10.0,
    exit_with_parent: bool = False,
) -> int:
    """Serve one member on `address` (host:port or unix:PATH) until SIGTERM / SIGINT
    (or, with exit_with_parent, until the process that started it is gone)."""
    parent = os.getppid()
    from ..router.ensemble import load_vocab

    fingerprint = load_vocab(member_config.model).fingerprint
    member = Member(member_config, top_k=top_k)
    servicer = EngineWorkerServicer(member, fingerprint, tokenizer_files(member_config.model))
    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ]
    )
    engine_pb2_grpc.add_EngineWorkerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
        server,
    )
    if address.startswith("unix:"):  # a stale socket of a worker that was killed
        with contextlib.suppress(FileNotFoundError):
            pathlib.Path(address[len("unix:") :]).unlink()
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot bind {address}")

    async def set_health(status) -> None:
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, status)

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    print(f"fusion worker: gRPC on {address}; starting {member_config.model}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        starting = loop.create_task(member.start())
        stopping = loop.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return 0
        starting.result()
        servicer.ready = True
        await set_health(health_pb2.HealthCheckResponse.SERVING)
        print(f"fusion worker: SERVING member {member.name!r} on {address}", flush=True)
        while not stop.is_set():  # watchdog: a dead engine makes the worker useless
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCHDOG_S)
            if not member.running:
                log.error("the engine of member %s died; exiting", member.name)
                code = 1
                break
            if exit_with_parent and os.getppid() != parent:
                log.error("the server that launched this worker is gone; exiting")
                break
        stopping.cancel()
    finally:
        servicer.ready = False
        await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace)
        member.shutdown()
        print("fusion worker: stopped", flush=True)
    return code


def spawn_worker(
    member_config: MemberConfig, top_k: int, address: str, env: dict | None = None
) -> subprocess.Popen:
    """Start `fusion worker` for a local member (server.member_workers) on `address`."""
    import json

    args = [
        sys.executable,
        "-m",
        "fusion_server",
        "worker",
        "--model",
        str(member_config.model),
        "--name",
        member_config.name,
        "--top-k",
        str(top_k),
        "--listen",
        address,
        "--engine-json",
        json.dumps(member_config.engine),
        "--exit-with-parent",
    ]
    # Its own process group, so that RemoteMember can kill the worker with its EngineCore;
    # not its own session: with scheduler autogroups (one per session) a new session
    # made lock-step round trips ~20x slower on a loaded machine (measured).
    return subprocess.Popen(args, env={**os.environ, **(env or {})}, preexec_fn=os.setpgrp)


def worker_main(args, defaults: dict) -> int:
    """`fusion worker`: parse engine settings, resolve the model, serve until SIGTERM."""
    import json

    import yaml

    from ..config import ConfigError, EnsembleConfig, _resolve_demo_members

    engine: dict = {}
    if args.engine_json:
        try:
            engine.update(json.loads(args.engine_json))
        except json.JSONDecodeError as err:
            raise ConfigError("--engine-json", f"not valid JSON: {err}") from None
    for item in args.engine:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--engine", f"expected KEY=VALUE, got {item!r}")
        engine[key] = yaml.safe_load(value)
    if not 1 <= args.top_k <= 128:
        raise ConfigError("--top-k", f"must be in [1, 128], got {args.top_k}")
    name = args.name or pathlib.Path(args.model).name.replace("demo:", "") or "member"
    config = EnsembleConfig(members=[MemberConfig(name=name, model=args.model, engine=engine)])
    _resolve_demo_members(config)
    member = config.with_engine_defaults(defaults).members[0]
    if not pathlib.Path(member.model).is_dir():
        raise ConfigError("--model", f"no such model directory: {member.model!r}")
    address = args.listen or f"{args.host}:{args.port}"
    return asyncio.run(
        serve_worker(member, args.top_k, address, args.grace_seconds, args.exit_with_parent)
    )

"""A member served by a `fusion worker` process, reached over gRPC (engine.proto).

Contract: RemoteMember / RemoteSession have exactly the surface of Member / Session
that the router uses, so the router cannot tell a remote member from a local one.
One bidirectional Step stream per worker connection multiplexes every session:
sends made in the same event-loop turn (a router step of many requests) leave as one
StepRequest, and the worker's batched StepResponse resolves their receives.

Failure: when the stream breaks (worker killed, restarted, unreachable) every
unanswered receive and every later send of the sessions opened on it raises
EngineUnavailable (-> gRPC UNAVAILABLE), new sessions are refused the same way, and
the member reconnects in the background; once the worker answers Info again with the
same vocabulary, new requests use it. Sessions are never migrated (their KV cache
died with the worker).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable

import grpc
import numpy as np

from fusion_client._proto.fusion.v1 import engine_pb2 as pb
from fusion_client._proto.fusion.v1 import engine_pb2_grpc

from ..config import MemberConfig
from ..fusion.candidates import MemberTopK
from .member import EngineUnavailable

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Info carries the tokenizer files (tens of MB for large vocabularies)."""
START_TIMEOUT_S = 900.0
"""How long `start` waits for a worker's engine to be warm."""
RECONNECT_MAX_DELAY_S = 2.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A restarted worker is found again within ~2 s, not gRPC's default 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # A worker pod that vanishes without closing its connection is noticed in ~15 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

_ERRORS = {
    pb.STEP_ERROR_UNAVAILABLE: EngineUnavailable,
    pb.STEP_ERROR_INVALID_INPUT: ValueError,
}


class RemoteMember:
    """A member whose engine runs in a `fusion worker` at `endpoint`."""

    def __init__(
        self,
        config: MemberConfig,
        top_k: int,
        endpoint: str | None = None,
        spawn: Callable[[], subprocess.Popen] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.top_k = top_k
        self.endpoint = endpoint or config.endpoint
        self._spawn = spawn
        self.process = spawn() if spawn is not None else None
        """The worker process when this server launched it (server.member_workers);
        relaunched when it exits."""
        self.max_model_len = 0
        self.vocab_size = 0
        self.info: pb.InfoResponse | None = None
        self.tokenizer_dir: str | None = None
        """Directory holding the worker's tokenizer files (after `start`)."""
        self._channel: grpc.aio.Channel | None = None
        self._stub: engine_pb2_grpc.EngineWorkerStub | None = None
        self._conn: _Connection | None = None
        self._reconnect: asyncio.Task | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._closed = False

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Connect, wait until the worker's engine is warm, fetch Info, open the stream."""
        self._channel = grpc.aio.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)
        self._stub = engine_pb2_grpc.EngineWorkerStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"member {self.name!r}: worker process exited with {self.process.returncode}"
                )
            try:
                info = await self._stub.Info(pb.InfoRequest(), timeout=10)
                break
            except grpc.RpcError as err:
                if err.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                if time.monotonic() > deadline:
                    raise EngineUnavailable(
                        f"member {self.name!r}: no worker ready at {self.endpoint} "
                        f"within {timeout:.0f} s ({err.details()})"
                    ) from None
                await asyncio.sleep(0.5)
        if info.top_k < self.top_k:
            raise ValueError(
                f"member {self.name!r}: worker at {self.endpoint} returns top-{info.top_k}, "
                f"fusion.top_k is {self.top_k} (start the worker with --top-k {self.top_k})"
            )
        self.info = info
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        if self.config.model is None:  # GetEnsemble shows what the worker serves
            self.config = dataclasses.replace(self.config, model=f"{info.model} @ {self.endpoint}")
        self._tmp = tempfile.TemporaryDirectory(prefix=f"fusion-tokenizer-{self.name}-")
        for f in info.tokenizer_files:
            (pathlib.Path(self._tmp.name) / pathlib.Path(f.name).name).write_bytes(f.content)
        self.tokenizer_dir = self._tmp.name
        self._conn = _Connection(self, self._stub.Step())
        log.info("member %s: connected to worker %s (%s)", self.name, self.endpoint, info.model)

    @property
    def running(self) -> bool:
        return self._conn is not None and self._conn.alive

    def open_session(self, request_id: str) -> RemoteSession:
        if not self.running:
            raise EngineUnavailable(
                f"member {self.name!r}: worker at {self.endpoint} is not connected"
            )
        return RemoteSession(self._conn, f"{request_id}:{self.name}")

    def num_engine_requests(self) -> int:
        """Sessions open on the worker from this router (the worker's own count: Info)."""
        conn = self._conn
        return len(conn.sessions) if conn is not None else 0

    def shutdown(self) -> None:
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._conn is not None:
            self._conn.lose(None)
            self._conn = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()  # the worker drains and shuts its engine down
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=60)
            _kill_group(self.process)
            if self.endpoint.startswith("unix:"):  # the private directory of its socket
                shutil.rmtree(pathlib.Path(self.endpoint[len("unix:") :]).parent, True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- reconnecting ---------------------------------------------------------------
    def _lost(self, conn: _Connection, reason: str) -> None:
        if self._closed or conn is not self._conn:
            return
        log.warning(
            "member %s: lost worker %s (%s); reconnecting", self.name, self.endpoint, reason
        )
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = 0.2
        while not self._closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY_S)
            if self.process is not None and self.process.poll() is not None:
                log.warning(
                    "member %s: worker process exited with %s; relaunching",
                    self.name,
                    self.process.returncode,
                )
                _kill_group(self.process)  # its EngineCore outlives a killed worker
                self.process = self._spawn()
            try:
                info = await self._stub.Info(pb.InfoRequest(), timeout=5)
            except grpc.RpcError:
                continue
            same = (info.tokenizer_fingerprint, info.vocab_size, info.max_model_len) == (
                self.info.tokenizer_fingerprint,
                self.info.vocab_size,
                self.info.max_model_len,
            )
            if not same or info.top_k < self.top_k:
                log.error(
                    "member %s: the worker at %s now serves %s with another vocabulary or "
                    "limits; not using it (restart the router to accept a new model)",
                    self.name,
                    self.endpoint,
                    info.model,
                )
                delay = RECONNECT_MAX_DELAY_S * 5
                continue
            self.info = info
            self._conn = _Connection(self, self._stub.Step())
            log.info("member %s: reconnected to worker %s", self.name, self.endpoint)
            return


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL what is left of a launched worker's process group (its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


class _Connection:
    """One Step stream: a writer that batches queued steps, a reader that routes results."""

    _handles = itertools.count(1)

    def __init__(self, member: RemoteMember, call) -> None:
        self.member = member
        self.call = call
        self.alive = True
        self.sessions: dict[int, RemoteSession] = {}
        self._batch = pb.StepRequest()
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write(), name=f"worker-write-{member.name}")
        self._reader = loop.create_task(self._read(), name=f"worker-read-{member.name}")

    def new_handle(self) -> int:
        return next(self._handles)

    def post(self) -> pb.StepRequest:
        """The batch being built; the writer sends it once the current loop turn ends."""
        self._wake.set()
        return self._batch

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._batch = self._batch, pb.StepRequest()
                await self.call.write(batch)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.lose(err)

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    raise EngineUnavailable("the worker ended the stream")
                sessions = self.sessions
                for result in response.results:
                    session = sessions.get(result.session)
                    if session is not None:
                        session._deliver(result)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.lose(err)

    def lose(self, err: BaseException | None) -> None:
        """The stream is gone: fail its sessions, stop its tasks, let the member reconnect."""
        if not self.alive:
            return
        self.alive = False
        reason = err.code().name if isinstance(err, grpc.RpcError) else str(err or "shut down")
        error = EngineUnavailable(
            f"member {self.member.name!r}: worker at {self.member.endpoint} is unavailable ({reason})"
        )
        for session in list(self.sessions.values()):
            session._fail(error)
        self.sessions.clear()
        current = asyncio.current_task()
        for task in (self._writer, self._reader):
            if task is not current:
                task.cancel()
        self.call.cancel()
        if err is not None:
            self.member._lost(self, reason)


class RemoteSession:
    """One request's session on a remote member; same contract as engines.member.Session."""

    def __init__(self, conn: _Connection, request_id: str) -> None:
        self._conn = conn
        self.request_id = request_id
        self.handle = conn.new_handle()
        self.num_tokens = 0
        self.prompt_nll = 0.0
        self._unanswered: collections.deque[asyncio.Future] = collections.deque()
        self._unreceived: collections.deque[asyncio.Future] = collections.deque()
        self._error: BaseException | None = None
        self._opened = False
        self._closed = False

    def send(self, ids: list[int], prompt_nll: bool = False) -> None:
        """Queue ids for the worker without waiting (pair with `receive`)."""
        if self._closed:
            raise RuntimeError(f"session {self.request_id} is closed")
        if self._error is not None:
            raise self._error
        conn = self._conn
        if not conn.alive:
            raise EngineUnavailable(f"member {conn.member.name!r} is not connected")
        batch = conn.post()
        if not self._opened:
            self._opened = True
            conn.sessions[self.handle] = self
            batch.steps.add(
                session=self.handle,
                request_id=self.request_id,
                token_ids=ids,
                prompt_nll=prompt_nll,
            )
        else:
            batch.steps.add(session=self.handle, token_ids=ids)
        self.num_tokens += len(ids)
        future = asyncio.get_running_loop().create_future()
        self._unanswered.append(future)
        self._unreceived.append(future)

    async def receive(self) -> MemberTopK:
        """The member's top-k for the next position after the oldest unanswered `send`."""
        result = await self._unreceived.popleft()
        k = self._conn.member.top_k
        if result.prompt_nll:
            self.prompt_nll = result.prompt_nll
        return MemberTopK(
            ids=np.array(result.token_ids[:k], dtype=np.int64),
            logprobs=np.array(result.logprobs[:k], dtype=np.float64),
        )

    def _deliver(self, result: pb.SessionResult) -> None:
        future = self._unanswered.popleft()
        if result.error:
            klass = _ERRORS.get(result.error, RuntimeError)
            err = klass(f"member {self._conn.member.name!r}: {result.error_message}")
            self._fail(err)  # the worker closed the session
            self._conn.sessions.pop(self.handle, None)
            if not future.done():
                future.set_exception(err)
        elif not future.done():
            future.set_result(result)

    def _fail(self, err: BaseException) -> None:
        self._error = err
        while self._unanswered:
            future = self._unanswered.popleft()
            if not future.done():
                future.set_exception(err)

    async def close(self) -> None:
        """End the session; the worker frees the request and its KV cache."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn.sessions.pop(self.handle, None) is not None and conn.alive:
            conn.post().steps.add(session=self.handle, close=True)
        for future in self._unreceived:  # nobody will await these any more
            if future.done() and not future.cancelled():
                future.exception()
            else:
                future.cancel()
        self._unreceived.clear()

"""FusionClient (sync) and AsyncFusionClient (grpc.aio) for the fusion.v1 API.

Needs only grpcio and protobuf: the standard health check is called through a raw
channel method with a hand-encoded message, so grpcio-health-checking is not a
dependency. Both clients build their requests with `build_request`, the one place
that maps keyword options onto a GenerateRequest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from fusion_client._proto.fusion.v1 import fusion_pb2, fusion_pb2_grpc

DEFAULT_TARGET = "localhost:50051"

# Channel options every client starts with; the caller's `options` override them.
# A short reconnect backoff keeps wait_ready() prompt when a server takes minutes to
# come up (gRPC's own cap is 120 s), and per-token details can outgrow the 4 MiB default.
_DEFAULT_OPTIONS: dict[str, Any] = {
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# grpc.health.v1.HealthCheckResponse.ServingStatus, by number.
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
# Codes that mean "not up yet" to wait_ready(); anything else is raised.
_NOT_READY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _fusion_params(policy, weights, params, roles) -> fusion_pb2.FusionParams:
    return fusion_pb2.FusionParams(
        policy=policy, weights=weights or {}, params=params or {}, roles=roles or {}
    )


def build_request(
    prompt: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    ignore_eos: bool = False,
    policy: str = "",
    weights: Mapping[str, float] | None = None,
    params: Mapping[str, float] | None = None,
    roles: Mapping[str, str] | None = None,
    logprobs: int = 0,
    member_details: bool = False,
    request_id: str = "",
) -> fusion_pb2.GenerateRequest:
    """Builds a GenerateRequest; optional fields (max_tokens, temperature, top_p, seed) stay unset when None."""
    if isinstance(stop, str):
        stop = (stop,)
    sampling = fusion_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=list(stop),
        ignore_eos=ignore_eos,
    )
    fusion = _fusion_params(policy, weights, params, roles)
    output = fusion_pb2.OutputOptions(logprobs=logprobs, member_details=member_details)
    return fusion_pb2.GenerateRequest(
        request_id=request_id, prompt=prompt, sampling=sampling, fusion=fusion, output=output
    )


def build_score_request(
    prompt: str,
    continuation: str,
    *,
    policy: str = "",
    weights: Mapping[str, float] | None = None,
    params: Mapping[str, float] | None = None,
    roles: Mapping[str, str] | None = None,
    token_details: bool = False,
    request_id: str = "",
) -> fusion_pb2.ScoreRequest:
    """Builds a ScoreRequest (the fusion options mean what they mean in build_request)."""
    fusion = _fusion_params(policy, weights, params, roles)
    return fusion_pb2.ScoreRequest(
        request_id=request_id,
        prompt=prompt,
        continuation=continuation,
        fusion=fusion,
        token_details=token_details,
    )


# --- grpc.health.v1 wire format, by hand --------------------------------------------


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Returns (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in HealthCheckResponse")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_health_request(service: str) -> bytes:
    """HealthCheckRequest{string service = 1}; the empty string is the default, so omitted."""
    raw = service.encode()
    return b"\x0a" + _encode_varint(len(raw)) + raw if raw else b""


def _decode_health_status(data: bytes) -> str:
    """HealthCheckResponse{ServingStatus status = 1} -> the status name; other fields skipped."""
    status, pos = 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:  # varint
            value, pos = _read_varint(data, pos)
            if field == 1:
                status = value
        elif wire_type == 1:  # 64-bit
            pos += 8
        elif wire_type == 2:  # length-delimited
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire_type == 5:  # 32-bit
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in HealthCheckResponse")
    if pos > len(data):
        raise ValueError("truncated HealthCheckResponse")
    return _HEALTH_STATUS.get(status, "UNKNOWN")


# --- clients ---------------------------------------------------------------------


class _ClientBase:
    """What both clients share: target, default timeout, metadata and channel options."""

    def __init__(
        self,
        channels: Any,
        target: str,
        timeout: float | None,
        metadata: Mapping[str, str] | Sequence[tuple[str, str]] | None,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        """channels: the module whose channels to open (`grpc` or `grpc.aio`)."""
        self.target = target
        self.timeout = timeout
        pairs = metadata.items() if isinstance(metadata, Mapping) else metadata or ()
        self.metadata = tuple((str(k), str(v)) for k, v in pairs)
        self._options = list({**_DEFAULT_OPTIONS, **dict(options)}.items())
        if credentials is None:
            self.channel = channels.insecure_channel(target, options=self._options)
        else:
            self.channel = channels.secure_channel(target, credentials, options=self._options)
        self.stub = fusion_pb2_grpc.FusionServiceStub(self.channel)
        self._health = self.channel.unary_unary(
            _HEALTH_CHECK,
            request_serializer=_encode_health_request,
            response_deserializer=_decode_health_status,
        )

    def _call_kwargs(self, timeout: float | None) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self.metadata or None,
        }


class FusionClient(_ClientBase):
    """Blocking client. `**options` of generate/generate_stream are build_request's keywords:
    max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, policy, weights, params, roles,
    logprobs, member_details, request_id."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(grpc, target, timeout, metadata, credentials, options)

    def generate(
        self, prompt: str, *, timeout: float | None = None, **options: Any
    ) -> fusion_pb2.GenerateResponse:
        """Generates a completion and returns it whole."""
        request = build_request(prompt, **options)
        return self.stub.Generate(request, **self._call_kwargs(timeout))

    def generate_stream(
        self, prompt: str, *, timeout: float | None = None, **options: Any
    ) -> Iterator[fusion_pb2.GenerateStreamResponse]:
        """Streams text deltas; the last message has finish_reason and usage.
        The returned iterator is the gRPC call: `.cancel()` stops generation."""
        request = build_request(prompt, **options)
        return self.stub.GenerateStream(request, **self._call_kwargs(timeout))

    def score(
        self, prompt: str, continuation: str, *, timeout: float | None = None, **options: Any
    ) -> fusion_pb2.ScoreResponse:
        """Fused and per-member log-likelihood of `continuation` after `prompt`.
        `**options`: build_score_request's keywords (policy, weights, params, roles,
        token_details, request_id)."""
        request = build_score_request(prompt, continuation, **options)
        return self.stub.Score(request, **self._call_kwargs(timeout))

    def get_ensemble(self, *, timeout: float | None = None) -> fusion_pb2.GetEnsembleResponse:
        """Describes the ensemble: members, policies, defaults."""
        return self.stub.GetEnsemble(fusion_pb2.GetEnsembleRequest(), **self._call_kwargs(timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Standard health check; returns UNKNOWN, SERVING, NOT_SERVING or SERVICE_UNKNOWN."""
        return self._health(service, **self._call_kwargs(timeout))

    def wait_ready(
        self, timeout: float = 60.0, *, service: str = "", interval: float = 0.25
    ) -> None:
        """Polls health until SERVING; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                last = self.health(service, timeout=max(deadline - time.monotonic(), 0.05))
                if last == "SERVING":
                    return
            except grpc.RpcError as err:
                if err.code() not in _NOT_READY_CODES:
                    raise
                last = err.code().name
            if time.monotonic() + interval > deadline:
                raise TimeoutError(f"{self.target} not SERVING after {timeout:g} s (last: {last})")
            time.sleep(interval)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FusionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncFusionClient(_ClientBase):
    """asyncio client (grpc.aio) with FusionClient's methods; create it inside a running loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(grpc.aio, target, timeout, metadata, credentials, options)

    async def generate(
        self, prompt: str, *, timeout: float | None = None, **options: Any
    ) -> fusion_pb2.GenerateResponse:
        """Generates a completion and returns it whole."""
        request = build_request(prompt, **options)
        return await self.stub.Generate(request, **self._call_kwargs(timeout))

    async def generate_stream(
        self, prompt: str, *, timeout: float | None = None, **options: Any
    ) -> AsyncIterator[fusion_pb2.GenerateStreamResponse]:
        """Streams text deltas; closing the iterator early cancels the call."""
        request = build_request(prompt, **options)
        call = self.stub.GenerateStream(request, **self._call_kwargs(timeout))
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    async def score(
        self, prompt: str, continuation: str, *, timeout: float | None = None, **options: Any
    ) -> fusion_pb2.ScoreResponse:
        """Fused and per-member log-likelihood of `continuation` after `prompt`."""
        request = build_score_request(prompt, continuation, **options)
        return await self.stub.Score(request, **self._call_kwargs(timeout))

    async def get_ensemble(self, *, timeout: float | None = None) -> fusion_pb2.GetEnsembleResponse:
        """Describes the ensemble: members, policies, defaults."""
        request = fusion_pb2.GetEnsembleRequest()
        return await self.stub.GetEnsemble(request, **self._call_kwargs(timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Standard health check; returns UNKNOWN, SERVING, NOT_SERVING or SERVICE_UNKNOWN."""
        return await self._health(service, **self._call_kwargs(timeout))

    async def wait_ready(
        self, timeout: float = 60.0, *, service: str = "", interval: float = 0.25
    ) -> None:
        """Polls health until SERVING; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                last = await self.health(service, timeout=max(deadline - time.monotonic(), 0.05))
                if last == "SERVING":
                    return
            except grpc.RpcError as err:
                if err.code() not in _NOT_READY_CODES:
                    raise
                last = err.code().name
            if time.monotonic() + interval > deadline:
                raise TimeoutError(f"{self.target} not SERVING after {timeout:g} s (last: {last})")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncFusionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

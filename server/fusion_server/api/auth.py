"""Bearer-token auth for the gRPC server (a grpc.aio server interceptor).

Every RPC needs metadata `authorization: Bearer <token>` with a configured token,
except the standard health service (so load balancers and probes need no secret)
and server reflection. A missing or wrong token gets UNAUTHENTICATED before the
request is even deserialized. Tokens are compared with hmac.compare_digest against
every configured token (no early exit), and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable

import grpc
import grpc.aio

OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
_SCHEME = "bearer "


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value[: len(_SCHEME)].lower() == _SCHEME:
            return value[len(_SCHEME) :].strip()
        return None
    return None


class TokenSet:
    """Configured tokens; `matches` runs in time independent of which one (if any) matches."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens]
        if not self._tokens:
            raise ValueError("at least one token is required")

    def matches(self, token: str | None) -> bool:
        candidate = (token or "").encode()
        found = False
        for known in self._tokens:
            found |= hmac.compare_digest(candidate, known)
        return found and token is not None


async def _deny(context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


async def _deny_unary(request, context):
    await _deny(context)


async def _deny_stream(request, context):
    await _deny(context)
    yield  # unreachable; makes this an async generator (a streaming behaviour)


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED.
    No request deserializer: the request is never parsed."""
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_deny_unary, None, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, None, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_deny_unary, None, serializer)
    return grpc.stream_stream_rpc_method_handler(_deny_stream, None, serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires a valid bearer token on every method outside OPEN_PREFIXES."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self.tokens = TokenSet(tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        if self.tokens.matches(bearer_token(handler_call_details.invocation_metadata)):
            return handler
        return _denying_handler(handler)

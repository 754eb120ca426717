"""The one place where exceptions become gRPC status codes.

validation -> INVALID_ARGUMENT, overload -> RESOURCE_EXHAUSTED, not ready / engine
dead -> UNAVAILABLE, not supported by this ensemble (Score across vocabularies, for
now) -> UNIMPLEMENTED, anything else -> INTERNAL with a generic message (the full
traceback goes to the server log only).
"""

from __future__ import annotations

import logging
import uuid

import grpc

from ..config import ConfigError
from ..engines.member import EngineUnavailable
from ..fusion.policies import PolicyError
from ..router.router import Overloaded, is_engine_failure
from ..router.score import Unsupported

log = logging.getLogger(__name__)


class ValidationError(ValueError):
    """A request field is invalid; the message starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotReady(RuntimeError):
    """The server is starting or draining."""


def status_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to (status code, client-facing message)."""
    if isinstance(err, (ValidationError, PolicyError, ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    if isinstance(err, Unsupported):
        return grpc.StatusCode.UNIMPLEMENTED, str(err)
    if isinstance(err, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {err}"
    if isinstance(err, (NotReady, EngineUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, str(err)
    if is_engine_failure(err):
        return grpc.StatusCode.UNAVAILABLE, f"a member engine failed: {type(err).__name__}"
    incident = uuid.uuid4().hex[:12]
    log.error("internal error (incident %s)", incident, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}; see server log)"

"""A request as the router sees it: what was asked, and its state so far.

`GenerateParams` is the validated, protobuf-free form of a GenerateRequest (the
api layer builds it). `FusionRequest` is the mutable per-request state the router
advances one fused token at a time; it reports to its caller through `events`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..fusion.policies import Policy
from ..fusion.sampler import RequestRng, make_seed
from ..text import TextAssembler


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


@dataclass
class GenerateParams:
    """A validated generation request (no protobuf, no engine objects)."""

    request_id: str
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    policy: str = ""
    weights: dict[str, float] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    logprobs: int = 0
    member_details: bool = False


@dataclass
class MemberDetail:
    member: str
    logprob: float
    top_token_id: int


@dataclass
class TokenDetail:
    token_id: int
    text: str
    logprob: float
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)
    members: list[MemberDetail] = field(default_factory=list)


@dataclass
class StepStats:
    """How a request's steps were decided (reported with member_details)."""

    fused_steps: int = 0
    primary_only_steps: int = 0
    consulted: list[int] = field(default_factory=list)
    """Per member: steps it was consulted."""
    agreed: list[int] = field(default_factory=list)
    """Per member: consulted steps where its top-1 was the chosen token."""
    weights: dict[str, float] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    """Members fused up to the end (all but those dropped by degraded fusion)."""


@dataclass
class Delta:
    """What one router step produced for a request (sent to the API layer)."""

    text: str
    tokens: list[TokenDetail]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: StepStats | None = None
    """Set on the last delta."""


class FusionRequest:
    """Router-side state of one request."""

    def __init__(
        self,
        params: GenerateParams,
        prompt_ids: list[int],
        policy: Policy,
        policy_params: dict[str, float],
        weights: np.ndarray,
        max_tokens: int,
        roles: dict[str, tuple[int, ...]] | None = None,
        member_prompt_ids: list[list[int]] | None = None,
    ) -> None:
        self.params = params
        self.prompt_ids = prompt_ids
        n = len(weights)
        # per member: the prompt in its own vocabulary (differs under byte alignment)
        self.member_prompt_ids = member_prompt_ids or [prompt_ids] * n
        self.policy = policy
        self.policy_params = policy_params
        self.weights = weights  # [M], sums to 1
        self.roles = roles or {}  # role -> member indices
        self.stats = StepStats(consulted=[0] * n, agreed=[0] * n)
        self.pending: list[list[int]] = [[] for _ in range(n)]  # ids not yet sent, per member
        self.consulted: list[bool] = [True] * n  # members whose top-k this step has
        self.dropped: set[int] = set()  # members lost mid-request (degraded fusion)
        self.max_tokens = max_tokens
        self.rng = RequestRng(make_seed() if params.seed is None else params.seed)
        self.text = TextAssembler(params.stop)
        self.sessions: list[Any] = []
        self.tops: list[Any] = []  # per member MemberTopK of the pending step
        self.own_tops: list[Any] = [None] * n  # per member: the last top-k it returned
        self.align_state: Any = None  # the alignment strategy's per-request state
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.step_task: asyncio.Task | None = None
        self.arrived = time.perf_counter()  # accepted by the API (queueing counts)
        self.started = 0.0  # admitted to run
        self.last_token_at: float | None = None
        self.events: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

    @property
    def id(self) -> str:
        return self.params.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

"""Fake ensemble members for router tests (no vLLM, no gRPC).

A ``FakeMember`` has the surface of ``engines.member.Member`` that the router and
the API layer use (``name``, ``config``, ``top_k``, ``vocab_size``,
``max_model_len``, ``open_session``, ``num_engine_requests``). Its sessions run a
tiny deterministic "model": a function ``model(prompt, generated) -> [V] log-probs``
of the token ids a session was sent. Sessions record every chunk of ids they get,
count themselves open/closed and can be held, delayed or made to fail through an
async ``hook``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from unittest import mock

import numpy as np

from fusion_server import config as config_module
from fusion_server.config import EnsembleConfig, FusionConfig, MemberConfig
from fusion_server.fusion.candidates import MemberTopK
from fusion_server.router.ensemble import Ensemble
from fusion_server.vocab import MemberVocab

# -- vocabulary -------------------------------------------------------------------
EOS = 256
BOS = 257
SHI = 258  # "世" whole
SHI_HEAD = 259  # first two bytes of "世"
E_ACUTE = 260  # "é" whole
HELLO = 261  # "hello"
WORLD = 262  # " world"
VOCAB = 263

TABLE: list[bytes] = (
    [bytes([b]) for b in range(256)]
    + [
        b"",  # EOS
        b"",  # BOS
        "世".encode(),
        "世".encode()[:2],
        "é".encode(),
        b"hello",
        b" world",
    ]
)
assert len(TABLE) == VOCAB


# A second vocabulary over the same ids: bytes, EOS, BOS, then other multi-byte pieces.
HE, LLO_W, SHI_TAIL, E_ACUTE_BANG, ORLD = 258, 259, 260, 261, 262
TABLE_B: list[bytes] = [
    *TABLE[:258],
    b"he",
    b"llo w",
    "世".encode()[1:],  # the last two bytes of "世"
    "é!".encode(),
    b"orld",
]
assert len(TABLE_B) == VOCAB


class FakeEncoder:
    """Continuation encoding for the fake vocabularies: one id per byte."""

    def __init__(self, table: list[bytes]):
        self.table = table

    def encode(self, data: bytes) -> list[int]:
        return list(data)


def byte_id(ch: str) -> int:
    """Id of a one-byte token."""
    (b,) = ch.encode()
    return b


class FakeTokenizer:
    """Bytes -> one id per byte (BOS first when add_special_tokens)."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = list(text.encode())
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}


# -- deterministic "models" ---------------------------------------------------------
Model = Callable[[tuple[int, ...], tuple[int, ...]], np.ndarray]


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max()
    return logits - top - np.log(np.exp(logits - top).sum())


def random_model(
    seed: int, shared: float = 1.0, own: float = 1.5, eos_bias: float = -30.0
) -> Model:
    """Logits = shared part (same for every member) + this member's own part, both
    pseudo-random functions of the whole context; EOS pushed down by ``eos_bias``."""

    def model(prompt, generated):
        context = tuple(prompt) + tuple(generated)
        logits = shared * 3.0 * _rng("shared", context).standard_normal(VOCAB)
        logits += own * 3.0 * _rng("own", seed, context).standard_normal(VOCAB)
        logits[EOS] += eos_bias
        return log_softmax(logits)

    return model


def scripted_model(script: Sequence[int], seed: int = 0, after: int = EOS) -> Model:
    """Puts a large logit on ``script[len(generated)]`` (``after`` once the script is
    over); the rest is small seeded noise."""
    script = list(script)

    def model(prompt, generated):
        n = len(generated)
        logits = 0.5 * _rng("script", seed, tuple(prompt), tuple(generated)).standard_normal(VOCAB)
        logits[script[n] if n < len(script) else after] += 12.0
        return log_softmax(logits)

    return model


def top_k_of(logprobs: np.ndarray, k: int) -> MemberTopK:
    """The k best ids, best first (ties by id)."""
    ids = np.argsort(-logprobs, kind="stable")[:k]
    return MemberTopK(ids=ids.astype(np.int64), logprobs=logprobs[ids].astype(np.float64))


# -- members and sessions -------------------------------------------------------------
Hook = Callable[["FakeSession"], Awaitable[None]]


class FakeSession:
    """One request's session on a FakeMember.

    Supports both session APIs: ``await step(ids)`` and ``send(ids)`` followed by
    ``await receive()`` (``step`` is exactly ``send`` + ``receive``). The fake model
    runs in ``receive``, after the member's jitter and ``hook``.
    """

    def __init__(self, member: FakeMember, request_id: str) -> None:
        self.member = member
        self.request_id = request_id
        self.chunks: list[list[int]] = []  # every ids chunk sent
        self.closed = False
        self.unanswered = 0  # chunks sent whose top-k was not received yet
        self.in_flight = 0  # receives currently running
        self.cancelled = 0  # receives cancelled while running
        self.completed = 0  # receives that returned a top-k
        self.prompt_nll = 0.0

    @property
    def prompt(self) -> tuple[int, ...]:
        return tuple(self.chunks[0]) if self.chunks else ()

    @property
    def generated(self) -> tuple[int, ...]:
        return tuple(t for chunk in self.chunks[1:] for t in chunk)

    @property
    def steps(self) -> int:
        return len(self.chunks)

    async def step(self, ids: list[int]) -> MemberTopK:
        self.send(ids)
        return await self.receive()

    def send(self, ids: list[int], prompt_nll: bool = False) -> None:
        if prompt_nll:  # mean NLL of the prompt's tokens under the fake model
            ids_ = list(ids)
            lps = [self.member.model(tuple(ids_[:i]), ())[ids_[i]] for i in range(1, len(ids_))]
            self.prompt_nll = -float(np.mean(lps)) if lps else 0.0
        if self.closed:
            raise RuntimeError(f"session {self.request_id}:{self.member.name} is closed")
        if self.unanswered:
            raise RuntimeError("fake session: send before the previous receive")
        self.chunks.append(list(ids))
        self.unanswered += 1

    async def receive(self) -> MemberTopK:
        if self.closed:
            raise RuntimeError(f"session {self.request_id}:{self.member.name} is closed")
        if not self.unanswered:
            raise RuntimeError("fake session: receive without send")
        self.in_flight += 1
        try:
            # deterministic jitter: sessions become ready at different loop turns
            for _ in range(self.member.jitter(self)):
                await asyncio.sleep(0)
            if self.member.hook is not None:
                await self.member.hook(self)
            logprobs = self.member.model(self.prompt, self.generated)
            self.completed += 1
            self.unanswered -= 1
            return top_k_of(logprobs, self.member.top_k)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.member.open_count -= 1


class FakeMember:
    """Same surface as engines.member.Member, backed by a deterministic model."""

    def __init__(
        self,
        name: str,
        model: Model,
        weight: float = 1.0,
        top_k: int = 5,
        max_jitter: int = 0,
        hook: Hook | None = None,
        max_model_len: int = 4096,
    ) -> None:
        self.config = MemberConfig(name=name, model="fake", weight=weight)
        self.name = name
        self.model = model
        self.top_k = top_k
        self.vocab_size = VOCAB
        self.max_model_len = max_model_len
        self.max_jitter = max_jitter
        self.hook = hook
        self.sessions: list[FakeSession] = []
        self.open_count = 0

    def jitter(self, session: FakeSession) -> int:
        if not self.max_jitter:
            return 0
        key = (self.name, session.request_id, session.steps)
        return int(_rng("jitter", key).integers(0, self.max_jitter + 1))

    def open_session(self, request_id: str) -> FakeSession:
        session = FakeSession(self, request_id)
        self.sessions.append(session)
        self.open_count += 1
        return session

    def num_engine_requests(self) -> int:
        return self.open_count

    def sessions_of(self, request_id: str) -> list[FakeSession]:
        return [s for s in self.sessions if s.request_id == request_id]

    def shutdown(self) -> None:
        pass


def make_ensemble(
    members: list[FakeMember],
    policy: str = "mean",
    tables: list[list[bytes]] | None = None,
    **fusion,
) -> Ensemble:
    """tables: one byte table per member (differing tables: byte alignment)."""
    # MemberConfig.check imports vLLM to list its engine settings (seconds); the fake
    # members have no engine settings, so skip that.
    with mock.patch.object(config_module, "_engine_arg_names", set):
        config = EnsembleConfig(
            members=[m.config for m in members],
            fusion=FusionConfig(policy=policy, top_k=max(m.top_k for m in members), **fusion),
        )
    vocabs = None
    if tables is not None:
        vocabs = [
            MemberVocab(
                tokenizer=FakeTokenizer(),
                table=list(table),
                specials=frozenset({EOS, BOS}),
                special_names={EOS: "<eos>", BOS: "<bos>"},
                eos_ids=frozenset({EOS}),
                kind="fake",
                fingerprint=hashlib.sha256(repr(table).encode()).hexdigest(),
                encoder=FakeEncoder(table),
            )
            for table in tables
        ]
    return Ensemble(
        config=config,
        members=members,
        tokenizer=FakeTokenizer(),
        table=list(tables[0] if tables else TABLE),
        eos_ids=frozenset({EOS}),
        vocab_size=VOCAB,
        fingerprint="fake",
        kind="fake",
        vocabs=vocabs,
    )

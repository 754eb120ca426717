"""Router unit tests on fake members (no vLLM, no gRPC): lock-step feeding, fusion
against an independent reference, stops, UTF-8 deltas, batching, release and errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
from fakes import (
    E_ACUTE,
    EOS,
    HELLO,
    SHI,
    SHI_HEAD,
    TABLE,
    VOCAB,
    WORLD,
    FakeMember,
    FakeSession,
    byte_id,
    make_ensemble,
    random_model,
    scripted_model,
)

from fusion_server.fusion.policies import Policy, normalize_weights
from fusion_server.router.request import Delta, FinishReason, FusionRequest, GenerateParams
from fusion_server.router.router import Overloaded, Router

TIMEOUT = 5.0  # seconds any one await on the router may take before the test fails

_ids = itertools.count()


# -- helpers -------------------------------------------------------------------------
def random_members(n: int = 3, weights=(1.0, 2.0, 0.5), **kwargs) -> list[FakeMember]:
    names = "abcdef"
    return [
        FakeMember(names[i], random_model(seed=i + 1), weight=weights[i], **kwargs)
        for i in range(n)
    ]


def scripted_members(script, n: int = 2, **kwargs) -> list[FakeMember]:
    names = "abcdef"
    return [FakeMember(names[i], scripted_model(script, seed=i), **kwargs) for i in range(n)]


@contextlib.asynccontextmanager
async def running(members: list[FakeMember], max_running: int = 64):
    router = Router(make_ensemble(members), max_running=max_running)
    router.start()
    try:
        yield router
    finally:
        await asyncio.wait_for(router.stop(), TIMEOUT)


def make_request(
    router: Router,
    prompt: str = "Once",
    *,
    policy: str | Policy = "mean",
    weights: dict[str, float] | None = None,
    request_id: str | None = None,
    max_tokens: int = 8,
    **gen,
) -> FusionRequest:
    """A FusionRequest built the way api/servicer.py `_build` builds one."""
    ensemble = router.ensemble
    params = GenerateParams(
        request_id=request_id or f"req-{next(_ids)}",
        prompt=prompt,
        max_tokens=max_tokens,
        policy=policy if isinstance(policy, str) else policy.name,
        weights=weights or {},
        **gen,
    )
    pol = router.policy(policy) if isinstance(policy, str) else policy
    return FusionRequest(
        params,
        ensemble.encode(prompt),
        pol,
        pol.validate_params(params.params),
        normalize_weights(
            ensemble.member_names,
            {m.name: m.config.weight for m in ensemble.members},
            params.weights,
        ),
        max_tokens,
        member_prompt_ids=ensemble.encode_members(prompt),
    )


@dataclass
class Outcome:
    request: FusionRequest
    deltas: list[Delta]
    error: BaseException | None

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def finish(self) -> FinishReason | None:
        return self.deltas[-1].finish_reason if self.deltas else None

    @property
    def tokens(self) -> list[int]:
        """Chosen token ids (needs logprobs > 0 or member_details)."""
        return [t.token_id for d in self.deltas for t in d.tokens]


async def collect(request: FusionRequest) -> tuple[list[Delta], BaseException | None]:
    """Read events until a finishing Delta or an exception."""
    deltas: list[Delta] = []
    while True:
        event = await asyncio.wait_for(request.events.get(), TIMEOUT)
        if isinstance(event, BaseException):
            return deltas, event
        deltas.append(event)
        if event.finish_reason is not None:
            return deltas, None


async def drive(router: Router, request: FusionRequest) -> Outcome:
    """Submit, read to the end, release (like the servicer's `_run`)."""
    router.submit(request)
    try:
        deltas, error = await collect(request)
    finally:
        await asyncio.wait_for(router.release(request), TIMEOUT)
    return Outcome(request, deltas, error)


async def generate(members, prompt="Once", **kwargs) -> Outcome:
    """One request alone on a fresh router."""
    async with running(members) as router:
        return await drive(router, make_request(router, prompt, **kwargs))


def sessions(members: list[FakeMember], request: FusionRequest) -> list[FakeSession]:
    out = [s for m in members for s in m.sessions_of(request.id)]
    assert len(out) == len(members)
    return out


async def until(predicate, what: str) -> None:
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"timed out waiting for {what}")


# -- independent reference ------------------------------------------------------------
def reference_step(members, weights, policy, prompt, generated):
    """Candidates (in union order) and their normalised fused log-probs, in plain Python."""
    reported = []  # per member: {token: logprob}, in rank order
    for m in members:
        lp = m.model(tuple(prompt), tuple(generated))
        best = sorted(range(VOCAB), key=lambda t: (-float(lp[t]), t))[: m.top_k]
        reported.append({t: float(lp[t]) for t in best})
    candidates: list[int] = []
    for rep in reported:
        candidates += [t for t in rep if t not in candidates]

    def prob(i: int, t: int) -> float:
        rep = reported[i]
        if t in rep:
            return math.exp(rep[t])
        probs = [math.exp(v) for v in rep.values()]
        residual = max(1.0 - sum(probs), 1e-12)
        return min(min(probs), residual / (VOCAB - len(rep)))

    live = [i for i, w in enumerate(weights) if w > 0]

    def score(t: int) -> float:
        if policy == "mean":
            return math.log(sum(weights[i] * prob(i, t) for i in live))
        if policy == "product":
            return sum(weights[i] * math.log(prob(i, t)) for i in live)
        if policy == "max":
            return math.log(max(prob(i, t) for i in live))
        raise ValueError(policy)

    scores = [score(t) for t in candidates]
    top = max(scores)
    lse = top + math.log(sum(math.exp(s - top) for s in scores))
    return candidates, [s - lse for s in scores]


def reference_greedy(members, weights, policy, prompt_ids, max_tokens):
    """(token, fused logprob) pairs of greedy decoding up to EOS or max_tokens."""
    weights = [w / sum(weights) for w in weights]
    out: list[tuple[int, float]] = []
    generated: list[int] = []
    while len(generated) < max_tokens:
        candidates, logprobs = reference_step(members, weights, policy, prompt_ids, generated)
        best = max(range(len(candidates)), key=lambda j: (logprobs[j], -j))  # ties: first
        out.append((candidates[best], logprobs[best]))
        generated.append(candidates[best])
        if candidates[best] == EOS:
            break
    return out


# -- lock-step and fusion ---------------------------------------------------------------
@pytest.mark.parametrize("jitter", [0, 3])
async def test_lock_step_sends_prompt_once_then_one_token_per_step(jitter):
    members = random_members(max_jitter=jitter)
    out = await generate(members, "The cat", max_tokens=10, logprobs=1)
    req = out.request

    assert out.error is None and out.finish is FinishReason.LENGTH
    tokens = out.tokens
    assert len(tokens) == 10 == req.completion_tokens == out.deltas[-1].completion_tokens
    assert all(d.prompt_tokens == len(req.prompt_ids) for d in out.deltas)
    expected_chunks = [req.prompt_ids] + [[t] for t in tokens[:-1]]  # the last is never fed
    for s in sessions(members, req):
        assert s.chunks == expected_chunks
        assert s.steps == req.completion_tokens
        assert s.closed
    assert all(m.open_count == 0 and m.num_engine_requests() == 0 for m in members)


@pytest.mark.parametrize(
    "policy, weights",
    [
        ("mean", {}),
        ("product", {}),
        ("max", {}),
        ("mean", {"a": 0.0}),
        ("product", {"c": 3.0}),
        ("max", {"b": 0.0}),
    ],
)
async def test_greedy_matches_independent_reference(policy, weights):
    members = random_members(max_jitter=2)
    out = await generate(
        members, "Fusion", policy=policy, weights=weights, max_tokens=12, logprobs=1
    )
    assert out.error is None and out.finish is FinishReason.LENGTH

    configured = {m.name: m.config.weight for m in members} | weights
    expected = reference_greedy(
        members,
        [configured[m.name] for m in members],
        policy,
        out.request.prompt_ids,
        max_tokens=12,
    )
    assert out.tokens == [t for t, _ in expected]
    got_lp = [d.tokens[0].logprob for d in out.deltas]
    np.testing.assert_allclose(got_lp, [lp for _, lp in expected], rtol=1e-9, atol=1e-12)
    # text is the incremental decode of exactly these bytes (errors -> U+FFFD)
    assert out.text == b"".join(TABLE[t] for t in out.tokens).decode("utf-8", "replace")


async def test_member_details_report_every_member():
    members = random_members()
    out = await generate(members, max_tokens=3, member_details=True)
    for delta in out.deltas:
        (detail,) = delta.tokens
        assert [md.member for md in detail.members] == ["a", "b", "c"]
        assert all(math.isfinite(md.logprob) for md in detail.members)


# -- stops --------------------------------------------------------------------------------
A, B, C, D = (byte_id(ch) for ch in "abcd")


async def test_eos_finishes_with_eos():
    members = scripted_members([A, B, EOS, C, D])
    out = await generate(members, max_tokens=10)
    assert out.error is None
    assert out.finish is FinishReason.EOS
    assert out.text == "ab"
    assert out.request.completion_tokens == 3
    assert [d.finish_reason for d in out.deltas[:-1]] == [None, None]
    for s in sessions(members, out.request):  # EOS is not fed back
        assert s.chunks[1:] == [[A], [B]]


async def test_ignore_eos_runs_to_max_tokens():
    members = scripted_members([A, B, EOS, C, D])
    out = await generate(members, max_tokens=8, ignore_eos=True, logprobs=1)
    assert out.finish is FinishReason.LENGTH
    assert out.tokens[:5] == [A, B, EOS, C, D]
    assert out.text == "abcd"  # EOS has no bytes; the scripted tail is more EOS
    assert out.request.completion_tokens == 8


@pytest.mark.parametrize("max_tokens", [1, 7])
async def test_max_tokens_finishes_with_length(max_tokens):
    members = random_members()
    out = await generate(members, max_tokens=max_tokens)
    assert out.finish is FinishReason.LENGTH
    assert len(out.deltas) == max_tokens == out.request.completion_tokens
    assert all(d.finish_reason is None for d in out.deltas[:-1])


async def test_stop_string_spanning_two_tokens():
    members = scripted_members([A, HELLO, WORLD, B, C])  # "ahello worldbc"
    out = await generate(members, max_tokens=10, stop=("lo w",))
    assert out.error is None
    assert out.finish is FinishReason.STOP
    assert out.text == "ahel"
    assert [d.text for d in out.deltas] == ["a", "hel", ""]  # "lo" held, then cut
    assert out.request.completion_tokens == 3
    for s in sessions(members, out.request):  # nothing fed after the stop
        assert s.chunks[1:] == [[A], [HELLO]]
    assert out.request.events.empty()


async def test_stop_prefix_is_released_when_no_stop_follows():
    x, y = byte_id("x"), byte_id("y")
    members = scripted_members([x, y, A, x, y, B])
    out = await generate(members, max_tokens=10, stop=("xyz", "yb"))
    assert out.finish is FinishReason.STOP
    assert out.text == "xyax"
    assert [d.text for d in out.deltas] == ["", "", "xya", "", "", "x"]


# -- UTF-8 ----------------------------------------------------------------------------------
SPLIT_SCRIPT = [
    A,
    SHI_HEAD,  # "世" = e4 b8 96, split 2 + 1
    0x96,
    0xC3,  # "é" = c3 a9, one byte per token
    0xA9,
    *"😀".encode(),  # 4 one-byte tokens
    SHI,
    E_ACUTE,
    B,
]


async def test_utf8_split_characters_never_yield_replacement():
    members = scripted_members(SPLIT_SCRIPT)
    out = await generate(members, max_tokens=30, logprobs=1)
    assert out.finish is FinishReason.EOS
    assert out.tokens == [*SPLIT_SCRIPT, EOS]
    assert all("\ufffd" not in d.text for d in out.deltas)
    expected = b"".join(TABLE[t] for t in SPLIT_SCRIPT).decode("utf-8")
    assert expected == "a世é😀世éb"
    assert out.text == expected
    texts = [d.text for d in out.deltas]
    assert texts[:9] == ["a", "", "世", "", "é", "", "", "", "😀"]


async def test_utf8_stop_string_made_of_split_characters():
    members = scripted_members(SPLIT_SCRIPT)
    out = await generate(members, max_tokens=30, stop=("é😀",))
    assert out.finish is FinishReason.STOP
    assert out.text == "a世"
    assert all("\ufffd" not in d.text for d in out.deltas)


async def test_length_mid_character_flushes_with_replacement_at_end_only():
    members = scripted_members(SPLIT_SCRIPT)
    out = await generate(members, max_tokens=7)  # stops inside the emoji
    assert out.finish is FinishReason.LENGTH
    assert all("\ufffd" not in d.text for d in out.deltas[:-1])
    assert out.text == "a世é\ufffd"


# -- batching --------------------------------------------------------------------------------
PROMPTS = [f"prompt {i}: " + "xyz"[: i % 4] for i in range(16)]
POLICY_CYCLE = ["mean", "product", "max"]


async def test_concurrent_requests_are_fused_together_and_match_alone():
    weight_cycle = [{}, {"a": 0.0}, {"b": 5.0}, {"c": 0.0, "a": 3.0}]

    def request_kwargs(i):
        return dict(
            policy=POLICY_CYCLE[i % 3],
            weights=weight_cycle[i % 4],
            max_tokens=6 + i % 5,
            logprobs=1,
        )

    alone = [
        await generate(random_members(), p, **request_kwargs(i)) for i, p in enumerate(PROMPTS)
    ]

    members = random_members(max_jitter=3)
    async with running(members) as router:
        requests = [make_request(router, p, **request_kwargs(i)) for i, p in enumerate(PROMPTS)]
        together = await asyncio.gather(*(drive(router, r) for r in requests))
        stats = router.stats

    assert stats.fused_rows == sum(r.completion_tokens for r in requests)
    assert stats.fuse_calls < stats.fused_rows  # several requests per fuse call
    assert stats.fuse_calls <= stats.fused_rows / 2
    for solo, batched in zip(alone, together, strict=True):
        assert batched.error is None
        assert batched.tokens == solo.tokens
        assert batched.text == solo.text
        assert batched.finish is solo.finish
    assert all(m.open_count == 0 for m in members)
    assert not router.running


async def test_seeded_sampling_is_the_same_alone_and_batched():
    def request_kwargs(i):
        return dict(
            max_tokens=8,
            temperature=0.8 + 0.1 * (i % 3),
            top_p=0.95 if i % 2 else 1.0,
            top_k=0 if i % 4 else 5,
            seed=1000 + i,
            logprobs=1,
        )

    alone = [
        await generate(random_members(), p, **request_kwargs(i)) for i, p in enumerate(PROMPTS)
    ]
    again = await generate(random_members(), PROMPTS[0], **request_kwargs(0))
    assert again.tokens == alone[0].tokens

    members = random_members(max_jitter=3)
    async with running(members) as router:
        requests = [make_request(router, p, **request_kwargs(i)) for i, p in enumerate(PROMPTS)]
        together = await asyncio.gather(*(drive(router, r) for r in requests))
        assert router.stats.fuse_calls < router.stats.fused_rows
    for solo, batched in zip(alone, together, strict=True):
        assert batched.tokens == solo.tokens

    # sampling really samples: other seeds give other continuations of one prompt
    outs = {
        tuple(
            (
                await generate(
                    random_members(), "same", max_tokens=8, temperature=1.5, seed=s, logprobs=1
                )
            ).tokens
        )
        for s in range(4)
    }
    assert len(outs) > 1


# -- release, failures, overload ----------------------------------------------------------------
def blocking_hook(gate: asyncio.Event, from_step: int, request_id: str | None = None):
    async def hook(session: FakeSession) -> None:
        if session.steps >= from_step and request_id in (None, session.request_id):
            await gate.wait()

    return hook


@pytest.mark.parametrize(
    "from_step, blocked",
    [
        (1, "abc"),  # released before the prompt step returned
        (4, "abc"),  # after 3 tokens, every member mid-step
        (4, "b"),  # after 3 tokens, one member mid-step, the others done
    ],
)
async def test_release_mid_step_closes_sessions_and_cancels_the_step(from_step, blocked):
    gate = asyncio.Event()
    members = random_members()
    for m in members:
        if m.name in blocked:
            m.hook = blocking_hook(gate, from_step)
    try:
        async with running(members) as router:
            req = make_request(router, max_tokens=50)
            router.submit(req)
            for _ in range(from_step - 1):
                delta = await asyncio.wait_for(req.events.get(), TIMEOUT)
                assert isinstance(delta, Delta) and delta.finish_reason is None
            ss = sessions(members, req)
            await until(
                lambda: (
                    all(s.steps == from_step for s in ss)  # every member got the chunk
                    and any(s.in_flight for s in ss if s.member.name in blocked)
                ),
                "the step to be in flight",
            )
            for _ in range(20):  # let whatever can finish, finish
                await asyncio.sleep(0)
            step_task = req.step_task
            assert step_task is not None and not step_task.done()
            in_flight = [s.in_flight for s in ss]
            assert all(s.member.name in blocked for s, n in zip(ss, in_flight, strict=True) if n)

            # release must not wait for the held step (the gate is never opened here)
            release = asyncio.ensure_future(router.release(req))
            await asyncio.wait({release}, timeout=TIMEOUT)
            if not release.done():
                gate.set()
                await release
                pytest.fail("release() waited for the in-flight step instead of cancelling it")
            release.result()

            assert step_task.cancelled()
            assert not router.running
            for s, n in zip(ss, in_flight, strict=True):
                assert s.closed and s.in_flight == 0
                assert s.cancelled == n  # each running step was cancelled
            assert all(m.open_count == 0 and m.num_engine_requests() == 0 for m in members)
            for _ in range(5):
                await asyncio.sleep(0)
            assert req.events.empty()  # nothing after release
            assert all(s.steps == from_step for s in ss)  # nor fed
            await asyncio.wait_for(router.release(req), TIMEOUT)  # twice: a no-op

            # the router still serves
            gate.set()
            out = await drive(router, make_request(router, max_tokens=3))
            assert out.finish is FinishReason.LENGTH
    finally:
        gate.set()


async def test_failing_step_fails_only_its_request():
    async def hook(session: FakeSession) -> None:
        if session.request_id == "bad" and session.steps == 3:
            raise RuntimeError("engine died")

    def build():
        members = random_members(max_jitter=2)
        members[1].hook = hook
        return members

    ids = ["r0", "r1", "bad", "r2", "r3"]
    alone = {i: await generate(build(), f"p{i}", max_tokens=6, logprobs=1) for i in ids[:2]}

    members = build()
    async with running(members) as router:
        requests = [
            make_request(router, f"p{i}", request_id=i, max_tokens=6, logprobs=1) for i in ids
        ]
        outs = dict(
            zip(ids, await asyncio.gather(*(drive(router, r) for r in requests)), strict=True)
        )

        bad = outs.pop("bad")
        assert isinstance(bad.error, RuntimeError) and str(bad.error) == "engine died"
        assert len(bad.deltas) == 2  # tokens 1 and 2; step 3 raised
        for rid, out in outs.items():
            assert out.error is None and out.finish is FinishReason.LENGTH
            if rid in alone:
                assert out.tokens == alone[rid].tokens
        assert all(m.open_count == 0 for m in members)

        # the loop survived
        out = await drive(router, make_request(router, max_tokens=3))
        assert out.finish is FinishReason.LENGTH


async def test_failing_member_leaves_no_step_running_after_release():
    """Member b fails at once while member a is still working on the same step: after
    release no step of that request may still be running (with vLLM a live step keeps
    Session.close() from aborting the engine request: the generator is busy)."""

    async def slow(session: FakeSession) -> None:
        if session.steps == 2:
            for _ in range(50):
                await asyncio.sleep(0)

    async def boom(session: FakeSession) -> None:
        if session.steps == 2:
            raise RuntimeError("engine died")

    members = random_members(n=2, weights=(1.0, 1.0))
    members[0].hook = slow
    members[1].hook = boom
    async with running(members) as router:
        req = make_request(router, max_tokens=10)
        out = await drive(router, req)
        assert isinstance(out.error, RuntimeError) and len(out.deltas) == 1
        for s in sessions(members, req):
            assert s.closed
            assert s.in_flight == 0, f"member {s.member.name}: a step still runs after release"


class BrokenPolicy(Policy):
    name = "broken"
    description = "raises"

    def fuse(self, logprobs, mask, weights, params):
        raise ZeroDivisionError("policy bug")


async def test_broken_policy_fails_only_its_requests():
    members = random_members()
    async with running(members) as router:
        broken = BrokenPolicy(router.ensemble.member_names)
        requests = [make_request(router, f"p{i}", max_tokens=4) for i in range(3)]
        requests.append(make_request(router, "pb", policy=broken, max_tokens=4))
        outs = await asyncio.gather(*(drive(router, r) for r in requests))
    assert isinstance(outs[-1].error, ZeroDivisionError)
    assert all(o.error is None and o.finish is FinishReason.LENGTH for o in outs[:-1])


async def test_overloaded_when_max_running_reached():
    gate = asyncio.Event()
    members = random_members(n=2, weights=(1.0, 1.0))
    for m in members:
        m.hook = blocking_hook(gate, from_step=1)
    try:
        async with running(members, max_running=2) as router:
            first, second, third = (make_request(router, max_tokens=4) for _ in range(3))
            router.submit(first)
            router.submit(second)
            with pytest.raises(Overloaded):
                router.submit(third)
            assert all(m.sessions_of(third.id) == [] for m in members)  # nothing opened
            assert all(m.open_count == 2 for m in members)
            assert router.stats.requests == 2

            await asyncio.wait_for(router.release(first), TIMEOUT)
            router.submit(third)  # room again
            assert set(router.running) == {second.id, third.id}
        # stop() released what was still running
        assert all(m.open_count == 0 for m in members)
        assert all(s.closed for m in members for s in m.sessions)
    finally:
        gate.set()

"""Router admission (bounded running set + bounded FIFO queue) and member failure
(fail vs. degraded fusion), on fake members."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from fakes import VOCAB, FakeSession, make_ensemble
from test_router import TIMEOUT, blocking_hook, collect, make_request, random_members

from fusion_server.engines.member import EngineUnavailable
from fusion_server.router.request import FinishReason
from fusion_server.router.router import Overloaded, Router


class EngineDeadError(RuntimeError):
    """Named like vLLM's: the router recognises an engine failure by this name."""


@contextlib.asynccontextmanager
async def router_for(members, **kwargs):
    router = Router(make_ensemble(members), **kwargs)
    router.start()
    try:
        yield router
    finally:
        await asyncio.wait_for(router.stop(), TIMEOUT)


def held_members(gate: asyncio.Event):
    """Two members whose sessions hold every step after the prompt until `gate` is set."""
    members = random_members(n=2, weights=(1.0, 1.0))
    for m in members:
        m.hook = blocking_hook(gate, from_step=2)
    return members


async def test_queue_waits_for_a_slot_and_overflows_at_once():
    gate = asyncio.Event()
    members = held_members(gate)
    async with router_for(members, max_running=1, max_queued=1) as router:
        first, second, third = (make_request(router, max_tokens=3) for _ in range(3))
        await router.admit(first)
        waiting = asyncio.create_task(router.admit(second))
        await asyncio.sleep(0)
        assert not waiting.done() and router.queued == 1
        assert all(m.sessions_of(second.id) == [] for m in members)  # nothing opened yet
        with pytest.raises(Overloaded, match="queued"):
            await router.admit(third)  # queue full: refused at once
        gate.set()
        deltas, error = await collect(first)
        assert error is None and deltas[-1].finish_reason is FinishReason.LENGTH
        assert not waiting.done()  # a slot frees on release, not on finish
        await router.release(first)
        await asyncio.wait_for(waiting, TIMEOUT)
        assert router.queued == 0 and set(router.running) == {second.id}
        deltas, error = await collect(second)
        assert error is None
        await router.release(second)


async def test_cancelled_waiter_leaves_the_queue_and_passes_its_slot_on():
    gate = asyncio.Event()
    members = held_members(gate)
    async with router_for(members, max_running=1, max_queued=2) as router:
        first, second, third = (make_request(router, max_tokens=2) for _ in range(3))
        await router.admit(first)
        w2 = asyncio.create_task(router.admit(second))
        w3 = asyncio.create_task(router.admit(third))
        await asyncio.sleep(0)
        assert router.queued == 2
        w2.cancel()  # e.g. the client's deadline passed while it waited
        with pytest.raises(asyncio.CancelledError):
            await w2
        assert router.queued == 1
        assert all(m.sessions_of(second.id) == [] for m in members)
        gate.set()
        await collect(first)
        await router.release(first)
        await asyncio.wait_for(w3, TIMEOUT)  # third got the slot, second never ran
        assert set(router.running) == {third.id}
        await collect(third)
        await router.release(third)
        assert router.stats.requests == 2


async def test_slot_granted_to_a_waiter_that_left_goes_to_the_next():
    members = random_members(n=2, weights=(1.0, 1.0))
    async with router_for(members, max_running=1, max_queued=2) as router:
        first, second, third = (make_request(router, max_tokens=2) for _ in range(3))
        await router.admit(first)
        w2 = asyncio.create_task(router.admit(second))
        w3 = asyncio.create_task(router.admit(third))
        await asyncio.sleep(0)
        await collect(first)
        grant = router._grant

        def grant_then_leave():  # second's slot is granted, but second leaves before it resumes
            grant()
            router._grant = grant
            w2.cancel()

        router._grant = grant_then_leave
        await router.release(first)
        with pytest.raises(asyncio.CancelledError):
            await w2
        await asyncio.wait_for(w3, TIMEOUT)
        assert set(router.running) == {third.id}
        await collect(third)
        await router.release(third)


def failing_hook(step: int, error: Exception):
    async def hook(session: FakeSession) -> None:
        if session.steps >= step:
            raise error

    return hook


@pytest.mark.parametrize("error", [EngineDeadError("engine died"), EngineUnavailable("gone")])
async def test_member_failure_fails_the_request_without_degrade(error):
    members = random_members(n=3)
    members[1].hook = failing_hook(4, error)
    async with router_for(members, max_running=4) as router:
        request = make_request(router, max_tokens=8)
        await router.admit(request)
        deltas, err = await collect(request)
        await router.release(request)
    assert err is error and len(deltas) == 3
    assert all(m.open_count == 0 for m in members)


async def test_degraded_request_continues_on_the_remaining_members():
    members = random_members(n=3)
    members[1].hook = failing_hook(4, EngineDeadError("engine died"))
    async with router_for(members, max_running=4, degrade=True) as router:
        request = make_request(router, max_tokens=10, logprobs=1)
        await router.admit(request)
        deltas, err = await collect(request)
        await router.release(request)
    assert err is None and deltas[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].stats.members == ["a", "c"]
    assert deltas[-1].stats.weights["b"] == 0.0
    # From the 4th token on only a and c are fused: greedy mean of their probabilities
    # (configured weights 1 and 0.5, renormalised) over the union of their top-k, a
    # candidate outside a member's top-k getting the no-opinion fill min(p_k, r/(V-k)).
    tokens = [t.token_id for d in deltas for t in d.tokens]
    prompt = members[0].sessions[0].prompt
    k = members[0].top_k

    def probs(member, context):
        p = np.exp(member.model(prompt, context))
        top = np.argsort(-p, kind="stable")[:k]
        fill = min(p[top].min(), (1 - p[top].sum()) / (VOCAB - k))
        return {int(t): p[t] for t in top}, fill

    for i in range(3, len(tokens)):
        (pa, fa), (pc, fc) = (probs(members[m], tuple(tokens[:i])) for m in (0, 2))
        mixed = {t: (pa.get(t, fa) + 0.5 * pc.get(t, fc)) / 1.5 for t in {*pa, *pc}}
        assert tokens[i] == max(mixed, key=mixed.get)
    assert all(m.open_count == 0 for m in members)


async def test_degrade_never_drops_a_role_holder():
    members = random_members(n=2, weights=(1.0, 1.0))
    members[0].hook = failing_hook(3, EngineDeadError("engine died"))
    async with router_for(members, max_running=4, degrade=True) as router:
        request = make_request(router, policy="gate", max_tokens=6)
        request.roles = {"primary": (0,)}
        await router.admit(request)
        _, err = await collect(request)
        await router.release(request)
    assert isinstance(err, EngineDeadError)


async def test_release_finishes_even_when_its_caller_is_cancelled():
    gate = asyncio.Event()
    members = held_members(gate)
    async with router_for(members, max_running=2) as router:
        request = make_request(router, max_tokens=4)
        await router.admit(request)
        releasing = asyncio.create_task(router.release(request))
        await asyncio.sleep(0)
        releasing.cancel()  # e.g. a gRPC handler cancelled again while it releases
        with pytest.raises(asyncio.CancelledError):
            await releasing
        for _ in range(20):
            await asyncio.sleep(0)
        assert all(m.open_count == 0 for m in members)  # sessions closed anyway
        assert request.id not in router.running
    gate.set()


async def test_a_left_waiter_does_not_block_the_fast_path():
    gate = asyncio.Event()
    members = held_members(gate)
    async with router_for(members, max_running=1, max_queued=2) as router:
        first, second, third = (make_request(router, max_tokens=2) for _ in range(3))
        await router.admit(first)
        waiter = asyncio.create_task(router.admit(second))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.set()
        await collect(first)
        await router.release(first)
        await asyncio.wait_for(router.admit(third), TIMEOUT)  # room, nobody waiting: runs now
        assert set(router.running) == {third.id}
        await collect(third)
        await router.release(third)

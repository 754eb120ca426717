"""Engine-worker protocol on fake members (no vLLM): a RemoteMember talking over real
gRPC to an EngineWorkerServicer that wraps a FakeMember must be indistinguishable
from the FakeMember itself; steps are batched; a lost worker fails its requests with
UNAVAILABLE and the member reconnects when the worker is back."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from fakes import FakeMember, make_ensemble, random_model, scripted_model
from netutil import free_port
from test_router import TIMEOUT, collect, drive, make_request

from fusion_client._proto.fusion.v1 import engine_pb2_grpc
from fusion_server.api.errors import status_for
from fusion_server.config import MemberConfig
from fusion_server.engines.member import EngineUnavailable
from fusion_server.engines.remote import RemoteMember
from fusion_server.engines.worker import EngineWorkerServicer
from fusion_server.router.router import Router


async def eventually(predicate, what: str) -> None:
    """Wait (real time: the other side is across a gRPC connection) until predicate()."""
    for _ in range(int(TIMEOUT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def worker(member: FakeMember, port: int):
    """An EngineWorker serving `member` on 127.0.0.1:port until the block ends."""
    servicer = EngineWorkerServicer(member, "fake", [])
    servicer.ready = True
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineWorkerServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(0)


async def remote(member: FakeMember, port: int) -> RemoteMember:
    config = MemberConfig(name=member.name, model="fake", weight=member.config.weight)
    rm = RemoteMember(config, member.top_k, endpoint=f"127.0.0.1:{port}")
    await asyncio.wait_for(rm.start(timeout=TIMEOUT), TIMEOUT)
    return rm


@contextlib.asynccontextmanager
async def router_over(members):
    router = Router(make_ensemble(members), max_running=256)
    router.start()
    try:
        yield router
    finally:
        await asyncio.wait_for(router.stop(), TIMEOUT)


def members_pair(**kwargs):
    return [
        FakeMember("a", random_model(seed=1), top_k=8, **kwargs),
        FakeMember("b", random_model(seed=2), weight=2.0, top_k=8, **kwargs),
    ]


async def run_all(router, prompts, **kwargs):
    outs = await asyncio.gather(
        *(drive(router, make_request(router, p, logprobs=1, **kwargs)) for p in prompts)
    )
    for out in outs:
        assert out.error is None, out.error
    return [(out.tokens, out.text, out.finish) for out in outs]


PROMPTS = [f"prompt {i}" for i in range(24)]


@pytest.mark.parametrize("policy", ["mean", "packllm"])  # packllm: prompt NLL over the wire
async def test_remote_member_gives_the_all_local_output(policy):
    local = members_pair(max_jitter=3)
    async with router_over(local) as router:
        expected = await run_all(router, PROMPTS, policy=policy, max_tokens=12)

    served = members_pair(max_jitter=3)
    port = free_port()
    async with worker(served[1], port) as servicer:
        rm = await remote(served[1], port)
        try:
            async with router_over([served[0], rm]) as router:
                got = await run_all(router, PROMPTS, policy=policy, max_tokens=12)
            await eventually(lambda: served[1].open_count == 0, "worker sessions closed")
            assert rm.num_engine_requests() == 0
        finally:
            rm.shutdown()
    assert got == expected
    assert servicer.steps_in >= len(PROMPTS) * 12


async def test_sends_of_one_loop_turn_travel_as_one_message_each_way():
    b = FakeMember("b", random_model(seed=2), top_k=8)
    port = free_port()
    async with worker(b, port) as servicer:
        rm = await remote(b, port)
        try:
            sessions = [rm.open_session(f"r{i}") for i in range(64)]
            for step in range(3):
                batches, steps = servicer.batches_in, servicer.steps_in
                for i, session in enumerate(sessions):  # one router step of 64 requests
                    session.send([1 + i, 2] if step == 0 else [3])
                tops = await asyncio.wait_for(
                    asyncio.gather(*(s.receive() for s in sessions)), TIMEOUT
                )
                assert (servicer.batches_in - batches, servicer.steps_in - steps) == (1, 64)
                assert servicer.batches_out == step + 1  # the 64 results: one message
                assert all(len(t.ids) == 8 for t in tops)
            for session in sessions:
                await session.close()
            await eventually(lambda: b.open_count == 0, "worker sessions closed")
        finally:
            rm.shutdown()


async def test_worker_errors_fail_only_that_request():
    async def hook(session):
        if session.request_id.startswith("bad") and session.steps == 3:
            raise ValueError("engine refused the input")

    a = FakeMember("a", scripted_model([65] * 20), top_k=4)
    b = FakeMember("b", scripted_model([65] * 20), top_k=4, hook=hook)
    port = free_port()
    async with worker(b, port):
        rm = await remote(b, port)
        try:
            async with router_over([a, rm]) as router:
                bad = drive(router, make_request(router, "x", request_id="bad-1", max_tokens=8))
                good = drive(router, make_request(router, "y", max_tokens=8))
                bad, good = await asyncio.gather(bad, good)
            assert isinstance(bad.error, ValueError) and "refused" in str(bad.error)
            assert good.error is None and good.text == "A" * 8
            await eventually(lambda: b.open_count == 0, "worker sessions closed")
        finally:
            rm.shutdown()


def held_pair(token: int, held: str = "") -> list[FakeMember]:
    """Two members scripted to say `token`; b's steps of requests named `held*` never end."""
    hold = asyncio.Event()

    async def hook(session):
        if session.request_id.startswith(held):
            await hold.wait()

    return [
        FakeMember("a", scripted_model([token] * 50), top_k=4),
        FakeMember("b", scripted_model([token] * 50), top_k=4, hook=hook),
    ]


async def test_lost_worker_gives_unavailable_then_reconnects():
    a, b = held_pair(66, held="held")
    port = free_port()
    async with worker(b, port):
        rm = await remote(b, port)
        router_cm = router_over([a, rm])
        router = await router_cm.__aenter__()
        held = make_request(router, "x", request_id="held-1", max_tokens=8)
        router.submit(held)
        await eventually(lambda: b.sessions and b.sessions[-1].in_flight, "held step in flight")
    # the worker is gone: the in-flight request fails with UNAVAILABLE
    try:
        _, error = await collect(held)
        assert isinstance(error, EngineUnavailable)
        assert status_for(error)[0] == grpc.StatusCode.UNAVAILABLE
        await router.release(held)
        # new requests are refused with UNAVAILABLE while it is down
        with pytest.raises(EngineUnavailable) as refused:
            router.submit(make_request(router, "y"))
        assert status_for(refused.value)[0] == grpc.StatusCode.UNAVAILABLE
        # a restarted worker on the same address is found again
        b2 = FakeMember("b", scripted_model([66] * 50), top_k=4)
        async with worker(b2, port):
            await eventually(lambda: rm.running, "reconnected")
            out = await drive(router, make_request(router, "z", max_tokens=5))
            assert out.error is None and out.text == "B" * 5
    finally:
        await router_cm.__aexit__(None, None, None)
        rm.shutdown()


async def test_router_gone_closes_its_sessions_on_the_worker():
    a, b = held_pair(67)
    port = free_port()
    async with worker(b, port):
        rm = await remote(b, port)
        router = Router(make_ensemble([a, rm]), max_running=8)
        router.start()
        requests = [make_request(router, f"p{i}") for i in range(3)]
        for request in requests:
            router.submit(request)
        await eventually(
            lambda: b.open_count == 3 and rm.num_engine_requests() == 3, "sessions open"
        )
        rm.shutdown()  # the router's connection ends with three sessions mid-step
        for request in requests:
            _, error = await collect(request)
            assert isinstance(error, EngineUnavailable)
        await eventually(lambda: b.open_count == 0, "the worker closing them")
        assert all(s.cancelled for s in b.sessions)
        await asyncio.wait_for(router.stop(), TIMEOUT)

"""Production behaviour on dedicated servers: a bounded load test with random
cancellations, deadlines and overload; a member engine killed mid-run.

The server runs with small limits (16 running, 16 queued) so that 64 clients meet
every admission path: run at once, wait in the queue, RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import statistics
import time

import grpc
import psutil
import pytest
from conftest import start_server, tiny_config

from fusion_client import AsyncFusionClient

CLIENTS = 64
WARMUP_SECONDS = 4.0
LOAD_SECONDS = 24.0
# Server RSS may not grow by more than this between the first and the last third.
MEMORY_SLACK_BYTES = 48 * 1024**2
EXPECTED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
# Streams in the kill test ask for this many tokens: generating them takes far longer
# than the client's lag behind the server (gRPC buffers hundreds of small messages), so
# the server is certainly still generating when the client has seen a few of them.
LONG = 1500


@pytest.fixture(scope="module")
def small_server(tiny_models, tmp_path_factory):
    config = tiny_config(
        tiny_models,
        limits={"max_concurrent_requests": 16, "max_queued_requests": 16},
    )
    with start_server(config, tiny_models, tmp_path_factory.mktemp("small")) as running:
        yield running


@pytest.fixture(scope="module")
def long_server(tiny_models, tmp_path_factory):
    """Room for streams that outlive the kill (see LONG)."""
    config = tiny_config(tiny_models, limits={"max_tokens": LONG})
    for member in config["members"]:
        member["engine"]["max_model_len"] = LONG + 64
    with start_server(config, tiny_models, tmp_path_factory.mktemp("long")) as running:
        yield running


async def one_client(target: str, seed: int, until: float, outcomes: list[str]) -> None:
    rng = random.Random(seed)
    async with AsyncFusionClient(target) as client:
        while time.monotonic() < until:
            action = rng.random()
            options = dict(max_tokens=rng.randint(4, 48), ignore_eos=True, seed=rng.randint(0, 99))
            prompt = f"def f{seed}_{rng.randint(0, 9)}():"
            timeout = rng.uniform(0.05, 0.8) if action < 0.15 else 60.0
            cancel_after = rng.randint(0, 6) if action > 0.75 else None
            try:
                n = 0
                stream = client.generate_stream(prompt, timeout=timeout, **options)
                async for _ in stream:
                    n += 1
                    if cancel_after is not None and n > cancel_after:
                        await stream.aclose()  # cancels the call
                        outcomes.append("CANCELLED")
                        break
                else:
                    outcomes.append("OK")
            except grpc.RpcError as err:
                outcomes.append(err.code().name)
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(rng.uniform(0.05, 0.3))  # back off


async def sample_rss(pid: int, until: float, samples: list[int]) -> None:
    proc = psutil.Process(pid)
    while time.monotonic() < until:
        samples.append(proc.memory_info().rss)
        await asyncio.sleep(0.2)


async def run_load(target: str, pid: int, seconds: float, seed: int):
    outcomes: list[str] = []
    rss: list[int] = []
    until = time.monotonic() + seconds
    await asyncio.gather(
        sample_rss(pid, until, rss),
        *(one_client(target, seed * 1000 + i, until, outcomes) for i in range(CLIENTS)),
    )
    return outcomes, rss


def test_load_with_cancellations_and_overload(small_server):
    pid = small_server.proc.pid
    asyncio.run(run_load(small_server.target, pid, WARMUP_SECONDS, seed=1))
    outcomes, rss = asyncio.run(run_load(small_server.target, pid, LOAD_SECONDS, seed=2))

    counts = {code: outcomes.count(code) for code in set(outcomes)}
    assert set(counts) <= EXPECTED, counts  # never INTERNAL, UNAVAILABLE, ...
    assert counts.get("OK", 0) > 0 and counts.get("CANCELLED", 0) > 0, counts
    assert counts.get("RESOURCE_EXHAUSTED", 0) > 0, counts  # 64 clients > 16 + 16 slots

    after = small_server.wait_drained()
    leaked = {k: v for k, v in after.items() if k.startswith("fusion_member_engine_requests")}
    gauges = {k: v for k, v in after.items() if k.startswith(("fusion_running", "fusion_queued"))}
    assert leaked and not any(leaked.values()), (leaked, gauges, counts)
    assert after["fusion_running_requests"] == 0
    assert after["fusion_queued_requests"] == 0
    assert not any(v for k, v in after.items() if 'code="INTERNAL"' in k), after
    assert after['fusion_requests_total{code="RESOURCE_EXHAUSTED",rpc="GenerateStream"}'] > 0

    third = len(rss) // 3
    first, last = statistics.mean(rss[:third]), statistics.mean(rss[-third:])
    assert last - first < MEMORY_SLACK_BYTES, (first / 2**20, last / 2**20)

    with small_server.client() as client:  # still serving normally
        assert (
            client.generate("def ok():", max_tokens=4, ignore_eos=True).usage.completion_tokens == 4
        )


def engine_pid(log_text: str, member: str) -> int:
    pids = re.findall(rf"member {member}: engine process (\d+)", log_text)
    assert pids, f"no engine pid for {member} in the server log"
    return int(pids[-1])


async def stream_until_error(target: str, prompt: str, started: asyncio.Event, counter: list):
    """Stream until the call ends; (final status, messages received)."""
    n = 0
    async with AsyncFusionClient(target) as client:
        try:
            async for _ in client.generate_stream(prompt, max_tokens=LONG, ignore_eos=True):
                n += 1
                counter.append(1)
                if len(counter) >= 4:
                    started.set()
        except grpc.RpcError as err:
            return err.code(), n
        return grpc.StatusCode.OK, n


def test_member_engine_killed_mid_run_then_recovers(long_server):
    with long_server.client() as client:
        before = client.generate("def stable():", max_tokens=12, ignore_eos=True).text
    old_pid = engine_pid(long_server.log.read_text(), "beta")

    async def scenario():
        started = asyncio.Event()
        counter: list = []
        streams = [
            asyncio.create_task(
                stream_until_error(long_server.target, f"def s{i}():", started, counter)
            )
            for i in range(4)
        ]
        await asyncio.wait_for(started.wait(), 120)
        os.kill(old_pid, signal.SIGKILL)
        killed_after = len(counter)
        results = await asyncio.wait_for(asyncio.gather(*streams), 120)
        codes = ([code for code, _ in results], killed_after, [n for _, n in results])
        async with AsyncFusionClient(long_server.target) as client:
            seen = set()
            for _ in range(100):  # the watchdog notices within moments
                seen.add(await client.health())
                if "NOT_SERVING" in seen:
                    break
                await asyncio.sleep(0.05)
            try:
                await client.generate("def during():", max_tokens=4, timeout=30)
                during = "OK"
            except grpc.RpcError as err:
                during = err.code().name
            deadline = time.monotonic() + 300
            while (status := await client.health()) != "SERVING":
                seen.add(status)
                assert time.monotonic() < deadline, "no recovery within 300 s"
                await asyncio.sleep(0.25)
        return codes, seen, during

    (codes, killed_after, received), seen, during = asyncio.run(scenario())
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 4, (codes, killed_after, received)
    assert "NOT_SERVING" in seen, seen
    assert during == "UNAVAILABLE"
    assert long_server.proc.poll() is None  # the server process never restarted

    new_pid = engine_pid(long_server.log.read_text(), "beta")
    assert new_pid != old_pid and not psutil.pid_exists(old_pid)
    with long_server.client() as client:
        assert client.generate("def stable():", max_tokens=12, ignore_eos=True).text == before
    metrics = long_server.wait_drained()
    assert metrics['fusion_member_restarts_total{member="beta"}'] == 1
    assert metrics['fusion_member_restarts_total{member="alpha"}'] == 0
    assert metrics['fusion_member_up{member="beta"}'] == 1
    assert not any(v for k, v in metrics.items() if k.startswith("fusion_member_engine_requests"))

"""A cancelled stream or an expired deadline ends the members' engine sessions."""

from __future__ import annotations

import time

import grpc
import pytest


def engine_requests(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("fusion_member_engine_requests")}


def test_cancelled_stream_frees_member_sessions(client, server):
    stream = client.generate_stream("def long_running():", max_tokens=500, ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    during = engine_requests(server.metrics())
    assert during and all(v >= 1 for v in during.values()), during  # each member holds the session
    stream.cancel()
    after = server.wait_drained()
    assert all(v == 0 for v in engine_requests(after).values()), after
    assert after["fusion_running_requests"] == 0


def test_expired_deadline_frees_member_sessions(client, server):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        client.generate("def slow():", max_tokens=500, ignore_eos=True, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    after = server.wait_drained()
    assert all(v == 0 for v in engine_requests(after).values()), after
    assert after["fusion_running_requests"] == 0
    assert client.generate("def ok():", max_tokens=4, ignore_eos=True).usage.completion_tokens == 4

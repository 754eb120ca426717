"""Generate / GenerateStream behaviour on real engines through the real server."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from fusion_client import fusion_pb2

PROMPTS = [f"def function_{i}(x, y):\n    return " for i in range(8)] + [
    "class Parser:\n    def __init__(self):",
    "for key, value in items.items():",
    "Héllo wörld — 世界 🙂 ",
    "import re\n",
]


def test_stream_deltas_join_to_generate_text(client):
    for kwargs in ({}, {"temperature": 0.9, "seed": 7, "top_p": 0.9}):
        full = client.generate(PROMPTS[0], max_tokens=40, ignore_eos=True, **kwargs)
        deltas = list(client.generate_stream(PROMPTS[0], max_tokens=40, ignore_eos=True, **kwargs))
        assert "".join(d.text for d in deltas) == full.text
        assert all(d.finish_reason == fusion_pb2.FINISH_REASON_UNSPECIFIED for d in deltas[:-1])
        last = deltas[-1]
        assert last.finish_reason == full.finish_reason == fusion_pb2.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == full.usage.completion_tokens == 40
        assert last.usage.prompt_tokens == full.usage.prompt_tokens > 0


def test_deltas_are_whole_utf8_characters(client):
    for d in client.generate_stream(
        PROMPTS[10], max_tokens=48, temperature=1.0, seed=3, ignore_eos=True
    ):
        d.text.encode("utf-8")  # a str from protobuf is valid UTF-8 by construction
        assert "\ud800" not in d.text


def test_same_seed_same_text(client):
    a = client.generate(PROMPTS[1], max_tokens=32, temperature=1.0, seed=1234, ignore_eos=True)
    b = client.generate(PROMPTS[1], max_tokens=32, temperature=1.0, seed=1234, ignore_eos=True)
    c = client.generate(PROMPTS[1], max_tokens=32, temperature=1.0, seed=4321, ignore_eos=True)
    assert a.text == b.text
    assert a.text != c.text  # 32 sampled tokens at temperature 1 from different seeds


def test_concurrent_requests_equal_one_at_a_time(client):
    def run(i: int) -> str:
        kwargs = {"temperature": 0.8, "seed": i} if i % 2 else {}
        return client.generate(
            PROMPTS[i % len(PROMPTS)], max_tokens=24, ignore_eos=True, **kwargs
        ).text

    alone = [run(i) for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, range(32)))
    assert together == alone


def test_stop_string_ends_generation_and_is_not_included(client):
    base = client.generate(PROMPTS[2], max_tokens=40, ignore_eos=True).text
    assert len(base) > 10
    stop = base[5:8]
    resp = client.generate(PROMPTS[2], max_tokens=40, ignore_eos=True, stop=[stop])
    assert resp.finish_reason == fusion_pb2.FINISH_REASON_STOP
    assert resp.text == base[: base.index(stop)]
    streamed = "".join(
        d.text
        for d in client.generate_stream(PROMPTS[2], max_tokens=40, ignore_eos=True, stop=[stop])
    )
    assert streamed == resp.text


def test_member_details_and_logprobs(client, server):
    resp = client.generate(
        PROMPTS[3], max_tokens=5, logprobs=3, member_details=True, ignore_eos=True
    )
    assert len(resp.tokens) == 5
    for tok in resp.tokens:
        assert 1 <= len(tok.top_logprobs) <= 3
        assert tok.top_logprobs[0].logprob >= tok.top_logprobs[-1].logprob
        assert tok.logprob == pytest.approx(max(t.logprob for t in tok.top_logprobs))  # greedy
        assert [m.member for m in tok.members] == list(server.models)


def test_get_ensemble(client, server):
    info = client.get_ensemble()
    assert [m.name for m in info.members] == list(server.models)
    assert info.default_policy == "mean"
    assert {"mean", "product", "max"} <= {p.name for p in info.policies}
    assert info.alignment == "shared-ids"
    fingerprints = {m.tokenizer_fingerprint for m in info.members}
    assert len(fingerprints) == 1 and len(fingerprints.pop()) == 64
    assert all(m.vocab_size > 0 and m.max_model_len == 256 for m in info.members)


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name for r in responses for s in r.list_services_response.service}
    assert {"fusion.v1.FusionService", "grpc.health.v1.Health"} <= services
    with server.client() as c:
        assert c.health("fusion.v1.FusionService") == "SERVING"

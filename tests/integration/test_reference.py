"""The server's greedy fused output equals an independent `transformers` reference.

The reference runs full forward passes of the same tiny models in this process and
applies the policy formula over the members' top-k union, with the documented fill
for a member's missing candidates: min(smallest top-k prob, residual / (V - k)).
"""

from __future__ import annotations

import math

import pytest
import torch

TOP_K = 20  # the session server's fusion.top_k (conftest.py)

PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\nclass Config:",
    "# Copyright (c) Python Software Foundation\n",
]
N_TOKENS = 32


@pytest.fixture(scope="module")
def hf_models(server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = list(server.models)
    tokenizer = AutoTokenizer.from_pretrained(server.models[names[0]])
    models = [
        AutoModelForCausalLM.from_pretrained(server.models[n], dtype=torch.float32).eval()
        for n in names
    ]
    return names, tokenizer, models


def fused_scores(
    logprobs: list[torch.Tensor], weights: list[float], policy: str
) -> dict[int, float]:
    """The policy formula over the union of each member's top-k, in plain Python."""
    tops = [torch.topk(lp, TOP_K) for lp in logprobs]
    candidates: list[int] = []
    for top in tops:
        for i in top.indices.tolist():
            if i not in candidates:
                candidates.append(i)
    vocab = logprobs[0].shape[0]
    per_member = []
    for top in tops:
        probs = {
            i: math.exp(v) for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        }
        fill = min(min(probs.values()), max(1 - sum(probs.values()), 1e-12) / (vocab - TOP_K))
        per_member.append({c: probs.get(c, fill) for c in candidates})
    total = sum(weights)
    w = [x / total for x in weights]
    if policy == "mean":
        return {
            c: math.log(sum(wi * p[c] for wi, p in zip(w, per_member, strict=True)))
            for c in candidates
        }
    if policy == "product":
        return {
            c: sum(wi * math.log(p[c]) for wi, p in zip(w, per_member, strict=True) if wi > 0)
            for c in candidates
        }
    if policy == "max":
        return {
            c: math.log(max(p[c] for wi, p in zip(w, per_member, strict=True) if wi > 0))
            for c in candidates
        }
    raise ValueError(policy)


def reference_greedy(hf_models, prompt: str, weights: list[float], policy: str) -> list[int]:
    _, tokenizer, models = hf_models
    ids = tokenizer(prompt)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(N_TOKENS):
            x = torch.tensor([ids])
            logprobs = [torch.log_softmax(m(x).logits[0, -1].double(), -1) for m in models]
            scores = fused_scores(logprobs, weights, policy)
            best = max(scores, key=lambda c: scores[c])  # first max: lowest candidate index
            out.append(best)
            ids.append(best)
    return out


@pytest.mark.parametrize("policy", ["mean", "product", "max"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_reference(client, hf_models, policy, prompt):
    names = hf_models[0]
    weights = {names[0]: 0.6, names[1]: 0.4}
    resp = client.generate(
        prompt,
        max_tokens=N_TOKENS,
        temperature=0,
        ignore_eos=True,
        policy=policy,
        weights=weights,
        logprobs=1,
    )
    got = [t.token_id for t in resp.tokens]
    expected = reference_greedy(hf_models, prompt, [weights[n] for n in names], policy)
    assert len(got) == N_TOKENS
    assert got == expected


def test_single_member_weight_equals_member_alone(client, hf_models):
    """All weight on one member: the fused greedy output is that member's own greedy."""
    names, tokenizer, models = hf_models
    prompt = PROMPTS[0]
    for m, name in enumerate(names):
        weights = {n: (1.0 if n == name else 0.0) for n in names}
        resp = client.generate(prompt, max_tokens=16, ignore_eos=True, weights=weights, logprobs=1)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = models[m].generate(
                ids, max_new_tokens=16, do_sample=False, eos_token_id=None, min_new_tokens=16
            )
        assert [t.token_id for t in resp.tokens] == alone[0, ids.shape[1] :].tolist(), name

"""Policy invariants on real engines (gate, contrastive, proxy, packllm) and their errors."""

from __future__ import annotations

import grpc
import pytest

PROMPTS = ["def parse(text):\n    ", "class Node:\n    def __init__(self, value):", "import json\n"]
N = 24


def token_ids(client, prompt, **kwargs) -> list[int]:
    resp = client.generate(prompt, max_tokens=N, ignore_eos=True, logprobs=1, **kwargs)
    return [t.token_id for t in resp.tokens]


def alone(client, server, prompt, member: str) -> list[int]:
    weights = {name: (1.0 if name == member else 0.0) for name in server.models}
    return token_ids(client, prompt, policy="mean", weights=weights)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gate_tau_zero_is_the_primary_alone(client, server, prompt):
    primary = list(server.models)[0]
    got = token_ids(client, prompt, policy="gate", roles={primary: "primary"}, params={"tau": 0.0})
    assert got == alone(client, server, prompt, primary)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gate_tau_above_one_is_mean(client, server, prompt):
    primary = list(server.models)[1]
    got = token_ids(client, prompt, policy="gate", roles={primary: "primary"}, params={"tau": 1.5})
    assert got == token_ids(client, prompt, policy="mean")


def test_gate_counts_primary_only_and_fused_steps(client, server):
    names = list(server.models)
    resp = client.generate(
        PROMPTS[0],
        max_tokens=48,
        ignore_eos=True,
        policy="gate",
        roles={names[0]: "primary"},
        params={"tau": 0.5},
        member_details=True,
    )
    stats = resp.fusion_stats
    assert stats.fused_steps + stats.primary_only_steps == 48
    assert (
        stats.fused_steps > 0 and stats.primary_only_steps > 0
    )  # tiny peaked members: both happen
    by_name = {m.member: m for m in stats.members}
    assert by_name[names[0]].consulted_steps == 48
    assert by_name[names[1]].consulted_steps == stats.fused_steps
    # tokens decided by the primary alone report only the primary's detail
    assert {len(t.members) for t in resp.tokens} == {1, 2}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_contrastive_beta_zero_is_the_expert_alone(client, server, prompt):
    expert, amateur = list(server.models)
    got = token_ids(
        client,
        prompt,
        policy="contrastive",
        roles={expert: "expert", amateur: "amateur"},
        params={"beta": 0.0},
    )
    assert got == alone(client, server, prompt, expert)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_proxy_alpha_zero_is_the_base_alone(client, server, prompt):
    expert, base = list(server.models)
    got = token_ids(
        client,
        prompt,
        policy="proxy",
        roles={base: "base", expert: "expert"},
        params={"alpha": 0.0},
    )
    assert got == alone(client, server, prompt, base)


def test_packllm_weights_come_from_prompt_perplexity(client, server):
    resp = client.generate(
        PROMPTS[1], max_tokens=N, ignore_eos=True, policy="packllm", member_details=True, logprobs=1
    )
    weights = dict(resp.fusion_stats.weights)
    assert set(weights) == set(server.models)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert (
        max(weights.values()) - min(weights.values()) > 1e-3
    )  # random members differ in perplexity
    # the same request under `mean` with those weights chooses the same tokens
    same = token_ids(client, PROMPTS[1], policy="mean", weights=weights)
    assert [t.token_id for t in resp.tokens] == same


def test_member_details_report_agreement(client, server):
    resp = client.generate(PROMPTS[2], max_tokens=N, ignore_eos=True, member_details=True)
    stats = resp.fusion_stats
    assert stats.fused_steps == N and stats.primary_only_steps == 0
    for m in stats.members:
        assert m.consulted_steps == N
        assert 0.0 <= m.top1_agreement <= 1.0
    assert max(m.top1_agreement for m in stats.members) > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy": "contrastive"}, "fusion.roles"),
        (
            {"policy": "contrastive", "roles": {"alpha": "wizard", "beta": "amateur"}},
            "fusion.roles.alpha",
        ),
        ({"policy": "gate", "roles": {"nobody": "primary"}}, "fusion.roles.nobody"),
        (
            {"policy": "gate", "roles": {"alpha": "primary"}, "params": {"tau": 5.0}},
            "fusion.params.tau",
        ),
        (
            {
                "policy": "contrastive",
                "roles": {"alpha": "expert", "beta": "amateur"},
                "params": {"gamma": 1.0},
            },
            "fusion.params.gamma",
        ),
    ],
)
def test_role_and_param_errors_name_the_field(client, kwargs, field):
    with pytest.raises(grpc.RpcError) as err:
        client.generate("def f():", max_tokens=2, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()


def test_get_ensemble_lists_every_policy_with_params_and_roles(client):
    policies = {p.name: p for p in client.get_ensemble().policies}
    assert set(policies) >= {
        "mean",
        "product",
        "max",
        "entropy",
        "vote",
        "contrastive",
        "proxy",
        "gate",
        "packllm",
    }
    tau = {p.name: p for p in policies["gate"].params}["tau"]
    assert tau.min == 0 and tau.max >= 1 and tau.description
    assert {r.name for r in policies["contrastive"].roles} == {"expert", "amateur"}
    assert {r.name for r in policies["proxy"].roles} >= {"base", "expert"}

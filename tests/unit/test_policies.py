"""Policies: the pools against their formulas; params, roles, registry, entry points,
descriptions and weights. The rest of the library: test_policies_library.py."""

import importlib.metadata
import math

import numpy as np
import pytest

from fusion_server.fusion.candidates import MemberTopK, align_shared
from fusion_server.fusion.policies import (
    ENTRY_POINT_GROUP,
    POLICIES,
    ParamSpec,
    Policy,
    PolicyError,
    RoleSpec,
    describe_policies,
    describe_policy,
    log_normalize,
    normalize_weights,
    resolve_policy,
)

MEMBERS = ["a", "b", "c"]

ROLES = {  # a role assignment over MEMBERS for each policy with roles
    "contrastive": {"a": "expert", "b": "amateur"},
    "proxy": {"a": "base", "b": "expert", "c": "anti"},
    "gate": {"a": "primary"},
}
SOLO = ["entropy", "gate", "max", "mean", "packllm", "product"]
"""Policies that give a lone weighted member's own distribution."""
WEIGHTED = [*SOLO, "vote"]
"""Policies on which a member with weight 0 has no influence."""
INVARIANT = sorted(name for name, cls in POLICIES.items() if cls.argmax_invariant)


class ScaledMean(Policy):
    """Test-only policy with parameters."""

    name = "scaled"
    description = "test"
    params = {
        "beta": ParamSpec(0.5, 0.0, 1.0, "mixing"),
        "alpha": ParamSpec(0.1, 0.0, 1.0, "plausibility"),
    }

    def fuse(self, logprobs, mask, weights, params):
        return log_normalize(logprobs[:, 0], mask)


def _normalize(scores):
    """Plain-Python renormalisation of a list of log scores."""
    total = math.log(sum(math.exp(s) for s in scores))
    return [s - total for s in scores]


def _fuse(name, logprobs, mask, weights):
    members = MEMBERS[: logprobs.shape[1]]
    policy = POLICIES[name](members)
    params = [policy.validate_params({}) for _ in range(logprobs.shape[0])]
    wanted = {m: role for m, role in ROLES.get(name, {}).items() if m in members}
    roles = [policy.validate_roles(members, wanted)] * len(params) if policy.roles else None
    return policy.fuse(logprobs, mask, weights, params, roles)


@pytest.fixture
def case():
    """Two members, vocabulary 10; member b has no opinion on candidate 5."""
    vocab = 10
    a = MemberTopK(np.array([5, 7, 2]), np.log(np.array([0.5, 0.3, 0.1])))
    b = MemberTopK(np.array([7, 2]), np.log(np.array([0.6, 0.2])))
    batch = align_shared([[a, b]], vocab)
    fill_b = min(0.2, 0.2 / (vocab - 2))  # p_b(5) by the no-opinion rule
    pa = [0.5, 0.3, 0.1]  # candidates 5, 7, 2
    pb = [fill_b, 0.6, 0.2]
    return batch, pa, pb


def test_mean_formula(case):
    batch, pa, pb = case
    w = np.array([[0.25, 0.75]])
    got = _fuse("mean", batch.logprobs, batch.mask, w)[0]
    expected = _normalize([math.log(0.25 * x + 0.75 * y) for x, y in zip(pa, pb, strict=True)])
    assert np.allclose(got, expected)


def test_product_formula(case):
    batch, pa, pb = case
    w = np.array([[0.25, 0.75]])
    got = _fuse("product", batch.logprobs, batch.mask, w)[0]
    expected = _normalize(
        [0.25 * math.log(x) + 0.75 * math.log(y) for x, y in zip(pa, pb, strict=True)]
    )
    assert np.allclose(got, expected)
    assert np.isfinite(got).all()  # no silent veto by the member without an opinion


def test_max_formula(case):
    batch, pa, pb = case
    w = np.array([[0.5, 0.5]])
    got = _fuse("max", batch.logprobs, batch.mask, w)[0]
    expected = _normalize([math.log(max(x, y)) for x, y in zip(pa, pb, strict=True)])
    assert np.allclose(got, expected)


def test_test_lists_cover_the_registry():
    assert set(WEIGHTED) | set(ROLES) == set(POLICIES)
    assert set(POLICIES) - set(INVARIANT) == {"contrastive", "proxy"}


@pytest.mark.parametrize("name", SOLO)
def test_zero_weight_member_has_no_influence(name, case):
    batch, pa, _ = case
    got = _fuse(name, batch.logprobs, batch.mask, np.array([[1.0, 0.0]]))[0]
    assert np.allclose(got, _normalize([math.log(x) for x in pa]))
    # even a member that puts -inf everywhere
    lp = batch.logprobs.copy()
    lp[0, 1] = -np.inf
    assert np.allclose(_fuse(name, lp, batch.mask, np.array([[1.0, 0.0]]))[0], got)


@pytest.mark.parametrize("name", WEIGHTED)
def test_zero_weight_member_is_ignored(name, case):
    batch, _, _ = case
    w = np.array([[1.0, 0.0]])
    got = _fuse(name, batch.logprobs, batch.mask, w)
    for other in (np.log(np.array([0.1, 0.1, 0.8])), np.full(3, -np.inf)):
        lp = batch.logprobs.copy()
        lp[0, 1] = other
        assert np.allclose(_fuse(name, lp, batch.mask, w), got)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_normalised_and_masked(name):
    rng = np.random.default_rng(0)
    n_req, n_mem, n_cand = 16, 3, 9
    lp = np.log(rng.dirichlet(np.ones(n_cand), size=(n_req, n_mem)))
    mask = rng.random((n_req, n_cand)) < 0.7
    mask[:, 0] = True
    lp[~np.broadcast_to(mask[:, None], lp.shape)] = -np.inf
    w = rng.dirichlet(np.ones(n_mem), size=n_req)
    w[0] = [0.0, 1.0, 0.0]
    fused = _fuse(name, lp, mask, w)
    assert fused.shape == (n_req, n_cand)
    assert np.isneginf(fused[~mask]).all()
    lse = np.log(np.exp(np.where(mask, fused, -np.inf)).sum(axis=1))
    assert np.allclose(lse, 0.0)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_batch_equals_row_by_row(name):
    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(6), size=(5, 3)))
    mask = np.ones((5, 6), dtype=bool)
    w = rng.dirichlet(np.ones(3), size=5)
    batch = _fuse(name, lp, mask, w)
    for r in range(5):
        assert np.allclose(batch[r], _fuse(name, lp[r : r + 1], mask[r : r + 1], w[r : r + 1])[0])


@pytest.mark.parametrize("name", INVARIANT)
def test_argmax_invariant_flag(name):
    """Built-ins: when all weighted members share a top-1, it is the fused argmax."""
    rng = np.random.default_rng(2)
    for _ in range(50):
        lp = np.log(rng.dirichlet(np.ones(7) * 0.5, size=(1, 3)))
        lp[0, :, 3] = lp[0].max(axis=1) + 0.01  # candidate 3 is everyone's top-1
        fused = _fuse(name, lp, np.ones((1, 7), dtype=bool), rng.dirichlet(np.ones(3))[None])
        assert fused[0].argmax() == 3


def test_log_normalize_all_vetoed_row_is_uniform():
    x = np.array([[-np.inf, -np.inf, 0.0]])
    mask = np.array([[True, True, False]])
    assert np.allclose(log_normalize(x, mask), [[math.log(0.5), math.log(0.5), -np.inf]])


def test_validate_params():
    assert ScaledMean.validate_params({}) == {"beta": 0.5, "alpha": 0.1}
    assert ScaledMean.validate_params({"beta": 1}) == {"beta": 1.0, "alpha": 0.1}
    with pytest.raises(PolicyError) as err:
        ScaledMean.validate_params({"gamma": 1.0})
    assert err.value.field == "fusion.params.gamma"
    assert "alpha, beta" in str(err.value)
    for bad in (1.5, -0.1, float("nan"), float("inf"), "x"):
        with pytest.raises(PolicyError) as err:
            ScaledMean.validate_params({"beta": bad})
        assert err.value.field == "fusion.params.beta"
        assert "fusion.params.beta" in str(err.value)
    with pytest.raises(PolicyError, match="fusion.params.beta"):
        POLICIES["mean"].validate_params({"beta": 0.5})
    assert isinstance(PolicyError("f", "m"), ValueError)


PLUGIN = """
from fusion_server.fusion.policies import Policy, log_normalize

class FirstMember(Policy):
    name = "first"
    description = "member 0 alone"

    def fuse(self, logprobs, mask, weights, params):
        return log_normalize(logprobs[:, 0], mask)

NOT_A_POLICY = 3
"""


def test_resolve_policy(tmp_path, monkeypatch):
    assert resolve_policy("mean") is POLICIES["mean"]
    assert set(POLICIES) >= {"mean", "product", "max"}
    (tmp_path / "my_fusion_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = resolve_policy("my_fusion_plugin:FirstMember")
    assert issubclass(cls, Policy) and cls.name == "first"
    assert cls(MEMBERS).member_names == MEMBERS
    with pytest.raises(PolicyError) as err:
        resolve_policy("nope")
    assert err.value.field == "fusion.policy"
    assert all(name in str(err.value) for name in POLICIES)
    for spec in (
        "no_such_module_xyz:Foo",
        "my_fusion_plugin:Missing",
        "my_fusion_plugin:NOT_A_POLICY",
        "abc:ABC",
        ":",
    ):
        with pytest.raises(PolicyError) as err:
            resolve_policy(spec)
        assert err.value.field == "fusion.policy"
    with pytest.raises(PolicyError, match="not a concrete Policy"):
        resolve_policy("fusion_server.fusion.policies:Policy")


def test_normalize_weights():
    w = normalize_weights(MEMBERS, {"a": 2.0, "b": 1.0}, {})
    assert np.allclose(w, [0.5, 0.25, 0.25])  # c defaults to 1.0
    w = normalize_weights(MEMBERS, {"a": 2.0}, {"a": 0.0, "c": 3.0})
    assert np.allclose(w, [0.0, 0.25, 0.75])
    assert w.shape == (3,) and math.isclose(w.sum(), 1.0)


@pytest.mark.parametrize(
    "configured,overrides,field",
    [
        ({}, {"zed": 1.0}, "fusion.weights.zed"),
        ({"zed": 1.0}, {}, "fusion.weights.zed"),
        ({}, {"b": -1.0}, "fusion.weights.b"),
        ({}, {"b": float("nan")}, "fusion.weights.b"),
        ({}, {"b": float("inf")}, "fusion.weights.b"),
        ({"a": 1.0}, {"a": 0.0, "b": 0.0, "c": 0.0}, "fusion.weights"),
    ],
)
def test_normalize_weights_errors(configured, overrides, field):
    with pytest.raises(PolicyError) as err:
        normalize_weights(MEMBERS, configured, overrides)
    assert err.value.field == field and field in str(err.value)


def test_registry_and_flags():
    assert list(POLICIES) == [
        "mean",
        "product",
        "max",
        "entropy",
        "vote",
        "contrastive",
        "proxy",
        "gate",
        "packllm",
    ]
    assert [n for n, c in POLICIES.items() if c.gated] == ["gate"]
    assert [n for n, c in POLICIES.items() if c.needs_prompt_nll] == ["packllm"]
    assert [n for n, c in POLICIES.items() if c.roles] == ["contrastive", "proxy", "gate"]
    assert RoleSpec("x") == RoleSpec("x", min_members=1, max_members=1)


def test_validate_roles():
    contrastive, proxy = POLICIES["contrastive"], POLICIES["proxy"]
    assert contrastive.validate_roles(MEMBERS, {"c": "expert", "a": "amateur"}) == {
        "expert": (2,),
        "amateur": (0,),
    }
    assert proxy.validate_roles(MEMBERS, {"c": "expert", "b": "base", "a": "expert"}) == {
        "base": (1,),
        "expert": (0, 2),  # member order
        "anti": (),
    }
    # a policy without roles ignores the mapping, whatever it holds
    assert POLICIES["mean"].validate_roles(MEMBERS, {"zed": "nope", "a": "expert"}) == {}


@pytest.mark.parametrize(
    "name,roles,field,message",
    [
        ("contrastive", {"zed": "expert"}, "fusion.roles.zed", "unknown member (members: a, b, c)"),
        ("contrastive", {"a": "teacher"}, "fusion.roles.a", "(roles: expert, amateur)"),
        (
            "contrastive",
            {"b": "amateur"},
            "fusion.roles",
            "policy 'contrastive' needs exactly 1 member with role 'expert' (got 0)",
        ),
        (
            "contrastive",
            {"a": "expert", "b": "expert", "c": "amateur"},
            "fusion.roles",
            "policy 'contrastive' needs exactly 1 member with role 'expert' (got 2)",
        ),
        (
            "proxy",
            {"a": "base", "b": "anti"},
            "fusion.roles",
            "policy 'proxy' needs at least 1 member with role 'expert' (got 0)",
        ),
        (
            "proxy",
            {"a": "base", "b": "base", "c": "expert"},
            "fusion.roles",
            "needs exactly 1 member with role 'base' (got 2)",
        ),
        ("gate", {}, "fusion.roles", "policy 'gate' needs exactly 1 member with role 'primary'"),
    ],
)
def test_validate_roles_errors(name, roles, field, message):
    with pytest.raises(PolicyError) as err:
        POLICIES[name].validate_roles(MEMBERS, roles)
    assert err.value.field == field
    assert message in str(err.value)


def test_role_count_text():
    assert RoleSpec("x").count_text() == "exactly 1 member"
    assert RoleSpec("x", 2, 2).count_text() == "exactly 2 members"
    assert RoleSpec("x", 1, None).count_text() == "at least 1 member"
    assert RoleSpec("x", 0, 3).count_text() == "at most 3 members"
    assert RoleSpec("x", 2, 4).count_text() == "2 to 4 members"


class _EntryPoints:
    """Stands in for importlib.metadata.entry_points, serving one group."""

    def __init__(self, **plugins):
        self.eps = [
            importlib.metadata.EntryPoint(name=n, value=v, group=ENTRY_POINT_GROUP)
            for n, v in plugins.items()
        ]

    def __call__(self, *, group):
        return self.eps if group == ENTRY_POINT_GROUP else []


def test_resolve_policy_entry_points(tmp_path, monkeypatch):
    (tmp_path / "my_fusion_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = _EntryPoints(
        first="my_fusion_plugin:FirstMember",
        mean="my_fusion_plugin:FirstMember",  # built-ins win
        broken="no_such_module_xyz:Foo",
        notpolicy="my_fusion_plugin:NOT_A_POLICY",
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    cls = resolve_policy("first")
    assert issubclass(cls, Policy) and cls.name == "first"
    assert resolve_policy("mean") is POLICIES["mean"]
    with pytest.raises(PolicyError) as err:
        resolve_policy("broken")
    assert err.value.field == "fusion.policy" and "no_such_module_xyz:Foo" in str(err.value)
    with pytest.raises(PolicyError, match="not a concrete Policy"):
        resolve_policy("notpolicy")
    with pytest.raises(PolicyError) as err:
        resolve_policy("nope")
    assert err.value.field == "fusion.policy"
    assert "product, proxy, vote, broken, first, notpolicy" in str(err.value)


def test_describe_policies():
    info = {d["name"]: d for d in describe_policies()}
    assert list(info) == list(POLICIES)
    assert info["mean"] == {
        "name": "mean",
        "description": POLICIES["mean"].description,
        "params": [],
        "roles": [],
    }
    assert info["contrastive"]["params"][1] == {
        "name": "beta",
        "default": 0.5,
        "min": 0.0,
        "max": 10.0,
        "description": "strength of the amateur penalty",
    }
    roles = {r["name"]: r for r in info["proxy"]["roles"]}
    assert (roles["base"]["min"], roles["base"]["max"]) == (1, 1)
    assert (roles["expert"]["min"], roles["expert"]["max"]) == (1, None)
    assert (roles["anti"]["min"], roles["anti"]["max"]) == (0, None)
    assert all(d["description"] for d in info.values())


def test_description_defaults_to_docstring():
    class Documented(Policy):
        """First line.

        More.
        """

        name = "documented"

        def fuse(self, logprobs, mask, weights, params, roles=None):
            return log_normalize(logprobs[:, 0], mask)

    assert describe_policy(Documented)["description"] == "First line."

"""Built-in policies against their formulas; validation, registry and weights."""

import math

import numpy as np
import pytest

from fusion_server.fusion.candidates import MemberTopK, align_shared
from fusion_server.fusion.policies import (
    POLICIES,
    ParamSpec,
    Policy,
    PolicyError,
    log_normalize,
    normalize_weights,
    resolve_policy,
)

MEMBERS = ["a", "b", "c"]


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
    policy = POLICIES[name](MEMBERS[: logprobs.shape[1]])
    params = [policy.validate_params({}) for _ in range(logprobs.shape[0])]
    return policy.fuse(logprobs, mask, weights, params)


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


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_zero_weight_member_has_no_influence(name, case):
    batch, pa, _ = case
    got = _fuse(name, batch.logprobs, batch.mask, np.array([[1.0, 0.0]]))[0]
    assert np.allclose(got, _normalize([math.log(x) for x in pa]))
    # even a member that puts -inf everywhere
    lp = batch.logprobs.copy()
    lp[0, 1] = -np.inf
    assert np.allclose(_fuse(name, lp, batch.mask, np.array([[1.0, 0.0]]))[0], got)


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


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_argmax_invariant_flag(name):
    """Built-ins: when all weighted members share a top-1, it is the fused argmax."""
    assert POLICIES[name].argmax_invariant
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
    assert err.value.field == "fusion.policy" and "max, mean, product" in str(err.value)
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

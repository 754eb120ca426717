"""The policy library (entropy, vote, contrastive, proxy, gate, packllm) against its
formulas, computed here in plain Python; property tests over every policy."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fusion_server.fusion.candidates import MemberTopK, align_shared
from fusion_server.fusion.policies import POLICIES, PolicyError

MEMBERS = ["a", "b", "c", "d"]
VOCAB = 10
TOPS = {  # member -> (reported ids, probabilities)
    "a": ([5, 7, 2], [0.5, 0.3, 0.1]),
    "b": ([7, 2], [0.6, 0.2]),
    "c": ([2, 9], [0.7, 0.25]),
}
CANDS = [5, 7, 2, 9]  # union by first appearance
PROPERTY = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _fill(probs):
    """The no-opinion rule: min(smallest reported p, leftover mass / unreported ids)."""
    return min(min(probs), (1 - sum(probs)) / (VOCAB - len(probs)))


def _probs(member):
    ids, probs = TOPS[member]
    return [probs[ids.index(c)] if c in ids else _fill(probs) for c in CANDS]


P = {m: _probs(m) for m in TOPS}  # member -> p(c) over CANDS, fills included


def _normalize(scores):
    """Plain-Python renormalisation of log scores (-inf allowed)."""
    total = math.log(sum(math.exp(s) for s in scores if s != -math.inf))
    return [s - total for s in scores]


def _log(x):
    return math.log(x) if x > 0 else -math.inf


@pytest.fixture
def batch():
    tops = [MemberTopK(np.array(ids), np.log(np.array(p))) for ids, p in TOPS.values()]
    out = align_shared([tops], VOCAB)
    assert out.ids[0].tolist() == CANDS
    assert not out.in_topk[0, 1, 0] and not out.in_topk[0, 2, 0]  # fills are exercised
    return out


def _run(name, logprobs, mask, weights, params=None, roles=None):
    """Fuse one request (row 0) with validated params and roles."""
    members = MEMBERS[: logprobs.shape[1]]
    policy = POLICIES[name](members)
    p = [policy.validate_params(params or {})]
    r = [policy.validate_roles(members, roles or {})] if policy.roles else None
    return policy.fuse(logprobs, mask, np.array([weights], dtype=float), p, r)[0]


def _pool(weights, probs):
    """log sum_i w_i p_i(c) for each candidate."""
    return [_log(sum(w * p[c] for w, p in zip(weights, probs, strict=True))) for c in range(4)]


# -- entropy ------------------------------------------------------------------------


def _entropy(probs):
    q = [x / sum(probs) for x in probs]
    return -sum(x * math.log(x) for x in q if x > 0)


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [0.5, 0.0, 0.5]])
def test_entropy_formula(batch, weights):
    probs = [P["a"], P["b"], P["c"]]
    v = [w / max(_entropy(p), 1e-3) for w, p in zip(weights, probs, strict=True)]
    v = [x / sum(v) for x in v]
    got = _run("entropy", batch.logprobs, batch.mask, weights)
    assert np.allclose(got, _normalize(_pool(v, probs)))


def test_entropy_floor():
    # member 0 is sure of candidate 0 (entropy 0 -> floored), member 1 is not
    p1 = [0.5, 0.3, 0.2]
    lp = np.array([[[0.0, -np.inf, -np.inf], np.log(p1)]])
    w = [0.4, 0.6]
    v = [0.4 / 0.5, 0.6 / max(_entropy(p1), 0.5)]
    v = [x / sum(v) for x in v]
    expected = _normalize([_log(v[0] * p0 + v[1] * q) for p0, q in zip([1, 0, 0], p1, strict=True)])
    got = _run("entropy", lp, np.ones((1, 3), bool), w, {"min_entropy": 0.5})
    assert np.allclose(got, expected)


def test_entropy_equal_entropies_is_mean():
    lp = np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]]))
    mask = np.ones((1, 3), bool)
    assert np.allclose(_run("entropy", lp, mask, [0.3, 0.7]), _run("mean", lp, mask, [0.3, 0.7]))


# -- vote ---------------------------------------------------------------------------


def _vote(weights, tops, probs, smoothing=1e-3):
    """tops: each member's top-1 candidate index."""
    votes = [0.0] * 4
    for w, t in zip(weights, tops, strict=True):
        if w > 0:
            votes[t] += w
    votes = [v / sum(votes) for v in votes]
    mean = [math.exp(x) for x in _normalize(_pool(weights, probs))]
    return _normalize([_log(v + smoothing * m) for v, m in zip(votes, mean, strict=True)])


@pytest.mark.parametrize(
    "weights,params,winner",
    [
        ([0.2, 0.3, 0.5], {}, 2),  # c's top-1 (candidate 2) has the most weight
        ([0.4, 0.3, 0.3], {"smoothing": 0.5}, 0),
        ([0.5, 0.5, 0.0], {}, 1),  # a: 5 vs b: 7 tie; the mean prefers 7; c does not vote
        ([0.5, 0.0, 0.5], {}, 2),  # a: 5 vs c: 2 tie; the mean prefers 2
    ],
)
def test_vote_formula(batch, weights, params, winner):
    probs = [P["a"], P["b"], P["c"]]
    tops = [p.index(max(p)) for p in probs]
    assert tops == [0, 1, 2]
    got = _run("vote", batch.logprobs, batch.mask, weights, params)
    assert np.allclose(got, _vote(weights, tops, probs, params.get("smoothing", 1e-3)))
    assert got.argmax() == winner


# -- contrastive --------------------------------------------------------------------


def _contrastive(pe, pa, alpha, beta):
    cut = alpha * max(pe)
    return _normalize(
        [
            math.log(e) - beta * math.log(a) if e >= cut else -math.inf
            for e, a in zip(pe, pa, strict=True)
        ]
    )


@pytest.mark.parametrize(
    "params", [{}, {"alpha": 0.0, "beta": 1.0}, {"alpha": 0.5, "beta": 2.0}, {"beta": 0.0}]
)
def test_contrastive_formula(batch, params):
    alpha, beta = params.get("alpha", 0.1), params.get("beta", 0.5)
    roles = {"a": "expert", "b": "amateur"}  # c has no role: ignored
    got = _run("contrastive", batch.logprobs, batch.mask, [0.2, 0.3, 0.5], params, roles)
    expected = _contrastive(P["a"], P["b"], alpha, beta)
    assert np.allclose(got, expected)
    # candidate 9 (p_a = 1/70, a's fill) is cut exactly when alpha * 0.5 > 1/70
    assert (got[3] == -np.inf) == (alpha * max(P["a"]) > P["a"][3])


def test_contrastive_weights_do_not_matter(batch):
    roles = {"b": "expert", "c": "amateur"}
    one = _run("contrastive", batch.logprobs, batch.mask, [1.0, 0.0, 0.0], None, roles)
    two = _run("contrastive", batch.logprobs, batch.mask, [0.0, 0.5, 0.5], None, roles)
    assert np.allclose(one, two)
    assert np.allclose(one, _contrastive(P["b"], P["c"], 0.1, 0.5))


def test_contrastive_rows_with_different_roles(batch):
    lp = np.repeat(batch.logprobs, 2, axis=0)
    mask = np.repeat(batch.mask, 2, axis=0)
    policy = POLICIES["contrastive"](MEMBERS[:3])
    roles = [
        policy.validate_roles(MEMBERS[:3], {"a": "expert", "b": "amateur"}),
        policy.validate_roles(MEMBERS[:3], {"c": "expert", "a": "amateur"}),
    ]
    params = [policy.validate_params({}), policy.validate_params({"beta": 1.0})]
    got = policy.fuse(lp, mask, np.full((2, 3), 1 / 3), params, roles)
    assert np.allclose(got[0], _contrastive(P["a"], P["b"], 0.1, 0.5))
    assert np.allclose(got[1], _contrastive(P["c"], P["a"], 0.1, 1.0))


def test_contrastive_needs_roles(batch):
    policy = POLICIES["contrastive"](MEMBERS[:3])
    with pytest.raises(ValueError, match="role"):
        policy.fuse(
            batch.logprobs, batch.mask, np.full((1, 3), 1 / 3), [policy.validate_params({})], None
        )


@PROPERTY
@given(
    lp=hnp.arrays(np.float64, (2, 3, 5), elements=st.floats(-50, 0)),
    alpha=st.floats(0, 1),
)
def test_contrastive_beta_zero_is_the_expert(lp, alpha):
    policy = POLICIES["contrastive"](MEMBERS[:3])
    roles = [policy.validate_roles(MEMBERS[:3], {"b": "expert", "c": "amateur"})] * 2
    params = [policy.validate_params({"alpha": alpha, "beta": 0.0})] * 2
    fused = policy.fuse(lp, np.ones((2, 5), bool), np.full((2, 3), 1 / 3), params, roles)
    expert_top = fused[[0, 1], lp[:, 1].argmax(axis=1)]  # [2] fused at the expert's argmax
    assert np.allclose(expert_top, fused.max(axis=1), rtol=0, atol=1e-12)  # ties: rounding


# -- proxy --------------------------------------------------------------------------


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize(
    "roles,alpha",
    [
        ({"a": "base", "b": "expert", "c": "anti"}, 1.0),
        ({"a": "base", "b": "expert", "c": "anti"}, 2.5),
        ({"a": "base", "b": "expert", "c": "expert"}, -0.5),  # no anti, negative alpha
        ({"c": "base", "a": "expert", "b": "anti"}, 0.7),
        ({"b": "base", "c": "expert"}, 1.0),  # a has no role
    ],
)
def test_proxy_formula(batch, roles, alpha):
    by_role = {r: [P[m] for m in "abc" if roles.get(m) == r] for r in ("base", "expert", "anti")}
    (base,) = by_role["base"]
    expected = []
    for c in range(4):
        shift = _mean([math.log(p[c]) for p in by_role["expert"]])
        if by_role["anti"]:
            shift -= _mean([math.log(p[c]) for p in by_role["anti"]])
        expected.append(math.log(base[c]) + alpha * shift)
    got = _run("proxy", batch.logprobs, batch.mask, [0.2, 0.3, 0.5], {"alpha": alpha}, roles)
    assert np.allclose(got, _normalize(expected))


def test_proxy_alpha_zero_is_the_base(batch):
    roles = {"a": "base", "b": "expert", "c": "anti"}
    got = _run("proxy", batch.logprobs, batch.mask, [0.0, 0.5, 0.5], {"alpha": 0.0}, roles)
    assert np.allclose(got, _normalize([math.log(p) for p in P["a"]]))


# -- gate ---------------------------------------------------------------------------


def test_gate_confident():
    gate = POLICIES["gate"](MEMBERS[:2])
    assert gate.gated and set(gate.roles) == {"primary"}
    pad = -np.inf
    tops = np.array(
        [
            [math.log(0.95), math.log(0.03), pad],
            [math.log(0.5), math.log(0.4), pad],
            [math.log(0.9), math.log(0.05), pad],
            [pad, pad, pad],
        ]
    )  # [R, K] the primary's top-k, -inf padded
    for tau, expected in [
        (0.9, [True, False, True, False]),
        (0.5, [True, True, True, False]),
        (0.0, [True, True, True, True]),
        (1.0, [False, False, False, False]),
        (1.5, [False, False, False, False]),
    ]:
        params = [gate.validate_params({"tau": tau})] * 4
        assert gate.confident(tops, params).tolist() == expected, tau
    assert gate.confident(np.log([[1.0]]), [{"tau": 1.0}]).tolist() == [True]
    assert gate.confident(np.log([[1.0]]), [{"tau": 1.01}]).tolist() == [False]
    assert gate.confident(np.zeros((2, 0)), [{"tau": 0.5}] * 2).tolist() == [False, False]


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [0.0, 0.5, 0.5]])
def test_gate_fuse_is_the_linear_pool(batch, weights):
    got = _run("gate", batch.logprobs, batch.mask, weights, None, {"b": "primary"})
    assert np.allclose(got, _normalize(_pool(weights, [P["a"], P["b"], P["c"]])))


# -- packllm ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.25])
def test_packllm_prompt_weights(temperature):
    policy = POLICIES["packllm"](MEMBERS[:4])
    assert policy.needs_prompt_nll
    nll, w = [2.0, 1.0, 3.0, 0.5], [0.2, 0.3, 0.5, 0.0]
    params = policy.validate_params({"temperature": temperature})
    got = policy.prompt_weights(np.array(nll), np.array(w), params)
    raw = [wi * math.exp(ni) ** (-1 / temperature) for wi, ni in zip(w, nll, strict=True)]
    assert np.allclose(got, [x / sum(raw) for x in raw])
    assert got[3] == 0.0  # weight 0 stays 0


def test_packllm_prompt_weights_edges():
    policy = POLICIES["packllm"](MEMBERS[:3])
    params = policy.validate_params({})
    w = np.array([0.25, 0.25, 0.5])
    assert np.allclose(policy.prompt_weights(np.zeros(3), w, params), w)  # no prompt to score
    got = policy.prompt_weights(np.array([1.0, np.inf, 1.0]), w, params)
    assert np.allclose(got, [1 / 3, 0.0, 2 / 3])
    assert np.allclose(policy.prompt_weights(np.full(3, np.inf), w, params), w)
    assert np.allclose(policy.prompt_weights(np.array([800.0, 0.0, 900.0]), w, params), [0, 1, 0])
    for bad in ([np.nan, 1.0, 1.0], [-np.inf, 1.0, 1.0], [1.0, 1.0]):
        with pytest.raises(ValueError, match="prompt_nll"):
            policy.prompt_weights(np.array(bad), w, params)


def test_packllm_fuse_is_the_linear_pool(batch):
    weights = [0.1, 0.0, 0.9]
    got = _run("packllm", batch.logprobs, batch.mask, weights)
    assert np.allclose(got, _normalize(_pool(weights, [P["a"], P["b"], P["c"]])))


# -- parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,defaults,bad",
    [
        ("entropy", {"min_entropy": 1e-3}, {"min_entropy": [0.0, 11.0]}),
        ("vote", {"smoothing": 1e-3}, {"smoothing": [0.0, 1.5]}),
        ("contrastive", {"alpha": 0.1, "beta": 0.5}, {"alpha": [-0.1, 1.1], "beta": [-1, 10.5]}),
        ("proxy", {"alpha": 1.0}, {"alpha": [-10.5, 11.0]}),
        ("gate", {"tau": 0.9}, {"tau": [-0.1, 2.1]}),
        ("packllm", {"temperature": 1.0}, {"temperature": [0.001, 101.0]}),
    ],
)
def test_params(name, defaults, bad):
    cls = POLICIES[name]
    assert cls.validate_params({}) == defaults
    for param, values in bad.items():
        for value in values:
            with pytest.raises(PolicyError) as err:
                cls.validate_params({param: value})
            assert err.value.field == f"fusion.params.{param}"
        for edge in (cls.params[param].min, cls.params[param].max):
            assert cls.validate_params({param: edge})[param] == edge


# -- properties of every policy -----------------------------------------------------


@st.composite
def _inputs(draw, name, finite=False):
    """Random logprobs [R, M, C], mask, weights, params and roles for one policy."""
    cls = POLICIES[name]
    n_mem = draw(st.integers(max(1, sum(s.min_members for s in cls.roles.values())), 4))
    n_req, n_cand = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    element = st.floats(-200, 0)
    if not finite:
        element = st.one_of(element, element, st.just(-np.inf))
    lp = draw(hnp.arrays(np.float64, (n_req, n_mem, n_cand), elements=element))
    mask = draw(hnp.arrays(np.bool_, (n_req, n_cand)))
    mask[:, 0] |= ~mask.any(axis=1)
    lp[~np.broadcast_to(mask[:, None], lp.shape)] = -np.inf
    w = draw(hnp.arrays(np.float64, (n_req, n_mem), elements=st.floats(0, 1)))
    w[w < 1e-3] = 0.0
    w[w.sum(axis=1) == 0, draw(st.integers(0, n_mem - 1))] = 1.0
    w /= w.sum(axis=1, keepdims=True)
    params = [
        {k: draw(st.floats(s.min, s.max)) for k, s in cls.params.items()} for _ in range(n_req)
    ]
    roles = [_roles(draw, cls, n_mem) for _ in range(n_req)] if cls.roles else None
    return cls(MEMBERS[:n_mem]), lp, mask, w, params, roles


def _roles(draw, cls, n_mem):
    members = iter(draw(st.permutations(MEMBERS[:n_mem])))
    mapping = {}
    for role, spec in cls.roles.items():  # the minimum of every role first
        for _ in range(spec.min_members):
            mapping[next(members)] = role
    for member in members:  # the rest: no role, or a role with room left
        room = [
            role
            for role, spec in cls.roles.items()
            if spec.max_members is None or list(mapping.values()).count(role) < spec.max_members
        ]
        role = draw(st.sampled_from([None, *room]))
        if role is not None:
            mapping[member] = role
    return cls.validate_roles(MEMBERS[:n_mem], mapping)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_normalised(name):
    @PROPERTY
    @given(_inputs(name))
    def check(inputs):
        policy, lp, mask, w, params, roles = inputs
        with np.errstate(invalid="raise"):  # no nan on the way, even if masked later
            fused = policy.fuse(lp, mask, w, params, roles)
        assert fused.shape == mask.shape
        assert not np.isnan(fused).any() and not np.isposinf(fused).any()
        assert np.isneginf(fused[~mask]).all()
        lse = np.log(np.exp(np.where(mask, fused, -np.inf)).sum(axis=1))
        assert np.allclose(lse, 0.0, atol=1e-9)

    check()


@pytest.mark.parametrize("name", sorted(n for n, c in POLICIES.items() if c.argmax_invariant))
def test_argmax_invariant_policies(name):
    @PROPERTY
    @given(_inputs(name, finite=True), st.data())
    def check(inputs, data):
        policy, lp, mask, w, params, roles = inputs
        margin = data.draw(st.floats(0.01, 5))
        best = np.array([data.draw(st.sampled_from(np.flatnonzero(row).tolist())) for row in mask])
        rows = np.arange(len(mask))
        top = np.where(mask[:, None], lp, -np.inf).max(axis=-1)  # [R, M]
        lp[rows, :, best] = np.where(w > 0, top + margin, lp[rows, :, best])
        fused = policy.fuse(lp, mask, w, params, roles)
        assert (np.where(mask, fused, -np.inf).argmax(axis=1) == best).all()

    check()

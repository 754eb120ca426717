"""sample(): greedy, determinism, batch independence, top-k / top-p support; RequestRng."""

import math

import numpy as np
import pytest

from fusion_server.fusion.sampler import RequestRng, make_seed, sample


def _row(probs, width=None):
    """One [1, C] row of log-probs (padded to width) and its mask."""
    width = width or len(probs)
    lp = np.full((1, width), -np.inf)
    lp[0, : len(probs)] = [math.log(p) for p in probs]
    mask = np.zeros((1, width), dtype=bool)
    mask[0, : len(probs)] = True
    return lp, mask


def _one(lp, mask, t=1.0, p=1.0, k=0, u=0.5):
    return int(sample(lp, mask, np.array([t]), np.array([p]), np.array([k]), np.array([u]))[0])


def test_greedy_picks_argmax_lowest_index_on_ties():
    lp, mask = _row([0.2, 0.4, 0.4])
    assert _one(lp, mask, t=0.0, u=0.99) == 1
    lp, mask = _row([0.1, 0.6, 0.3])
    for u in (0.0, 0.5, 0.999):
        assert _one(lp, mask, t=0.0, u=u) == 1


def test_padding_is_never_sampled():
    lp, mask = _row([0.5, 0.5], width=5)
    picks = {_one(lp, mask, u=u) for u in np.linspace(0, 0.999999, 200)}
    assert picks == {0, 1}


def test_inverse_cdf_boundaries():
    lp, mask = _row([0.5, 0.3, 0.2])
    assert _one(lp, mask, u=0.0) == 0
    assert _one(lp, mask, u=0.49) == 0
    assert _one(lp, mask, u=0.51) == 1
    assert _one(lp, mask, u=0.79) == 1
    assert _one(lp, mask, u=0.81) == 2
    assert _one(lp, mask, u=np.nextafter(1.0, 0.0)) == 2


def test_same_uniforms_same_result():
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(10), size=8))
    mask = np.ones_like(lp, dtype=bool)
    args = (np.full(8, 0.8), np.full(8, 0.9), np.full(8, 5), rng.random(8))
    assert np.array_equal(sample(lp, mask, *args), sample(lp, mask, *args))


def test_mixed_batch_equals_row_by_row():
    rng = np.random.default_rng(1)
    n = 32
    lp = np.log(rng.dirichlet(np.ones(12) * 0.3, size=n))
    mask = rng.random((n, 12)) < 0.8
    mask[:, 0] = True
    temperature = rng.choice([0.0, 0.5, 1.0, 1.7], size=n)
    top_p = rng.choice([1.0, 0.9, 0.3, 0.05], size=n)
    top_k = rng.choice([0, 1, 3, 20], size=n)
    u = rng.random(n)
    batch = sample(lp, mask, temperature, top_p, top_k, u)
    for r in range(n):
        alone = sample(
            lp[r : r + 1],
            mask[r : r + 1],
            temperature[r : r + 1],
            top_p[r : r + 1],
            top_k[r : r + 1],
            u[r : r + 1],
        )
        assert batch[r] == alone[0]
        assert mask[r, batch[r]]


def _frequencies(probs, n=20000, **kw):
    lp, mask = _row(probs)
    u = np.random.default_rng(2).random(n)
    rows = np.repeat(lp, n, axis=0), np.repeat(mask, n, axis=0)
    t, p, k = kw.get("t", 1.0), kw.get("p", 1.0), kw.get("k", 0)
    picks = sample(*rows, np.full(n, t), np.full(n, p), np.full(n, k), u)
    return np.bincount(picks, minlength=len(probs)) / n


def test_plain_sampling_matches_distribution():
    probs = [0.1, 0.2, 0.3, 0.4]
    freq = _frequencies(probs)
    assert np.allclose(freq, probs, atol=0.02)


def test_top_k_restricts_support():
    probs = [0.1, 0.4, 0.2, 0.3]
    freq = _frequencies(probs, k=2)
    assert freq[0] == 0 and freq[2] == 0
    assert np.allclose(freq[[1, 3]], [4 / 7, 3 / 7], atol=0.02)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = [0.1, 0.4, 0.2, 0.3]
    freq = _frequencies(probs, p=0.65)  # 0.4 + 0.3 = 0.7 >= 0.65
    assert freq[0] == 0 and freq[2] == 0
    assert np.allclose(freq[[1, 3]], [4 / 7, 3 / 7], atol=0.02)
    freq = _frequencies(probs, p=0.01)  # always at least the top one
    assert freq[1] == 1.0


def test_top_k_then_top_p():
    probs = [0.05, 0.35, 0.3, 0.3]
    freq = _frequencies(probs, k=3, p=0.5)  # top-3 renormalised: .368 .316 .316
    assert freq[0] == 0 and freq[1] + freq[2] == 1.0  # ties broken by lower index


def test_temperature_sharpens():
    probs = [0.2, 0.8]
    freq = _frequencies(probs, t=0.5)  # p^2: 0.04 / 0.68
    assert np.allclose(freq, [0.04 / 0.68, 0.64 / 0.68], atol=0.02)


@pytest.mark.parametrize(
    "field,kw",
    [
        ("temperature", {"t": -1.0}),
        ("top_p", {"p": 0.0}),
        ("top_k", {"k": -1}),
        ("uniforms", {"u": 1.0}),
    ],
)
def test_invalid_settings(field, kw):
    lp, mask = _row([0.5, 0.5])
    with pytest.raises(ValueError, match=field):
        _one(lp, mask, **kw)


def test_request_rng_reproducible():
    a, b, c = RequestRng(1234), RequestRng(1234), RequestRng(1235)
    draws_a = [a.uniform() for _ in range(5)]
    assert draws_a == [b.uniform() for _ in range(5)]
    assert draws_a != [c.uniform() for _ in range(5)]
    assert all(0.0 <= x < 1.0 for x in draws_a)


def test_make_seed():
    seeds = {make_seed() for _ in range(10)}
    assert len(seeds) == 10 and all(0 <= s < 2**63 for s in seeds)

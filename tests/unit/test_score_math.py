"""Score's fused log-likelihood (router/score.fuse_positions) against the formulas, on
full hand-made distributions: the members' top-k is cut from them, as vLLM would."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_server.fusion.policies import POLICIES, normalize_weights
from fusion_server.router.score import FusionChoice, bits_per_byte, fuse_positions

V, N, K = 64, 12, 5


def members(n_mem: int, seed: int = 0, scale: float = 2.0):
    """[M, N, V] full log-distributions, targets [N], and what vLLM would report."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, (n_mem, N, V))
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = rng.integers(0, V, N)
    top_ids = np.argsort(-full, axis=-1, kind="stable")[..., :K]  # [M, N, K]
    top_lps = np.take_along_axis(full, top_ids, -1)
    actual = full[:, np.arange(N), targets]  # [M, N]
    return full, targets, actual, top_ids, top_lps


def choice(name: str, names: list[str], weights=None, roles=None, params=None) -> FusionChoice:
    cls = POLICIES[name]
    return FusionChoice(
        policy=cls(names),
        params=cls.validate_params(params or {}),
        weights=normalize_weights(names, {}, weights or {}),
        roles=cls.validate_roles(names, roles or {}),
    )


def test_one_member_scores_its_own_log_likelihood():
    _, targets, actual, top_ids, top_lps = members(1)
    for name in ("mean", "product", "max", "entropy", "packllm"):
        got = fuse_positions(choice(name, ["a"]), actual, top_ids, top_lps, targets, V)
        np.testing.assert_allclose(got, actual[0], rtol=0, atol=1e-12, err_msg=name)


def test_mean_is_the_full_vocabulary_linear_pool():
    _, targets, actual, top_ids, top_lps = members(2, seed=1)
    c = choice("mean", ["a", "b"], weights={"a": 3, "b": 1})
    got = fuse_positions(c, actual, top_ids, top_lps, targets, V)
    expected = np.log(0.75 * np.exp(actual[0]) + 0.25 * np.exp(actual[1]))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_product_is_a_lower_bound_of_the_full_product_of_experts():
    full, targets, actual, top_ids, top_lps = members(2, seed=2)
    got = fuse_positions(choice("product", ["a", "b"]), actual, top_ids, top_lps, targets, V)
    poe = 0.5 * full[0] + 0.5 * full[1]  # [N, V]
    poe = poe - np.log(np.exp(poe).sum(-1, keepdims=True))
    exact = poe[np.arange(N), targets]
    assert np.all(got <= exact + 1e-12)
    assert np.all(got > exact - 1.0)  # and not far below on these peaked members


def test_gate_scores_the_primary_alone_where_it_is_confident():
    _, targets, actual, top_ids, top_lps = members(2, seed=3, scale=4.0)
    c = choice("gate", ["a", "b"], roles={"b": "primary"}, params={"tau": 0.5})
    got = fuse_positions(c, actual, top_ids, top_lps, targets, V)
    confident = top_lps[1].max(-1) >= np.log(0.5)
    assert confident.any() and (~confident).any()
    np.testing.assert_allclose(got[confident], actual[1][confident], atol=1e-12)
    pooled = np.log(0.5 * np.exp(actual[0]) + 0.5 * np.exp(actual[1]))
    np.testing.assert_allclose(got[~confident], pooled[~confident], atol=1e-12)


@pytest.mark.parametrize("name", ["max", "entropy", "vote"])
def test_other_policies_give_log_probabilities(name):
    _, targets, actual, top_ids, top_lps = members(3, seed=4)
    got = fuse_positions(choice(name, ["a", "b", "c"]), actual, top_ids, top_lps, targets, V)
    assert got.shape == (N,) and np.all(got <= 1e-12) and np.all(np.isfinite(got))


def test_bits_per_byte():
    assert bits_per_byte(-np.log(2) * 8, 4) == pytest.approx(2.0)
    assert bits_per_byte(0.0, 0) == 0.0


def test_unsupported_maps_to_unimplemented():
    import grpc

    from fusion_server.api.errors import status_for
    from fusion_server.router.score import Unsupported

    code, message = status_for(Unsupported("Score needs members that share one vocabulary"))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "vocabulary" in message

"""Pooling policies: every member alike, mixed by its weight (no roles).

Weights are the request's per-member weights (>= 0, summing to 1). A member with
weight 0 has no influence on any of these policies, whatever it reports.
"""

from __future__ import annotations

import numpy as np

from .base import ParamSpec, Policy, log_normalize, param_column


def linear_pool(logprobs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log sum_i w_i p_i(c), not renormalised; members with w_i = 0 drop out."""
    # logprobs: [R, M, C], weights: [R, M]
    with np.errstate(divide="ignore"):
        terms = np.log(weights)[:, :, None] + logprobs  # [R, M, C]; w=0 -> -inf
    top = terms.max(axis=1, keepdims=True)  # [R, 1, C]
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return top[:, 0] + np.log(np.exp(terms - top).sum(axis=1))  # [R, C]


class MeanPolicy(Policy):
    """Linear pool: fused(c) = log sum_i w_i p_i(c), renormalised over the candidates.

    p_i(c) is the member's reported probability, or its no-opinion fill where c is
    outside its top-k. Members with w_i = 0 drop out.
    """

    name = "mean"
    description = "Linear pool: log sum_i w_i p_i(c), renormalised over the candidates."
    argmax_invariant = True

    def fuse(self, logprobs, mask, weights, params, roles=None):
        return log_normalize(linear_pool(logprobs, weights), mask)


class ProductPolicy(Policy):
    """Log-linear pool: fused(c) = sum_i w_i log p_i(c), renormalised.

    Thanks to the no-opinion fill, a member that did not report c lowers it by its
    fill instead of vetoing it. Members with w_i = 0 drop out (even at -inf).
    """

    name = "product"
    description = "Log-linear pool (product of experts): sum_i w_i log p_i(c), renormalised."
    argmax_invariant = True

    def fuse(self, logprobs, mask, weights, params, roles=None):
        # logprobs: [R, M, C], weights: [R, M]; w=0 must not turn -inf into nan
        w = weights[:, :, None]  # [R, M, 1]
        terms = np.where(w > 0, w * np.where(w > 0, logprobs, 0.0), 0.0)  # [R, M, C]
        return log_normalize(terms.sum(axis=1), mask)


class MaxPolicy(Policy):
    """fused(c) = log max_i p_i(c) over the members with w_i > 0, renormalised.

    The weights' values do not matter, only which are > 0. A filled p_i(c) competes
    like a reported one.
    """

    name = "max"
    description = "log max_i p_i(c) over members with weight > 0, renormalised."
    argmax_invariant = True

    def fuse(self, logprobs, mask, weights, params, roles=None):
        # logprobs: [R, M, C], weights: [R, M]
        live = np.where(weights[:, :, None] > 0, logprobs, -np.inf)  # [R, M, C]
        return log_normalize(live.max(axis=1), mask)


class EntropyPolicy(Policy):
    """Linear pool re-weighted at every step by each member's confidence.

    q_i(c) = p_i(c) / sum_c' p_i(c') is member i's distribution over this step's
    candidates (its reported and filled probabilities, renormalised), H_i =
    -sum_c q_i(c) log q_i(c) its entropy, and

        v_i = w_i / max(H_i, min_entropy),  fused(c) = log sum_i (v_i / sum_j v_j) p_i(c)

    renormalised (the pool uses the p_i themselves, fills included, like ``mean``).
    A member with w_i = 0 keeps v_i = 0; a member (nearly) sure of one candidate has
    v_i = w_i / min_entropy at most. Equal entropies give ``mean``.
    """

    name = "entropy"
    description = "Linear pool with per-step weights w_i / H_i (H_i: member i's entropy)."
    params = {
        "min_entropy": ParamSpec(1e-3, 1e-6, 10.0, "floor on a member's entropy (nats)"),
    }
    argmax_invariant = True

    def fuse(self, logprobs, mask, weights, params, roles=None):
        n_cand = logprobs.shape[-1]
        member_mask = np.broadcast_to(mask[:, None, :], logprobs.shape).reshape(-1, n_cand)
        q = log_normalize(logprobs.reshape(-1, n_cand), member_mask)  # [R*M, C] log q_i(c)
        q = q.reshape(logprobs.shape)  # [R, M, C]
        p = np.exp(q)
        entropy = -(p * np.where(p > 0, q, 0.0)).sum(axis=-1)  # [R, M]; 0 log 0 = 0
        v = weights / np.maximum(entropy, param_column(params, "min_entropy"))  # [R, M]
        v = v / v.sum(axis=1, keepdims=True)
        return log_normalize(linear_pool(logprobs, v), mask)


class VotePolicy(Policy):
    """Weighted majority of the members' top-1, ties broken by the linear pool.

    Each member with w_i > 0 votes for its own argmax over the candidates (the first
    one among equal probabilities; a member with no finite log-prob does not vote).
    The no-opinion fill never exceeds what a member reported, so a vote goes to a
    candidate in the member's top-k (barring exact ties). With

        votes(c) = sum_{i votes c} w_i / sum_{i votes} w_i,  mean(c) = the ``mean`` output's p(c)

    fused(c) = log(votes(c) + smoothing * mean(c)), renormalised. The argmax is the
    majority whenever vote margins exceed ``smoothing`` (always for equal weights
    and fewer than 1 / smoothing members); equal votes are ordered by mean(c).
    If nobody votes the result is ``mean``.
    """

    name = "vote"
    description = "Weighted majority of the members' top-1; ties broken by the linear pool."
    params = {
        "smoothing": ParamSpec(1e-3, 1e-9, 1.0, "share of the linear pool added to the votes"),
    }
    argmax_invariant = True

    def fuse(self, logprobs, mask, weights, params, roles=None):
        n_req, n_mem, n_cand = logprobs.shape
        live = np.where(mask[:, None, :], logprobs, -np.inf)  # [R, M, C]
        top = live.argmax(axis=-1)  # [R, M] each member's top-1 candidate
        voting = (weights > 0) & np.isfinite(live.max(axis=-1))  # [R, M]
        votes = np.zeros((n_req, n_cand))  # [R, C]
        rows = np.repeat(np.arange(n_req), n_mem)
        np.add.at(votes, (rows, top.ravel()), np.where(voting, weights, 0.0).ravel())
        total = votes.sum(axis=1, keepdims=True)  # [R, 1]
        votes = votes / np.where(total > 0, total, 1.0)
        mean = np.exp(log_normalize(linear_pool(logprobs, weights), mask))  # [R, C]
        with np.errstate(divide="ignore"):
            score = np.log(votes + param_column(params, "smoothing") * mean)
        return log_normalize(score, mask)

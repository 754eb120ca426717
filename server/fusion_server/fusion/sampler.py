"""Sampling from fused distributions, vectorised across requests.

Contract: ``sample`` is deterministic given its inputs. All randomness comes in as
one uniform per request, drawn by the caller from that request's own
``RequestRng``; so the same seed and the same request give the same draws (and the
same tokens) whatever else is in the batch, and rows with different settings can
share one call. Works on candidate indices, not token ids.
"""

from __future__ import annotations

import secrets

import numpy as np


class RequestRng:
    """One request's random stream: PCG64 seeded once, one uniform per sampled step."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._gen = np.random.Generator(np.random.PCG64(self.seed))

    def uniform(self) -> float:
        """Next draw in [0, 1)."""
        return float(self._gen.random())


def make_seed() -> int:
    """A fresh seed for a request that did not set one (fits a signed 64-bit int)."""
    return secrets.randbits(63)


def _check(temperature, top_p, top_k, uniforms) -> None:
    if np.any(~np.isfinite(temperature)) or np.any(temperature < 0):
        raise ValueError("temperature must be finite and >= 0")
    if np.any(~(top_p > 0)) or np.any(top_p > 1):
        raise ValueError("top_p must be in (0, 1]")
    if np.any(top_k < 0):
        raise ValueError("top_k must be >= 0 (0 = off)")
    if np.any(~(uniforms >= 0)) or np.any(uniforms >= 1):
        raise ValueError("uniforms must be in [0, 1)")


def sample(
    logprobs: np.ndarray,
    mask: np.ndarray,
    temperature: np.ndarray,
    top_p: np.ndarray,
    top_k: np.ndarray,
    uniforms: np.ndarray,
) -> np.ndarray:
    """Pick one candidate index per request.

    logprobs: [R, C] fused log-probs, mask: [R, C] bool (>= 1 True per row),
    temperature, top_p, uniforms: [R] float, top_k: [R] int (0 = off).
    temperature == 0 is greedy (ties -> lowest index). Otherwise: scale by 1/T, keep
    the top_k best, then the smallest prefix whose mass reaches top_p (at least one),
    renormalise and invert the CDF at the uniform. Returns [R] int64 indices into C.
    """
    logprobs = np.asarray(logprobs, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    temperature = np.asarray(temperature, dtype=np.float64)
    top_p = np.asarray(top_p, dtype=np.float64)
    top_k = np.asarray(top_k, dtype=np.int64)
    uniforms = np.asarray(uniforms, dtype=np.float64)
    _check(temperature, top_p, top_k, uniforms)
    n_cand = logprobs.shape[1]

    scores = np.where(mask, logprobs, -np.inf)  # [R, C]
    greedy = np.argmax(scores, axis=1)  # [R] first max = lowest index

    temp = np.where(temperature > 0, temperature, 1.0)[:, None]  # [R, 1]
    scaled = scores / temp  # [R, C]
    order = np.argsort(-scaled, axis=1, kind="stable")  # [R, C] best first, ties by index
    ranked = np.take_along_axis(scaled, order, axis=1)  # [R, C] descending
    with np.errstate(invalid="ignore"):
        probs = np.exp(ranked - ranked[:, :1])  # [R, C]
    probs = np.where(np.isfinite(ranked), probs, 0.0)
    rank = np.arange(n_cand)[None, :]  # [1, C]

    k = np.where(top_k > 0, top_k, n_cand)[:, None]  # [R, 1]
    probs = np.where(rank < k, probs, 0.0)
    probs /= probs.sum(axis=1, keepdims=True)
    mass_before = np.cumsum(probs, axis=1) - probs  # [R, C] exclusive cumsum
    keep = (mass_before < top_p[:, None]) | (rank == 0)
    probs = np.where(keep, probs, 0.0)

    cdf = np.cumsum(probs, axis=1)  # [R, C]
    target = uniforms[:, None] * cdf[:, -1:]  # [R, 1]
    pick = (cdf <= target).sum(axis=1)  # [R] first rank with cdf > target
    last = (probs > 0).sum(axis=1) - 1  # [R] kept ranks are a prefix
    pick = np.minimum(pick, last)
    drawn = np.take_along_axis(order, pick[:, None], axis=1)[:, 0]  # [R]
    return np.where(temperature > 0, drawn, greedy).astype(np.int64)

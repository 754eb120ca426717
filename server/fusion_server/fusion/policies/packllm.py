"""The PackLLM policy: the linear pool, weighted by how well each member knows the prompt.

The router measures every member's mean negative log-likelihood per prompt token
once per request (``needs_prompt_nll``) and replaces the request's weights with
``prompt_weights``; ``fuse`` then pools with those weights at every step.
"""

from __future__ import annotations

import numpy as np

from .base import ParamSpec, Policy, log_normalize
from .pool import linear_pool


class PackLLMPolicy(Policy):
    """Linear pool with prompt-perplexity weights (PackLLM-sim style).

    With nll_i member i's mean NLL per prompt token (so ppl_i = exp(nll_i)) and w_i
    the configured / requested weight,

        w'_i = w_i * exp(-nll_i / T) / Z = w_i * ppl_i^(-1/T) / Z,

    Z normalising the w'_i to sum 1; T = ``temperature`` (small T: the least
    perplexed member takes all, large T: the weights stay as configured). A member
    with w_i = 0 keeps w'_i = 0; nll_i = +inf gives w'_i = 0; if every weighted member
    has nll = +inf, or all nll are equal (e.g. 0 when the prompt has no token to
    score), the weights stay w. Every step then fuses like ``mean`` with w':

        fused(c) = log sum_i w'_i p_i(c), renormalised (no-opinion fill as there).
    """

    name = "packllm"
    description = "Linear pool weighted by each member's prompt perplexity: w_i * ppl_i^(-1/T)."
    params = {
        "temperature": ParamSpec(1.0, 0.01, 100.0, "softness of the perplexity weights"),
    }
    argmax_invariant = True
    needs_prompt_nll = True

    def prompt_weights(
        self, prompt_nll: np.ndarray, weights: np.ndarray, params: dict
    ) -> np.ndarray:
        """[M] mean prompt NLL per member, [M] weights -> [M] PackLLM weights (sum 1)."""
        nll = np.asarray(prompt_nll, dtype=np.float64)  # [M]
        w = np.asarray(weights, dtype=np.float64)  # [M]
        if nll.shape != w.shape:
            raise ValueError(f"prompt_nll {nll.shape} and weights {w.shape} differ in shape")
        if np.isnan(nll).any() or np.isneginf(nll).any():
            raise ValueError(f"prompt_nll must be a number or +inf, got {nll.tolist()}")
        with np.errstate(divide="ignore"):
            score = np.log(w) - nll / params["temperature"]  # [M]; w=0 or nll=inf -> -inf
        finite = np.isfinite(score)
        if not finite.any():
            return w / w.sum()
        out = np.exp(score - score[finite].max())
        return out / out.sum()

    def fuse(self, logprobs, mask, weights, params, roles=None):
        return log_normalize(linear_pool(logprobs, weights), mask)

"""The gate policy: one primary member decides alone while it is confident.

Only the math lives here: ``confident`` tells the router, from the primary's top-k
alone, whether the others may be skipped this step; ``fuse`` fuses a step at which
they were consulted. Skipping members and their catch-up are the router's job.
"""

from __future__ import annotations

import numpy as np

from .base import ParamSpec, Policy, RoleSpec, log_normalize, param_column
from .pool import linear_pool


class GatePolicy(Policy):
    """The primary alone while its top-1 probability is >= tau; else the linear pool.

    confident: p_primary(top-1) >= tau (compared as log-probs), decided on the
    primary's reported top-k only. tau = 0 trusts the primary always, tau > 1 never
    (everyone is consulted at every step). When everyone was consulted,

        fused(c) = log sum_i w_i p_i(c), renormalised (exactly ``mean``),

    with the no-opinion fill and zero weights handled as there (the primary, too,
    counts with its weight).
    """

    name = "gate"
    description = "The primary decides alone while its top-1 prob >= tau; else the linear pool."
    params = {
        "tau": ParamSpec(0.9, 0.0, 2.0, "primary's top-1 probability needed to skip the others"),
    }
    roles = {"primary": RoleSpec("the member asked first, alone while confident")}
    argmax_invariant = True
    gated = True

    def confident(self, primary_logprobs: np.ndarray, params: list[dict]) -> np.ndarray:
        """[R, K] the primary's top-k log-probs (-inf padded) -> [R] bool: top-1 >= tau."""
        lp = np.asarray(primary_logprobs, dtype=np.float64)  # [R, K]
        tau = param_column(params, "tau")[:, 0]  # [R]
        top = lp.max(axis=-1, initial=-np.inf)  # [R]
        with np.errstate(divide="ignore"):  # tau = 0 -> log 0 = -inf: always confident
            return (tau <= 1.0) & (top >= np.log(tau))

    def fuse(self, logprobs, mask, weights, params, roles=None):
        return log_normalize(linear_pool(logprobs, weights), mask)

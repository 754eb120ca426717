"""Contrast policies: members play roles, and some are subtracted from others.

The request's weights are not used here: the roles and the policy's parameters
decide each member's part, and a member without a role has none. Neither policy is
argmax-invariant (an amateur or anti-expert that agrees on the top-1 pushes it down).

Log-probs that get subtracted (or scaled by a possibly negative alpha) are floored
at ``LOGPROB_FLOOR`` so that a -inf can never turn into +inf; under the no-opinion
fill rule every candidate's log-prob is finite anyway, so this only guards
hand-made or third-party inputs.
"""

from __future__ import annotations

import numpy as np

from .base import ParamSpec, Policy, RoleSpec, log_normalize, param_column

LOGPROB_FLOOR = -1e4
"""Smallest log-prob used for a subtracted member (far below any real one)."""


class ContrastivePolicy(Policy):
    """Contrastive decoding: the expert's log-prob minus beta times the amateur's.

    With p_e the expert's and p_a the amateur's (reported or filled) probabilities,

        fused(c) = log p_e(c) - beta * log p_a(c)   if p_e(c) >= alpha * max_c' p_e(c')
                   -inf                             otherwise,

    renormalised over the candidates. The plausibility cut keeps the expert's own
    argmax, so beta = 0 decodes as the expert alone (over the plausible set); alpha =
    0 keeps every candidate. A candidate the amateur did not report has its fill,
    i.e. a small p_a and so a boost, as long as the expert finds it plausible.
    """

    name = "contrastive"
    description = "Expert minus beta x amateur log-probs over the expert's plausible set."
    params = {
        "alpha": ParamSpec(0.1, 0.0, 1.0, "plausibility cut: keep p_expert >= alpha * max"),
        "beta": ParamSpec(0.5, 0.0, 10.0, "strength of the amateur penalty"),
    }
    roles = {
        "expert": RoleSpec("the strong model whose distribution is sharpened"),
        "amateur": RoleSpec("the weak model whose mistakes are subtracted"),
    }

    def fuse(self, logprobs, mask, weights, params, roles=None):
        alpha = param_column(params, "alpha")  # [R, 1]
        beta = param_column(params, "beta")  # [R, 1]
        fused = np.empty(mask.shape)  # [R, C]
        for assignment, rows in self.group_rows(roles, len(mask)):
            (e,), (a,) = assignment["expert"], assignment["amateur"]
            lp_e = np.where(mask[rows], logprobs[rows, e], -np.inf)  # [G, C]
            lp_a = np.maximum(logprobs[rows, a], LOGPROB_FLOOR)  # [G, C]
            with np.errstate(divide="ignore"):  # alpha = 0 -> no cut
                cut = np.log(alpha[rows]) + lp_e.max(axis=-1, keepdims=True)  # [G, 1]
            score = np.where(lp_e >= cut, lp_e - beta[rows] * lp_a, -np.inf)
            fused[rows] = log_normalize(score, mask[rows])
        return fused


class ProxyPolicy(Policy):
    """Proxy-tuning / DExperts: shift the base by alpha times (experts - anti-experts).

        fused(c) = log p_base(c) + alpha * (mean_e log p_e(c) - mean_a log p_a(c)),

    renormalised over the candidates; the anti term is 0 when no member has the role
    ``anti``. alpha = 0 gives the base's distribution over the candidates; a negative
    alpha steers away from the experts. Filled p_i(c) enter like reported ones.
    """

    name = "proxy"
    description = "Base log-probs + alpha x (mean expert - mean anti-expert) log-probs."
    params = {
        "alpha": ParamSpec(1.0, -10.0, 10.0, "strength of the expert - anti-expert shift"),
    }
    roles = {
        "base": RoleSpec("the model being steered"),
        "expert": RoleSpec("models whose log-probs are added", max_members=None),
        "anti": RoleSpec("models whose log-probs are subtracted", 0, None),
    }

    def fuse(self, logprobs, mask, weights, params, roles=None):
        alpha = param_column(params, "alpha")  # [R, 1]
        fused = np.empty(mask.shape)  # [R, C]
        for assignment, rows in self.group_rows(roles, len(mask)):
            (b,) = assignment["base"]
            lp = logprobs[rows]  # [G, M, C]
            floored = np.maximum(lp, LOGPROB_FLOOR)
            shift = floored[:, list(assignment["expert"])].mean(axis=1)  # [G, C]
            if assignment["anti"]:
                shift = shift - floored[:, list(assignment["anti"])].mean(axis=1)
            fused[rows] = log_normalize(lp[:, b] + alpha[rows] * shift, mask[rows])
        return fused

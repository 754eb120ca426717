"""Fusion policies: members' candidate log-probs -> one fused distribution.

Contract: a policy is a pure function over ``[requests x members x candidates]``
arrays, vectorised over requests. It never samples (no randomness here) and knows
nothing about engines or tokens. Every policy has the same constructor
(``member_names``), declares its per-request parameters as ``ParamSpec``s and its
member roles as ``RoleSpec``s, states capability flags for the router, and is
registered by name in ``POLICIES``; third-party policies are loaded by entry point
(group ``fusion_serve.policies``) or as ``"module:Class"``. Validation errors are
``PolicyError`` (a ``ValueError`` naming the request field), which the API layer maps
to INVALID_ARGUMENT.

Files: ``base`` (the contract), ``pool`` (mean, product, max, entropy, vote),
``contrast`` (contrastive, proxy), ``gate``, ``packllm``, ``registry``.
"""

from .base import (
    ParamSpec,
    Policy,
    PolicyError,
    Roles,
    RoleSpec,
    log_normalize,
    normalize_weights,
    param_column,
)
from .contrast import LOGPROB_FLOOR, ContrastivePolicy, ProxyPolicy
from .gate import GatePolicy
from .packllm import PackLLMPolicy
from .pool import EntropyPolicy, MaxPolicy, MeanPolicy, ProductPolicy, VotePolicy, linear_pool
from .registry import (
    ENTRY_POINT_GROUP,
    POLICIES,
    describe_policies,
    describe_policy,
    resolve_policy,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "LOGPROB_FLOOR",
    "POLICIES",
    "ContrastivePolicy",
    "EntropyPolicy",
    "GatePolicy",
    "MaxPolicy",
    "MeanPolicy",
    "PackLLMPolicy",
    "ParamSpec",
    "Policy",
    "PolicyError",
    "ProductPolicy",
    "ProxyPolicy",
    "RoleSpec",
    "Roles",
    "VotePolicy",
    "describe_policies",
    "describe_policy",
    "linear_pool",
    "log_normalize",
    "normalize_weights",
    "param_column",
    "resolve_policy",
]

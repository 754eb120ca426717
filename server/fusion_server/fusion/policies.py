"""Fusion policies: members' candidate log-probs -> one fused distribution.

Contract: a policy is a pure function over ``[requests x members x candidates]``
arrays, vectorised over requests. It never samples (no randomness here) and knows
nothing about engines or tokens. Every policy has the same constructor
(``member_names``), declares its per-request parameters as ``ParamSpec``s and is
registered by name in ``POLICIES``; third-party policies are loaded as
``"module:Class"``. Validation errors are ``PolicyError`` (a ``ValueError`` naming the
request field), which the API layer maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

import importlib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


class PolicyError(ValueError):
    """Invalid policy name, parameter or weight; ``field`` names the request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ParamSpec:
    """One numeric per-request policy parameter."""

    default: float
    """Value used when the request does not set it."""
    min: float
    """Smallest allowed value (inclusive)."""
    max: float
    """Largest allowed value (inclusive)."""
    description: str
    """One line for docs and error messages."""


def log_normalize(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift each row so that logsumexp over ``mask`` is 0; -inf outside ``mask``.

    A row whose masked scores are all -inf (every candidate vetoed) becomes uniform
    over its mask rather than NaN, so the sampler always gets a distribution.
    """
    # x: [R, C], mask: [R, C]
    x = np.where(mask, x, -np.inf)
    top = x.max(axis=-1, keepdims=True)  # [R, 1]
    dead = ~np.isfinite(top)  # [R, 1] no finite candidate
    x = np.where(dead & mask, 0.0, x)
    top = np.where(dead, 0.0, top)
    with np.errstate(divide="ignore", invalid="ignore"):  # rows with an empty mask
        lse = top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))  # [R, 1]
        return np.where(mask, x - lse, -np.inf)


class Policy(ABC):
    """Base class of every fusion policy (built-in or third-party)."""

    name: ClassVar[str]
    """Registry name, as requested in ``fusion.policy``."""
    description: ClassVar[str]
    """One line for docs and ``ListPolicies``."""
    params: ClassVar[dict[str, ParamSpec]] = {}
    """Per-request parameters (``fusion.params``) and their ranges."""
    argmax_invariant: ClassVar[bool] = False
    """Fast-path flag: True if, whenever all members with weight > 0 report the same
    top-1 token, that token is the fused argmax. Greedy decoding may then skip
    alignment and fusion for that step."""

    def __init__(self, member_names: list[str]):
        self.member_names = list(member_names)

    @classmethod
    def validate_params(cls, params: Mapping[str, float]) -> dict[str, float]:
        """Check request params against ``cls.params``; return all of them, defaults filled."""
        out = {name: spec.default for name, spec in cls.params.items()}
        for name, value in params.items():
            field = f"fusion.params.{name}"
            spec = cls.params.get(name)
            if spec is None:
                known = ", ".join(sorted(cls.params)) or "none"
                raise PolicyError(
                    field, f"unknown parameter for policy {cls.name!r} (known: {known})"
                )
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise PolicyError(field, f"must be a number, got {value!r}") from None
            if not math.isfinite(value) or not spec.min <= value <= spec.max:
                raise PolicyError(field, f"must be in [{spec.min}, {spec.max}], got {value}")
            out[name] = value
        return out

    @abstractmethod
    def fuse(
        self,
        logprobs: np.ndarray,
        mask: np.ndarray,
        weights: np.ndarray,
        params: list[dict[str, float]],
    ) -> np.ndarray:
        """Fuse members' log-probs into one distribution per request.

        logprobs: [R, M, C] float64, mask: [R, C] bool, weights: [R, M] float64
        (>= 0, rows sum to 1), params: R validated dicts.
        Returns [R, C] log-probs, logsumexp over the mask == 0, -inf off the mask.
        """


class MeanPolicy(Policy):
    name = "mean"
    description = "Linear pool: log sum_i w_i p_i(c), renormalised over the candidates."
    argmax_invariant = True

    def fuse(self, logprobs, mask, weights, params):
        # logprobs: [R, M, C], weights: [R, M]
        with np.errstate(divide="ignore"):
            terms = np.log(weights)[:, :, None] + logprobs  # [R, M, C]; w=0 -> -inf
        top = terms.max(axis=1, keepdims=True)  # [R, 1, C]
        top = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            pooled = top[:, 0] + np.log(np.exp(terms - top).sum(axis=1))  # [R, C]
        return log_normalize(pooled, mask)


class ProductPolicy(Policy):
    name = "product"
    description = "Log-linear pool (product of experts): sum_i w_i log p_i(c), renormalised."
    argmax_invariant = True

    def fuse(self, logprobs, mask, weights, params):
        # logprobs: [R, M, C], weights: [R, M]; w=0 must not turn -inf into nan
        w = weights[:, :, None]  # [R, M, 1]
        terms = np.where(w > 0, w * np.where(w > 0, logprobs, 0.0), 0.0)  # [R, M, C]
        return log_normalize(terms.sum(axis=1), mask)


class MaxPolicy(Policy):
    name = "max"
    description = "log max_i p_i(c) over members with weight > 0, renormalised."
    argmax_invariant = True

    def fuse(self, logprobs, mask, weights, params):
        # logprobs: [R, M, C], weights: [R, M]
        live = np.where(weights[:, :, None] > 0, logprobs, -np.inf)  # [R, M, C]
        return log_normalize(live.max(axis=1), mask)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (MeanPolicy, ProductPolicy, MaxPolicy)}
"""Built-in policies by name."""


def resolve_policy(spec: str) -> type[Policy]:
    """A registered policy name, or ``"module:Class"`` naming a ``Policy`` subclass."""
    field = "fusion.policy"
    if spec in POLICIES:
        return POLICIES[spec]
    if ":" not in spec:
        available = ", ".join(sorted(POLICIES))
        raise PolicyError(
            field, f"unknown policy {spec!r} (available: {available}, or module:Class)"
        )
    module_name, _, class_name = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise PolicyError(field, f"cannot load {spec!r}: {exc}") from None
    if not (inspect.isclass(obj) and issubclass(obj, Policy)) or inspect.isabstract(obj):
        raise PolicyError(field, f"{spec!r} is not a concrete Policy subclass")
    return obj


def normalize_weights(
    member_names: list[str],
    configured: Mapping[str, float],
    overrides: Mapping[str, float],
) -> np.ndarray:
    """Per-member weights summing to 1: ``overrides`` replace ``configured`` by name,
    members named in neither get 1.0."""
    known = set(member_names)
    merged: dict[str, float] = {}
    for source in (configured, overrides):
        for name, value in source.items():
            field = f"fusion.weights.{name}"
            if name not in known:
                members = ", ".join(member_names)
                raise PolicyError(field, f"unknown member (members: {members})")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise PolicyError(field, f"must be a number, got {value!r}") from None
            if not math.isfinite(value) or value < 0:
                raise PolicyError(field, f"must be finite and >= 0, got {value}")
            merged[name] = value
    w = np.array([merged.get(name, 1.0) for name in member_names], dtype=np.float64)  # [M]
    if w.sum() <= 0:
        raise PolicyError("fusion.weights", "at least one member needs a weight > 0")
    return w / w.sum()

"""The policy contract: the ``Policy`` base class, its parameter and role specs, errors.

Contract: a policy is a pure function over ``[requests x members x candidates]``
arrays, vectorised over requests. It never samples (no randomness here) and knows
nothing about engines, tokens or scheduling: a gated policy only says whether its
primary is confident, a PackLLM-style policy only turns prompt NLLs into weights;
the router acts on the answers. Validation errors are ``PolicyError`` (a
``ValueError`` naming the request field), which the API layer maps to
INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

Roles = dict[str, tuple[int, ...]]
"""Role name -> member indices (in member order), as returned by ``validate_roles``."""


class PolicyError(ValueError):
    """Invalid policy name, parameter, role or weight; ``field`` names the request field."""

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


@dataclass(frozen=True)
class RoleSpec:
    """One role that members play in a policy (``fusion.roles``: member -> role)."""

    description: str
    """One line for docs and ``GetEnsemble``."""
    min_members: int = 1
    """Fewest members that must have this role."""
    max_members: int | None = 1
    """Most members that may have this role; None: no limit."""

    def count_text(self) -> str:
        """'exactly 1 member', 'at least 1 member', ... for error messages."""
        lo, hi = self.min_members, self.max_members
        if hi == lo:
            n = f"exactly {lo}"
        elif hi is None:
            n = f"at least {lo}"
        elif lo == 0:
            n = f"at most {hi}"
        else:
            n = f"{lo} to {hi}"
        return f"{n} member{'' if (hi if hi is not None else lo) == 1 else 's'}"


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


def param_column(params: Sequence[Mapping[str, float]], name: str) -> np.ndarray:
    """One parameter of every row as a column: [R, 1] float64."""
    return np.array([p[name] for p in params], dtype=np.float64)[:, None]


class Policy(ABC):
    """Base class of every fusion policy (built-in or third-party).

    Subclasses set ``name`` and ``description``, declare ``params`` and ``roles``,
    set the capability flags that apply and implement ``fuse``. Every policy has the
    same constructor; one instance serves every request that selects it.
    """

    name: ClassVar[str]
    """Registry name, as requested in ``fusion.policy``."""
    description: ClassVar[str] = ""
    """One line for docs and ``GetEnsemble`` (default: the docstring's first line)."""
    params: ClassVar[dict[str, ParamSpec]] = {}
    """Per-request parameters (``fusion.params``) and their ranges."""
    roles: ClassVar[dict[str, RoleSpec]] = {}
    """Roles members play (``fusion.roles``); empty: every member is alike, weighted."""

    # -- capability flags: what the router may (or must) do around ``fuse`` --------
    argmax_invariant: ClassVar[bool] = False
    """Fast-path flag: True if, whenever all members with weight > 0 report the same
    top-1 token, that token is the fused argmax. Greedy decoding may then skip
    alignment and fusion for that step."""
    gated: ClassVar[bool] = False
    """True if the policy has a ``primary`` role and a ``confident`` method: the
    router asks the primary first and consults the others only when it is not
    confident (they then catch up in one chunk)."""
    needs_prompt_nll: ClassVar[bool] = False
    """True if the policy has a ``prompt_weights`` method: the router measures every
    member's mean NLL of the prompt once per request and replaces the request's
    weights with ``prompt_weights(nll, weights, params)``."""

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

    @classmethod
    def validate_roles(cls, member_names: Sequence[str], roles: Mapping[str, str]) -> Roles:
        """Check ``roles`` (member name -> role name) against ``cls.roles``.

        Returns role name -> member indices in member order, one entry per declared
        role (possibly empty). A policy without roles ignores the mapping and returns
        {}, so one config can carry the roles of several policies.
        """
        if not cls.roles:
            return {}
        index = {name: i for i, name in enumerate(member_names)}
        assigned: dict[str, list[int]] = {role: [] for role in cls.roles}
        for member, role in roles.items():
            field = f"fusion.roles.{member}"
            if member not in index:
                raise PolicyError(field, f"unknown member (members: {', '.join(member_names)})")
            if role not in cls.roles:
                known = ", ".join(cls.roles)
                raise PolicyError(
                    field, f"unknown role {role!r} for policy {cls.name!r} (roles: {known})"
                )
            assigned[role].append(index[member])
        for role, spec in cls.roles.items():
            got = len(assigned[role])
            if got < spec.min_members or (spec.max_members is not None and got > spec.max_members):
                raise PolicyError(
                    "fusion.roles",
                    f"policy {cls.name!r} needs {spec.count_text()} with role {role!r} (got {got})",
                )
        return {role: tuple(sorted(members)) for role, members in assigned.items()}

    @abstractmethod
    def fuse(
        self,
        logprobs: np.ndarray,
        mask: np.ndarray,
        weights: np.ndarray,
        params: list[dict[str, float]],
        roles: list[Roles] | None = None,
    ) -> np.ndarray:
        """Fuse members' log-probs into one distribution per request.

        logprobs: [R, M, C] float64 (a member without an opinion on a candidate
        already carries the no-opinion fill, see ``fusion.candidates``), mask: [R, C]
        bool, weights: [R, M] float64 (>= 0, rows sum to 1), params: R validated
        dicts, roles: R ``validate_roles`` results, or None for a policy without
        roles. Returns [R, C] log-probs, logsumexp over the mask == 0, -inf off it.
        """

    def group_rows(self, roles: list[Roles] | None, n_rows: int) -> list[tuple[Roles, np.ndarray]]:
        """Rows grouped by identical role assignment: [(roles, row indices)]."""
        if roles is None or len(roles) != n_rows:
            raise ValueError(f"policy {self.name!r} needs one role assignment per request")
        groups: dict[tuple, tuple[Roles, list[int]]] = {}
        for r, assignment in enumerate(roles):
            key = tuple(sorted((k, tuple(v)) for k, v in assignment.items()))
            groups.setdefault(key, (assignment, []))[1].append(r)
        return [(assignment, np.asarray(rows)) for assignment, rows in groups.values()]


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

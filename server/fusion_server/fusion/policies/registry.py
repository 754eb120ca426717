"""The built-in policies by name, third-party lookup, and their descriptions.

A policy is named in ``fusion.policy`` by its registry name, by an installed entry
point in the ``fusion_serve.policies`` group (name -> ``module:Class``), or directly
as ``"module:Class"``. Built-in names win over entry points of the same name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from typing import Any

from .base import Policy, PolicyError
from .contrast import ContrastivePolicy, ProxyPolicy
from .gate import GatePolicy
from .packllm import PackLLMPolicy
from .pool import EntropyPolicy, MaxPolicy, MeanPolicy, ProductPolicy, VotePolicy

ENTRY_POINT_GROUP = "fusion_serve.policies"
"""Entry-point group in which installed packages register third-party policies."""

POLICIES: dict[str, type[Policy]] = {
    p.name: p
    for p in (
        MeanPolicy,
        ProductPolicy,
        MaxPolicy,
        EntropyPolicy,
        VotePolicy,
        ContrastivePolicy,
        ProxyPolicy,
        GatePolicy,
        PackLLMPolicy,
    )
}
"""Built-in policies by name."""

_FIELD = "fusion.policy"


def _concrete(obj: Any, spec: str) -> type[Policy]:
    if not (inspect.isclass(obj) and issubclass(obj, Policy)) or inspect.isabstract(obj):
        raise PolicyError(_FIELD, f"{spec!r} is not a concrete Policy subclass")
    return obj


def resolve_policy(spec: str) -> type[Policy]:
    """A built-in name, an entry point's name, or ``"module:Class"`` -> a Policy subclass."""
    if spec in POLICIES:
        return POLICIES[spec]
    if ":" in spec:
        module_name, _, class_name = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), class_name)
        except Exception as exc:  # a plugin's import may fail in any way
            raise PolicyError(_FIELD, f"cannot load {spec!r}: {exc}") from None
        return _concrete(obj, spec)
    plugins = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if spec not in plugins:
        available = ", ".join(sorted(POLICIES) + sorted(set(plugins) - set(POLICIES)))
        raise PolicyError(
            _FIELD, f"unknown policy {spec!r} (available: {available}, or module:Class)"
        )
    try:
        obj = plugins[spec].load()
    except Exception as exc:
        raise PolicyError(
            _FIELD, f"cannot load entry point {spec!r} ({plugins[spec].value}): {exc}"
        ) from None
    return _concrete(obj, f"{spec} ({plugins[spec].value})")


def describe_policy(cls: type[Policy]) -> dict[str, Any]:
    """Name, description, params and roles of one policy, as plain data."""
    doc = inspect.cleandoc(cls.__doc__ or "").split("\n", 1)[0]
    return {
        "name": cls.name,
        "description": cls.description or doc,
        "params": [
            {
                "name": name,
                "default": spec.default,
                "min": spec.min,
                "max": spec.max,
                "description": spec.description,
            }
            for name, spec in cls.params.items()
        ],
        "roles": [
            {
                "name": name,
                "description": spec.description,
                "min": spec.min_members,
                "max": spec.max_members,
            }
            for name, spec in cls.roles.items()
        ],
    }


def describe_policies() -> list[dict[str, Any]]:
    """``describe_policy`` of every built-in policy, in registry order (for GetEnsemble).

    Role "max" is None when a role takes any number of members.
    """
    return [describe_policy(cls) for cls in POLICIES.values()]

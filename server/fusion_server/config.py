"""Ensemble configuration: one YAML file, one typed dataclass per concern.

Every error is a ConfigError whose message starts with the field's path
(`members[1].weight: ...`). No file means the built-in demo ensemble.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; `field` is its dotted path."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field = field_path


# vLLM engine settings applied to every member unless the member overrides them.
# CPU: size the KV cache explicitly (a CPU engine left unset claims a large share of
# RAM and the next engine refuses to start); float32 keeps greedy decoding identical
# to a float32 `transformers` reference; eager mode skips torch.compile, which costs
# 10-25 s per engine start (minutes on a loaded 2-core machine) and gains little on
# small models. Set `enforce_eager: false` per member to compile.
CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,
    "kv_cache_memory_bytes": 512 * 1024**2,
    "max_model_len": 2048,
    "dtype": "float32",
    "max_num_seqs": 128,
}


@dataclass
class MemberConfig:
    """One source model of the ensemble."""

    name: str
    """Unique member name (used in requests' fusion.weights)."""
    model: str | None = None
    """Hugging Face model directory (or id, where a hub is reachable), or `demo:NAME`:
    the member runs as an engine of this server. Exactly one of model / endpoint."""
    weight: float = 1.0
    """Default fusion weight (>= 0)."""
    engine: dict[str, Any] = field(default_factory=dict)
    """vLLM AsyncEngineArgs for this member, plus `cpu_threads` (VLLM_CPU_OMP_THREADS_BIND)."""
    endpoint: str | None = None
    """`host:port` (or `unix:PATH`) of a `fusion worker` serving this member, instead of
    model: the engine runs in that worker's process (on this machine or another pod)."""

    def check(self, path: str) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"{path}.name", "must be a non-empty string")
        if (self.model is None) == (self.endpoint is None):
            raise ConfigError(
                f"{path}.model",
                "set exactly one of model (an engine in this server) or endpoint (a worker)",
            )
        if self.endpoint is not None:
            _check_endpoint(self.endpoint, f"{path}.endpoint")
            if self.engine:
                raise ConfigError(
                    f"{path}.engine",
                    "engine settings of a remote member belong to its worker "
                    "(fusion worker --engine KEY=VALUE)",
                )
        elif not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"{path}.model", "must be a model directory or id")
        if not _is_number(self.weight) or self.weight < 0:
            raise ConfigError(f"{path}.weight", f"must be a number >= 0, got {self.weight!r}")
        if not isinstance(self.engine, dict):
            raise ConfigError(f"{path}.engine", "must be a mapping of vLLM engine settings")
        known = _engine_arg_names() if self.engine else set()  # importing vLLM takes seconds
        for key in self.engine:
            if known and key not in known and key != "cpu_threads":
                raise ConfigError(f"{path}.engine.{key}", "unknown vLLM engine setting")
        if self.engine.get("model") is not None:
            raise ConfigError(f"{path}.engine.model", "set the model with members[].model")


FUSION_EOS = ("fused", "any", "primary")
FUSION_ALIGNMENTS = ("auto", "bytes")


@dataclass
class FusionConfig:
    """How members' distributions are combined by default."""

    policy: str = "mean"
    """Default policy name (or module:Class)."""
    top_k: int = 20
    """Top candidates each member reports per step (1..128)."""
    params: dict[str, float] = field(default_factory=dict)
    """Default policy parameters."""
    roles: dict[str, str] = field(default_factory=dict)
    """Default member roles (member name -> role, e.g. expert / amateur / base / primary)."""
    on_member_failure: str = "fail"
    """When a member's engine dies mid-request: "fail" ends the request with
    UNAVAILABLE; "degrade" lets it continue on the remaining members (weight 0 for the
    lost one) unless the lost member holds a policy role or was the last one."""
    eos: str = "fused"
    """When a request ends on EOS: "fused" (EOS is a candidate; it wins), "any" (a member
    with weight > 0 picks its EOS as top-1) or "primary" (the primary / first member does)."""
    alignment: str = "auto"
    """"auto": shared ids when every member's byte table is identical, else byte
    alignment; "bytes": byte alignment always (benchmarks, debugging)."""

    def check(self, path: str) -> None:
        for name, allowed in (("eos", FUSION_EOS), ("alignment", FUSION_ALIGNMENTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{path}.{name}",
                    f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}",
                )
        if not isinstance(self.policy, str) or not self.policy:
            raise ConfigError(f"{path}.policy", "must be a policy name")
        if self.on_member_failure not in ("fail", "degrade"):
            raise ConfigError(
                f"{path}.on_member_failure",
                f'must be "fail" or "degrade", got {self.on_member_failure!r}',
            )
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 128:
            raise ConfigError(
                f"{path}.top_k", f"must be an integer in [1, 128], got {self.top_k!r}"
            )
        if not isinstance(self.params, dict):
            raise ConfigError(f"{path}.params", "must be a mapping of name -> number")
        if not isinstance(self.roles, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.roles.items()
        ):
            raise ConfigError(f"{path}.roles", "must be a mapping of member name -> role name")


@dataclass
class LimitsConfig:
    """Request limits."""

    max_tokens: int = 1024
    """Largest max_tokens a request may ask for."""
    default_max_tokens: int = 64
    """max_tokens when a request leaves it at 0."""
    max_prompt_chars: int = 100_000
    """Longest prompt accepted, in characters."""
    max_concurrent_requests: int = 256
    """Requests generating at once; more wait in the queue."""
    max_queued_requests: int = 256
    """Requests waiting (FIFO) for a running slot; beyond it RESOURCE_EXHAUSTED at once.
    0 disables the queue."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message received or sent (bytes)."""

    def check(self, path: str) -> None:
        for name in (
            "max_tokens",
            "default_max_tokens",
            "max_prompt_chars",
            "max_concurrent_requests",
            "max_message_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{path}.{name}", f"must be an integer >= 1, got {value!r}")
        value = self.max_queued_requests
        if not isinstance(value, int) or value < 0:
            raise ConfigError(
                f"{path}.max_queued_requests", f"must be an integer >= 0, got {value!r}"
            )
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"{path}.default_max_tokens", "must be <= limits.max_tokens")


@dataclass
class TLSConfig:
    """TLS for the gRPC port; `client_ca_file` set means mutual TLS (client certs required)."""

    cert_file: str | None = None
    """PEM server certificate (chain)."""
    key_file: str | None = None
    """PEM private key of cert_file."""
    client_ca_file: str | None = None
    """PEM CA bundle that client certificates must chain to (set: mutual TLS)."""

    def check(self, path: str) -> None:
        for name in ("cert_file", "key_file"):
            if not getattr(self, name):
                raise ConfigError(f"{path}.{name}", "is required when TLS is configured")
        for name in ("cert_file", "key_file", "client_ca_file"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not pathlib.Path(value).is_file():
                raise ConfigError(f"{path}.{name}", f"no such file: {value!r}")


@dataclass
class AuthConfig:
    """Bearer-token auth: every RPC but health and reflection needs a configured token."""

    tokens_file: str | None = None
    """File with one token per line (blank lines and # comments ignored)."""
    tokens_env: str | None = None
    """Environment variable holding comma-separated tokens."""

    def check(self, path: str) -> None:
        if not self.tokens_file and not self.tokens_env:
            raise ConfigError(path, "set tokens_file and/or tokens_env")
        if self.tokens_file is not None and (
            not isinstance(self.tokens_file, str) or not pathlib.Path(self.tokens_file).is_file()
        ):
            raise ConfigError(f"{path}.tokens_file", f"no such file: {self.tokens_file!r}")
        if self.tokens_env is not None and (
            not isinstance(self.tokens_env, str) or not self.tokens_env
        ):
            raise ConfigError(f"{path}.tokens_env", "must be an environment variable name")

    def load_tokens(self, path: str = "server.auth") -> list[str]:
        """The configured tokens (read now); none at all is a ConfigError."""
        tokens: list[str] = []
        if self.tokens_file:
            try:
                lines = pathlib.Path(self.tokens_file).read_text().splitlines()
            except OSError as err:
                raise ConfigError(f"{path}.tokens_file", f"cannot read: {err}") from None
            tokens += [t for t in (line.strip() for line in lines) if t and not t.startswith("#")]
        if self.tokens_env:
            raw = os.environ.get(self.tokens_env, "")
            tokens += [t for t in (part.strip() for part in raw.split(",")) if t]
        if not tokens:
            where = " and ".join(
                x
                for x in (
                    self.tokens_file and f"file {self.tokens_file}",
                    self.tokens_env and f"${self.tokens_env}",
                )
                if x
            )
            raise ConfigError(path, f"auth is configured but no tokens were found in {where}")
        return tokens


@dataclass
class ServerConfig:
    """Network settings."""

    host: str = "0.0.0.0"
    """Address to bind."""
    port: int = 50051
    """gRPC port (0 picks a free one)."""
    metrics_port: int = 9400
    """Prometheus /metrics HTTP port (0 picks a free one; -1 disables)."""
    grace_seconds: float = 10.0
    """How long in-flight requests may finish after SIGTERM."""
    tls: TLSConfig | None = None
    """TLS / mutual TLS for the gRPC port (None: plaintext)."""
    auth: AuthConfig | None = None
    """Bearer-token auth (None: no auth)."""
    restart_members: bool = True
    """Restart a member whose engine died (health is NOT_SERVING meanwhile)."""
    log_prompts: bool = False
    """Log each request's prompt at DEBUG level (off: prompts and outputs are never logged)."""
    member_workers: bool = False
    """Run each local member (`model:`) in its own `fusion worker` process on this
    machine, reached over a Unix socket: the server's process then only routes and fuses."""

    def check(self, path: str) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"{path}.port", f"must be in [0, 65535], got {self.port!r}")
        if not isinstance(self.metrics_port, int) or not -1 <= self.metrics_port <= 65535:
            raise ConfigError(
                f"{path}.metrics_port", f"must be in [-1, 65535], got {self.metrics_port!r}"
            )
        if not _is_number(self.grace_seconds) or self.grace_seconds < 0:
            raise ConfigError(f"{path}.grace_seconds", "must be a number >= 0")
        for name in ("restart_members", "log_prompts"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{path}.{name}", "must be true or false")
        if not isinstance(self.member_workers, bool):
            raise ConfigError(f"{path}.member_workers", "must be true or false")
        for name, klass in (("tls", TLSConfig), ("auth", AuthConfig)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, klass):
                raise ConfigError(f"{path}.{name}", "must be a mapping")
            if value is not None:
                value.check(f"{path}.{name}")


@dataclass
class EnsembleConfig:
    """The whole server configuration."""

    members: list[MemberConfig]
    """At least one member; names unique."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Default fusion settings."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """Network settings."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Request limits."""

    def __post_init__(self) -> None:
        if not self.members:
            raise ConfigError("members", "at least one member is required")
        seen: set[str] = set()
        for i, member in enumerate(self.members):
            member.check(f"members[{i}]")
            if member.name in seen:
                raise ConfigError(f"members[{i}].name", f"duplicate member name {member.name!r}")
            seen.add(member.name)
        if sum(m.weight for m in self.members) <= 0:
            raise ConfigError("members[].weight", "at least one member needs a weight > 0")
        self.fusion.check("fusion")
        for name in self.fusion.roles:
            if name not in seen:
                raise ConfigError(f"fusion.roles.{name}", "no member has this name")
        self.server.check("server")
        self.limits.check("limits")

    @classmethod
    def from_dict(cls, data: Any) -> EnsembleConfig:
        if not isinstance(data, dict):
            raise ConfigError("(root)", "the config must be a mapping")
        _reject_unknown(data, cls, "")
        raw_members = data.get("members")
        if not isinstance(raw_members, list):
            raise ConfigError("members", "must be a list of members")
        members = []
        for i, raw in enumerate(raw_members):
            if not isinstance(raw, dict):
                raise ConfigError(f"members[{i}]", "must be a mapping")
            _reject_unknown(raw, MemberConfig, f"members[{i}].")
            if "name" not in raw:
                raise ConfigError(f"members[{i}].name", "is required")
            members.append(MemberConfig(**raw))
        sections = {}
        for key, klass in (
            ("fusion", FusionConfig),
            ("server", ServerConfig),
            ("limits", LimitsConfig),
        ):
            raw = data.get(key) or {}
            if not isinstance(raw, dict):
                raise ConfigError(key, "must be a mapping")
            _reject_unknown(raw, klass, f"{key}.")
            if key == "server":
                raw = _server_subsections(raw)
            sections[key] = klass(**raw)
        return cls(members=members, **sections)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> EnsembleConfig:
        import yaml

        path = pathlib.Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError("--config", f"{path} is not valid YAML: {err}") from None
        config = cls.from_dict(data)
        for member in config.members:  # relative model paths are relative to the file
            if member.model is None:
                continue
            model = pathlib.Path(member.model)
            if not model.is_absolute() and (path.parent / model).exists():
                member.model = str((path.parent / model).resolve())
        _resolve_demo_members(config)
        return config

    def with_engine_defaults(self, defaults: dict[str, Any]) -> EnsembleConfig:
        """A copy where each member's engine settings start from `defaults`."""
        members = [
            m if m.endpoint else dataclasses.replace(m, engine={**defaults, **m.engine})
            for m in self.members
        ]
        return dataclasses.replace(self, members=members)


DEMO_DEFAULT_MEMBERS = ("alpha", "beta")
"""Trained demo members served without a config file (they share one tokenizer; gamma,
with its own, joins once cross-vocabulary fusion lands: docs/demo-three-members.yaml)."""


def demo_config() -> EnsembleConfig:
    """The built-in demo ensemble: the trained members (trained once, on first use)."""
    from .demo import ensure_trained_models

    paths = ensure_trained_models(DEMO_DEFAULT_MEMBERS)
    return EnsembleConfig(
        members=[MemberConfig(name=name, model=str(path)) for name, path in paths.items()],
    )


DEMO_MODEL_PREFIX = "demo:"
TRAINED_PREFIX = "trained-"


def _resolve_demo_members(config: EnsembleConfig) -> None:
    """`model: demo:NAME` names a built-in demo member, made once into $FUSION_CACHE:
    demo:alpha / demo:beta the tiny random ones (seconds), demo:trained-alpha /
    -beta / -gamma the trained ones (minutes each, once)."""
    wanted = [
        (i, m)
        for i, m in enumerate(config.members)
        if m.model and m.model.startswith(DEMO_MODEL_PREFIX)
    ]
    if not wanted:
        return
    from . import demo, demo_train

    tiny = [spec.name for spec in demo.DEMO_MEMBERS]
    trained = [TRAINED_PREFIX + spec.name for spec in demo_train.TRAINED_MEMBERS]
    names = [(i, m, m.model[len(DEMO_MODEL_PREFIX) :]) for i, m in wanted]
    for i, member, name in names:
        if name not in tiny + trained:
            raise ConfigError(
                f"members[{i}].model",
                f"unknown demo member {member.model!r} (known: {', '.join(tiny + trained)})",
            )
    paths = demo.ensure_demo_models() if any(n in tiny for *_, n in names) else {}
    want = tuple(n[len(TRAINED_PREFIX) :] for *_, n in names if n in trained)
    if want:
        paths.update({TRAINED_PREFIX + k: v for k, v in demo.ensure_trained_models(want).items()})
    for _, member, name in names:
        member.model = str(paths[name])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_endpoint(endpoint: Any, path: str) -> None:
    """`host:port` with a port in 1..65535 (IPv6 as `[::1]:port`), or `unix:PATH`."""
    if isinstance(endpoint, str) and endpoint.startswith("unix:") and len(endpoint) > 5:
        return
    host, _, port = endpoint.rpartition(":") if isinstance(endpoint, str) else ("", "", "")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(path, f"must be host:port or unix:PATH, got {endpoint!r}")


def _reject_unknown(raw: dict, klass: type, prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(klass)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{prefix}{key}", f"unknown field (known: {', '.join(sorted(known))})"
            )


def _server_subsections(raw: dict) -> dict:
    """`server.tls` and `server.auth` mappings -> TLSConfig / AuthConfig."""
    raw = dict(raw)
    for name, klass in (("tls", TLSConfig), ("auth", AuthConfig)):
        sub = raw.get(name)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"server.{name}", "must be a mapping")
        _reject_unknown(sub, klass, f"server.{name}.")
        raw[name] = klass(**sub)
    return raw


def _engine_arg_names() -> set[str]:
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:  # unit tests without vLLM: accept any name
        return set()
    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}

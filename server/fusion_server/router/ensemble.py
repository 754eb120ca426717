"""The ensemble: started members plus what the router needs of their tokenizers.

Contract: members must share one vocabulary (identical id -> bytes tables) for now;
an ensemble whose tokenizers differ is refused with a ConfigError naming the member.
A member is a local engine (`model:`), a `fusion worker` (`endpoint:`; its tokenizer
comes from the worker's Info), or, with server.member_workers, a worker this server
launches for a `model:` member; the router cannot tell them apart.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError, EnsembleConfig
from ..engines.member import Member
from ..engines.remote import RemoteMember
from ..vocab import byte_table, fingerprint, special_ids, tokenizer_kind

log = logging.getLogger(__name__)


@dataclass
class Ensemble:
    """Started members sharing one tokenizer."""

    config: EnsembleConfig
    members: list[Member]
    tokenizer: object
    table: list[bytes]
    """Shared id -> bytes table."""
    eos_ids: frozenset[int]
    vocab_size: int
    fingerprint: str
    kind: str
    weights: np.ndarray = field(init=False)
    """Configured weights, [M]."""

    def __post_init__(self) -> None:
        self.weights = np.array([m.config.weight for m in self.members], dtype=np.float64)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def max_model_len(self) -> int:
        return min(m.max_model_len for m in self.members)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @classmethod
    def check_tokenizers(cls, config: EnsembleConfig, sources: list[str | None] | None = None):
        """Load each member's tokenizer; refuse differing vocabularies. Returns the first
        (tokenizer, table, fingerprint).

        sources: where each member's tokenizer is (default: members[i].model); None
        skips a member (a remote one whose tokenizer files have not been fetched yet).
        """
        if sources is None:
            sources = [m.model for m in config.members]
        first = None
        first_name = ""
        for i, (member, source) in enumerate(zip(config.members, sources, strict=True)):
            if source is None:
                continue
            where = f"members[{i}].{'model' if member.model else 'endpoint'}"
            try:
                loaded = load_tokenizer(source)
            except Exception as err:
                raise ConfigError(
                    where, f"cannot load a tokenizer from {source!r}: {err}"
                ) from None
            if first is None:
                first, first_name = loaded, member.name
            elif loaded[2] != first[2]:
                raise ConfigError(
                    where,
                    f"member {member.name!r} has a different tokenizer than {first_name!r}; "
                    "members with different vocabularies are not supported yet (shared-vocabulary fusion only)",
                )
        return first

    @classmethod
    async def start(cls, config: EnsembleConfig) -> Ensemble:
        local = [None if m.endpoint else m.model for m in config.members]
        loaded = cls.check_tokenizers(config, local) if any(local) else None  # fail fast
        members = []
        try:
            for member_config in config.members:  # one after another (GPU memory fractions)
                member = _make_member(member_config, config)
                log.info(
                    "starting member %s (%s)", member.name, member.config.model or member.endpoint
                )
                members.append(member)
                await member.start()
            if any(m.endpoint for m in config.members):  # now with the workers' tokenizers
                loaded = cls.check_tokenizers(
                    config, [getattr(m, "tokenizer_dir", None) or m.config.model for m in members]
                )
        except BaseException:
            for member in members:
                member.shutdown()
            raise
        tokenizer, table, print_ = loaded
        vocab = max(m.vocab_size for m in members)
        if len(table) < vocab:
            table = table + [b""] * (vocab - len(table))
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        return cls(
            config=config,
            members=members,
            tokenizer=tokenizer,
            table=table,
            eos_ids=frozenset(eos),
            vocab_size=vocab,
            fingerprint=print_,
            kind=tokenizer_kind(tokenizer),
        )

    def shutdown(self) -> None:
        for member in self.members:
            member.shutdown()


def load_tokenizer(source: str):
    """(tokenizer, id -> bytes table, fingerprint) of the tokenizer in `source`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    table = byte_table(tokenizer)
    return tokenizer, table, fingerprint(table, special_ids(tokenizer))


def _make_member(member_config, config: EnsembleConfig) -> Member | RemoteMember:
    """A local engine, a configured worker, or (server.member_workers) a launched worker."""
    top_k = config.fusion.top_k
    if member_config.endpoint:
        return RemoteMember(member_config, top_k)
    if not config.server.member_workers:
        return Member(member_config, top_k)
    from ..engines.worker import spawn_worker

    address = f"unix:{tempfile.mkdtemp(prefix='fusion-worker-')}/{member_config.name}.sock"
    return RemoteMember(
        member_config, top_k, address, spawn=lambda: spawn_worker(member_config, top_k, address)
    )

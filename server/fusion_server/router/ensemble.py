"""The ensemble: started members plus what the router needs of their tokenizers.

Contract: members must share one vocabulary (identical id -> bytes tables) for now;
an ensemble whose tokenizers differ is refused with a ConfigError naming the member.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError, EnsembleConfig
from ..engines.member import Member
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

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of a text that follows other text (no BOS / special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @classmethod
    def check_tokenizers(cls, config: EnsembleConfig):
        """Load each member's tokenizer; refuse differing vocabularies. Returns the first."""
        from transformers import AutoTokenizer

        first = None
        first_print = ""
        for i, member in enumerate(config.members):
            try:
                tok = AutoTokenizer.from_pretrained(member.model)
            except Exception as err:
                raise ConfigError(
                    f"members[{i}].model", f"cannot load a tokenizer from {member.model!r}: {err}"
                ) from None
            table = byte_table(tok)
            print_ = fingerprint(table, special_ids(tok))
            if first is None:
                first, first_print = (tok, table), print_
            elif print_ != first_print:
                raise ConfigError(
                    f"members[{i}].model",
                    f"member {member.name!r} has a different tokenizer than {config.members[0].name!r}; "
                    "members with different vocabularies are not supported yet (shared-vocabulary fusion only)",
                )
        return first[0], first[1], first_print

    @classmethod
    async def start(cls, config: EnsembleConfig) -> Ensemble:
        tokenizer, table, print_ = cls.check_tokenizers(config)
        members = []
        try:
            for member_config in config.members:  # one after another (GPU memory fractions)
                member = Member(member_config, top_k=config.fusion.top_k)
                log.info("starting member %s (%s)", member.name, member.config.model)
                await member.start()
                members.append(member)
        except BaseException:
            for member in members:
                member.shutdown()
            raise
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

"""The ensemble: started members plus what the router needs of their tokenizers.

Contract: every member's tokenizer is loaded once and turned into a ``MemberVocab``
(byte table, special and EOS ids, kind, fingerprint). When all fingerprints are equal
the ensemble fuses on shared ids (``alignment == "shared-ids"``); otherwise, or when
``fusion.alignment: bytes`` forces it, on byte strings (``"bytes"``). Each member's
prompt is encoded by its own tokenizer (with its own BOS / dummy prefix, as the
member alone would see it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError, EnsembleConfig
from ..engines.member import Member
from ..vocab import MemberVocab, load_member_vocab

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
    vocabs: list[MemberVocab] | None = None
    """Per member: its own tokenizer's vocabulary (None: every member shares ``table``)."""
    weights: np.ndarray = field(init=False)
    """Configured weights, [M]."""
    member_eos: list[frozenset[int]] = field(init=False)
    """Per member: its EOS ids (in its own vocabulary)."""

    def __post_init__(self) -> None:
        self.weights = np.array([m.config.weight for m in self.members], dtype=np.float64)
        if self.vocabs is None:
            self.member_eos = [self.eos_ids] * len(self.members)
        else:
            self.member_eos = [v.eos_ids for v in self.vocabs]

    @property
    def alignment(self) -> str:
        """ "shared-ids" (identical byte tables) or "bytes" (they differ, or forced)."""
        forced = getattr(self.config.fusion, "alignment", "auto") == "bytes"
        shared = self.vocabs is None or len({v.fingerprint for v in self.vocabs}) == 1
        return "shared-ids" if shared and not forced else "bytes"

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

    def encode_members(self, text: str) -> list[list[int]]:
        """Each member's prompt ids, by its own tokenizer."""
        if self.alignment == "shared-ids":
            return [self.encode(text)] * len(self.members)
        return [list(v.tokenizer(text, add_special_tokens=True)["input_ids"]) for v in self.vocabs]

    @classmethod
    def load_vocabs(cls, config: EnsembleConfig) -> list[MemberVocab]:
        """Load each member's tokenizer and vocabulary (ConfigError naming the member)."""
        from transformers import AutoTokenizer

        vocabs = []
        for i, member in enumerate(config.members):
            try:
                tok = AutoTokenizer.from_pretrained(member.model)
            except Exception as err:
                raise ConfigError(
                    f"members[{i}].model", f"cannot load a tokenizer from {member.model!r}: {err}"
                ) from None
            vocabs.append(load_member_vocab(tok, member.model))
        return vocabs

    @classmethod
    async def start(cls, config: EnsembleConfig) -> Ensemble:
        vocabs = cls.load_vocabs(config)
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
        for member, vocab in zip(members, vocabs, strict=True):
            vocab.pad_to(member.vocab_size)
        vocab = max(m.vocab_size for m in members)
        first = vocabs[0]
        table = first.table + [b""] * (vocab - len(first.table))
        ensemble = cls(
            config=config,
            members=members,
            tokenizer=first.tokenizer,
            table=table,
            eos_ids=first.eos_ids,
            vocab_size=vocab,
            fingerprint=first.fingerprint,
            kind=first.kind,
            vocabs=vocabs,
        )
        log.info(
            "alignment: %s (%s)",
            ensemble.alignment,
            ", ".join(
                f"{m.name}: {v.kind} {v.fingerprint[:12]}"
                for m, v in zip(members, vocabs, strict=True)
            ),
        )
        return ensemble

    def shutdown(self) -> None:
        for member in self.members:
            member.shutdown()

"""The ensemble: started members plus what the router needs of their tokenizers.

Contract: every member's tokenizer is loaded once and turned into a ``MemberVocab``
(byte table, special and EOS ids, kind, fingerprint). When all fingerprints are equal
the ensemble fuses on shared ids (``alignment == "shared-ids"``); otherwise, or when
``fusion.alignment: bytes`` forces it, on byte strings (``"bytes"``). Each member's
prompt is encoded by its own tokenizer (with its own BOS / dummy prefix, as the
member alone would see it).

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
    def load_vocabs(
        cls, config: EnsembleConfig, sources: list[str | None] | None = None
    ) -> list[MemberVocab | None]:
        """Load each member's tokenizer and vocabulary (ConfigError naming the member).

        sources: where each member's tokenizer is (default: members[i].model); None
        skips a member (a remote one whose tokenizer files have not been fetched yet).
        """
        if sources is None:
            sources = [m.model for m in config.members]
        vocabs: list[MemberVocab | None] = []
        for i, (member, source) in enumerate(zip(config.members, sources, strict=True)):
            if source is None:
                vocabs.append(None)
                continue
            where = f"members[{i}].{'model' if member.model else 'endpoint'}"
            try:
                vocabs.append(load_vocab(source))
            except Exception as err:
                raise ConfigError(
                    where, f"cannot load a tokenizer from {source!r}: {err}"
                ) from None
        return vocabs

    @classmethod
    async def start(cls, config: EnsembleConfig) -> Ensemble:
        local = [None if m.endpoint else m.model for m in config.members]
        vocabs = cls.load_vocabs(config, local)  # fail fast on the local ones
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
                vocabs = cls.load_vocabs(
                    config, [getattr(m, "tokenizer_dir", None) or m.config.model for m in members]
                )
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


def load_vocab(source: str) -> MemberVocab:
    """The MemberVocab of the tokenizer (and generation_config EOS ids) in `source`."""
    from transformers import AutoTokenizer

    return load_member_vocab(AutoTokenizer.from_pretrained(source), source)


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

"""How the router aligns a step and applies its choice: shared ids or byte alignment.

Contract: an alignment strategy owns everything in the decode loop that depends on
whether the members share a vocabulary: each member's prompt ids, turning ready
requests' top-k into one candidate batch (``align``), and turning the chosen
candidate into output bytes, an EOS decision and each member's next input ids
(``pick``), plus labels for token details. The router's loop, policies, sampling and
stop strings are the same for both.

- ``SharedIds`` (identical byte tables): candidates are token ids; every member is
  fed the chosen id.
- ``ByteAlignment`` (tables differ, or ``fusion.alignment: bytes``): candidates are
  byte strings (``fusion.bytealign``); each member proposing the chosen bytes is fed
  its own token, every other member its own encoding of those bytes (``feeder``).
  ``completion_tokens`` counts fused steps; ``Delta.prompt_tokens`` is member 0's
  prompt length; a request also ends with ``length`` when a member's context would
  overflow.

EOS (``fusion.eos``): ``fused`` (default): EOS is a candidate like any other (every
member's EOS token is the one EOS candidate under byte alignment) and the request
ends when it is chosen — a single model's rule. ``any``: EOS is no candidate; the
request ends when the top-1 of any consulted member with weight > 0 is its EOS.
``primary``: the same with member 0 (or the ``primary`` role) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import FUSION_EOS
from ..feeder import ContinuationEncoder, Feeder
from ..fusion.bytealign import EOS_KEY, ByteCandidateBatch, ByteKeys, align_bytes
from ..fusion.candidates import CandidateBatch, align_shared
from .request import FusionRequest


@dataclass
class Pick:
    """What the chosen candidate means for one request."""

    data: bytes
    """Bytes to append to the output (b"" for EOS and special tokens)."""
    eos: bool
    """The request ends here with finish reason eos (unless ignore_eos)."""
    token_id: int
    """The token reported in details (byte alignment: the highest-weight proposer's id)."""
    agree: list[bool]
    """Per member: its top-1 was the chosen candidate."""
    feed: list[list[int]]
    """Per member: ids to append to its context."""
    overflow: bool = False
    """A member's context cannot take ``feed``: end with finish reason length."""


class SharedIds:
    """Members share one vocabulary: candidates are token ids."""

    name = "shared-ids"

    def __init__(self, ensemble, eos_mode: str = "fused"):
        if eos_mode not in FUSION_EOS:
            raise ValueError(f"fusion.eos must be one of {', '.join(FUSION_EOS)}")
        self.ensemble = ensemble
        self.eos_mode = eos_mode
        self.member_eos = ensemble.member_eos  # per member: its EOS ids

    def prompts(self, request: FusionRequest) -> list[list[int]]:
        """Each member's prompt ids; sets up per-request state."""
        return [list(request.prompt_ids) for _ in self.ensemble.members]

    def align(self, ready: list[FusionRequest]) -> CandidateBatch:
        batch = align_shared([r.tops for r in ready], self.ensemble.vocab_size)
        if self.eos_mode != "fused":
            eos = np.isin(batch.ids, list(self.ensemble.eos_ids))
            batch.mask &= ~eos
            batch.logprobs[np.broadcast_to(eos[:, None, :], batch.logprobs.shape)] = -np.inf
        return batch

    def pick(self, request: FusionRequest, batch, i: int, c: int) -> Pick:
        token = int(batch.ids[i, c])
        n = len(request.tops)
        return Pick(
            data=self.ensemble.table[token],
            eos=self._member_eos(request)
            if self.eos_mode != "fused"
            else token in self.ensemble.eos_ids,
            token_id=token,
            agree=[bool(len(t.ids)) and int(t.ids[0]) == token for t in request.tops],
            feed=[[token] for _ in range(n)],
        )

    def label(self, request: FusionRequest, batch, i: int, j: int) -> tuple[int, str]:
        token = int(batch.ids[i, j])
        return token, self.ensemble.table[token].decode("utf-8", "replace")

    def _member_eos(self, request: FusionRequest) -> bool:
        """fusion.eos any / primary: a deciding member's top-1 is its EOS."""
        if self.eos_mode == "primary":
            primary = request.roles.get("primary") or (0,)
            deciders = [primary[0]]
        else:
            deciders = [
                m
                for m in range(len(request.tops))
                if request.weights[m] > 0 and request.consulted[m]
            ]
        return any(
            len(request.tops[m].ids) and int(request.tops[m].ids[0]) in self.member_eos[m]
            for m in deciders
        )


@dataclass
class _ByteState:
    feeders: list[Feeder]
    tokens: list[int]  # per member: ids in its context (sent or pending)


class ByteAlignment(SharedIds):
    """Members' vocabularies differ: candidates are byte strings."""

    name = "bytes"

    def __init__(self, ensemble, eos_mode: str = "fused"):
        super().__init__(ensemble, eos_mode)
        vocabs = ensemble.vocabs
        self.keys = ByteKeys(
            [v.table for v in vocabs],
            [v.specials for v in vocabs],
            self.member_eos,
            [v.special_names for v in vocabs],
        )
        self.encoders = [
            v.encoder or ContinuationEncoder(m.name, v.tokenizer, v.table, v.specials)
            for m, v in zip(ensemble.members, vocabs, strict=True)
        ]
        self.max_len = [m.max_model_len for m in ensemble.members]

    def prompts(self, request: FusionRequest) -> list[list[int]]:
        prompts = request.member_prompt_ids
        request.align_state = _ByteState(
            [Feeder(e) for e in self.encoders], [len(p) for p in prompts]
        )
        return [list(p) for p in prompts]

    def align(self, ready: list[FusionRequest]) -> ByteCandidateBatch:
        held = [[f.held for f in r.align_state.feeders] for r in ready]
        sources = None
        if not all(all(r.consulted) for r in ready):
            sources = [_sources(r) for r in ready]
        return align_bytes(
            self.keys, [r.tops for r in ready], held, sources, drop_eos=self.eos_mode != "fused"
        )

    def pick(self, request: FusionRequest, batch: ByteCandidateBatch, i: int, c: int) -> Pick:
        key = int(batch.ids[i, c])
        data = self.keys.spelled[key]
        state: _ByteState = request.align_state
        proposers = batch.token_ids[i, :, c]  # [M]
        feed = []
        for m, feeder in enumerate(state.feeders):
            tok = int(proposers[m])
            feed.append(
                feeder.take(tok) if tok >= 0 and request.consulted[m] else feeder.push(data)
            )
        overflow = False
        for m, ids in enumerate(feed):
            state.tokens[m] += len(ids)
            overflow |= state.tokens[m] >= self.max_len[m]
        eos = self._member_eos(request) if self.eos_mode != "fused" else key == EOS_KEY
        return Pick(
            data=data,
            eos=eos,
            token_id=self._proposer_id(request, proposers),
            agree=[bool(x) for x in batch.top1[i] == c],
            feed=feed,
            overflow=overflow,
        )

    def label(self, request: FusionRequest, batch, i: int, j: int) -> tuple[int, str]:
        text = self.keys.spelled[int(batch.ids[i, j])].decode("utf-8", "replace")
        return self._proposer_id(request, batch.token_ids[i, :, j]), text

    @staticmethod
    def _proposer_id(request: FusionRequest, proposers: np.ndarray) -> int:
        """The token id of the highest-weight member spelling the candidate (-1: none)."""
        order = np.argsort(-request.weights, kind="stable")
        for m in order:
            if proposers[m] >= 0:
                return int(proposers[m])
        return -1


def _sources(request: FusionRequest) -> list[int]:
    """Per member: itself, or the primary whose top-k stands for it (a gated skip)."""
    primary = (request.roles.get("primary") or (0,))[0]
    return [m if consulted else primary for m, consulted in enumerate(request.consulted)]


def make_alignment(ensemble, name: str | None = None):
    """The strategy for ``ensemble`` (``name`` forces one: "shared-ids" or "bytes")."""
    name = name or ensemble.alignment
    klass = {"shared-ids": SharedIds, "bytes": ByteAlignment}[name]
    return klass(ensemble, ensemble.config.fusion.eos)

"""Teacher signal for a student whose vocabulary is not every member's.

Contract: the student's packed rows are the text; the teacher gives, at every student
position t (after the student's tokens row[:t+1], predicting row[t+1]), a fused top-k
over the *student's* ids, in the same format as the shared-vocabulary teacher
(teacher.py: kept ids carry 1 - tail mass). Three steps per row:

1. **Feeding (as Generate feeds members).** Each member is teacher-forced on the row
   as the router would have fed it had the student's tokens been the fused choices: a
   member with the student's vocabulary gets the row's ids as they are; any other
   member gets, token by token, its own continuation encoding of each student token's
   bytes (``feeder.Feeder``: an incomplete UTF-8 tail is held back until the character
   completes). A student special token (BOS/EOS between packed documents) becomes the
   member's special of the same name, else of the same role (BOS, EOS; a member with
   no BOS gets its EOS for the student's BOS, the GPT-2 document separator), else
   nothing; held bytes are dropped there. Every student position is then a point where every
   member has a next-token distribution (one prefill per member and row, ``Member.score``).
2. **Projection.** Member m's reported token u (probability p) stands for the text
   ``bytes(u)`` minus what m holds back (tokens that do not start with the held bytes,
   or spell no more than them, are dropped, as ``fusion.bytealign`` does). It is
   mapped to the student token the student would write first for that text: the
   token itself when m shares the student's vocabulary; else the student token spelling
   exactly those bytes when the student's own continuation encoding of them is one
   token or such a token exists; else the first token of that encoding. EOS maps to
   the student's EOS; another special maps by name or is dropped. Several member
   tokens mapping to one student id add up (probabilities). A member token shorter
   than the student's natural token lands on the shorter student token: the teacher
   says nothing about the longer one then (a granularity limit of any single-step
   cross-tokenizer alignment; FuseLLM and ULD approximate it too).
3. **Fusion.** The projected top-k lists are fused exactly like shared-vocabulary ones
   (``teacher.fuse_tops``: no-opinion fill, tail mass, gate on the primary's own
   top-k, packllm weights from each member's mean NLL of its own fed row).

Members with weight 0 in the config (and no role) are not run at all. A position is
left without teacher (ids 0, log-probs -inf; the loss skips it) only where a member
has no distribution: no context yet (the row starts with an incomplete character for
a member without BOS) or the member's last fed ids are the end of the row.

Invariant (tested): with all the weight on a member that shares the student's
vocabulary, the teacher equals the shared-vocabulary teacher of that member alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..feeder import ContinuationEncoder, Feeder
from ..fusion.candidates import MemberTopK
from ..vocab import MemberVocab
from .data import DistillError
from .teacher import TeacherChoice, fuse_tops

_EMPTY = MemberTopK(ids=np.zeros(0, dtype=np.int64), logprobs=np.zeros(0))


def encoder_of(name: str, vocab: MemberVocab) -> ContinuationEncoder:
    """The vocabulary's continuation encoder (DistillError when it cannot have one)."""
    if vocab.encoder is not None:
        return vocab.encoder
    try:
        return ContinuationEncoder(name, vocab.tokenizer, vocab.table, set(vocab.specials))
    except ValueError as err:
        raise DistillError(f"{name}: no alignment possible: {err}") from None


def check_spells_bytes(name: str, vocab: MemberVocab) -> None:
    """Refuse a vocabulary that cannot write every byte (no byte-level alphabet or fallback)."""
    singles = {t[0] for i, t in enumerate(vocab.table) if len(t) == 1 and i not in vocab.specials}
    missing = 256 - len(singles)
    if missing:
        raise DistillError(
            f"{name}: no alignment possible: its vocabulary cannot spell {missing} of the 256 "
            "byte values (no byte-level alphabet or byte fallback), so text the members "
            "write cannot be mapped onto it exactly"
        )


@dataclass
class FedRow:
    """One member's ids for a row and, per student position, where its distribution is."""

    ids: list[int]
    index: np.ndarray
    """[L-1] output index (Member.score) of the distribution after row[:t+1]; -1: none."""
    held: list[bytes]
    """[L-1] bytes the member holds back at that position."""


class CrossVocabTeacher:
    """Feeds, projects and fuses for one student vocabulary (module docstring)."""

    def __init__(
        self,
        names: list[str],
        vocabs: list[MemberVocab],
        student: MemberVocab,
        choice: TeacherChoice,
    ):
        self.names = names
        self.vocabs = vocabs
        self.student = student
        self.choice = choice
        self.same = [v.fingerprint == student.fingerprint for v in vocabs]
        roles = {m for ms in choice.roles.values() for m in ms}
        self.active = [bool(choice.weights[m] > 0 or m in roles) for m in range(len(vocabs))]
        check_spells_bytes("--student", student)
        self.student_encoder = encoder_of("--student", student)
        self.encoders = [
            None if same else encoder_of(f"member {n!r}", v)
            for n, v, same in zip(names, vocabs, self.same, strict=True)
        ]
        self.exact: dict[bytes, int] = {}
        for i, spelled in enumerate(student.table):
            if spelled and i not in student.specials:
                self.exact.setdefault(spelled, i)
        self.student_eos = min(student.eos_ids) if student.eos_ids else -1
        self.student_by_name = {n: i for i, n in student.special_names.items()}
        self._cache: list[dict[tuple[int, bytes], int]] = [{} for _ in vocabs]

    # -- feeding ---------------------------------------------------------------------

    def _special(self, m: int, token: int) -> int | None:
        """Member m's counterpart of the student's special token (None: none)."""
        vocab = self.vocabs[m]
        name = self.student.special_names.get(token)
        by_name = {n: i for i, n in vocab.special_names.items()}
        if name in by_name:
            return by_name[name]
        tok = vocab.tokenizer
        if token in self.student.eos_ids and vocab.eos_ids:
            return min(vocab.eos_ids)
        if token == getattr(self.student.tokenizer, "bos_token_id", None):
            bos = getattr(tok, "bos_token_id", None)
            if bos is None and vocab.eos_ids:  # GPT-2 style: EOS separates documents
                return min(vocab.eos_ids)
            return bos
        return None

    def feed(self, m: int, row: list[int]) -> FedRow:
        n_pos = len(row) - 1
        if self.same[m]:
            return FedRow(list(row), np.arange(n_pos), [b""] * n_pos)
        feeder = Feeder(self.encoders[m])
        ids: list[int] = []
        index = np.full(n_pos, -1, dtype=np.int64)
        held: list[bytes] = []
        for t, token in enumerate(row):
            if token in self.student.specials or not self.student.table[token]:
                feeder.held = b""
                mapped = self._special(m, token)
                if mapped is not None:
                    ids.append(mapped)
            else:
                ids += feeder.push(self.student.table[token])
            if t < n_pos:
                index[t] = len(ids) - 1
                held.append(feeder.held)
        return FedRow(ids, index, held)

    # -- projection ------------------------------------------------------------------

    def project(self, m: int, token: int, held: bytes) -> int:
        """The student id member m's token stands for (-1: none; module docstring)."""
        key = (token, held)
        cache = self._cache[m]
        if key in cache:
            return cache[key]
        vocab = self.vocabs[m]
        out = -1
        if self.same[m] and not held:
            out = token
        elif token in vocab.eos_ids:
            out = self.student_eos
        elif token in vocab.specials or token >= len(vocab.table) or not vocab.table[token]:
            out = self.student_by_name.get(vocab.special_names.get(token, ""), -1)
        else:
            spelled = vocab.table[token]
            if spelled.startswith(held) and len(spelled) > len(held):
                data = spelled[len(held) :]
                ids = self.student_encoder.encode(data)
                if len(ids) == 1:
                    out = ids[0]
                elif data in self.exact:
                    out = self.exact[data]
                elif ids:
                    out = ids[0]
        cache[key] = out
        return out

    def projected(self, m: int, top_ids: np.ndarray, top_lps: np.ndarray, held: bytes):
        """A member's top-k as a MemberTopK over student ids (probabilities summed)."""
        mass: dict[int, float] = {}
        for u, lp in zip(top_ids.tolist(), top_lps.tolist(), strict=True):
            if not np.isfinite(lp):
                continue
            s = self.project(m, int(u), held)
            if s >= 0:
                mass[s] = mass.get(s, 0.0) + float(np.exp(lp))
        if not mass:
            return _EMPTY
        order = sorted(mass, key=lambda s: -mass[s])
        return MemberTopK(
            ids=np.asarray(order, dtype=np.int64),
            logprobs=np.log(np.asarray([mass[s] for s in order])),
        )

    # -- one row ---------------------------------------------------------------------

    def fuse_row(
        self, row: list[int], fed: list[FedRow | None], outs: list, top_k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Teacher ids [L-1, top_k] and log-probs for one row.

        fed[m] / outs[m]: member m's FedRow and its Member.score output (actual,
        top_ids, top_logprobs), None for inactive members.
        """
        n_pos = len(row) - 1
        n_mem = len(self.vocabs)
        ok = np.ones(n_pos, dtype=bool)
        for f, out in zip(fed, outs, strict=True):
            if f is not None:
                ok &= (f.index >= 0) & (f.index < len(out[0]))
        where = np.flatnonzero(ok)
        ids = np.zeros((n_pos, top_k), dtype=np.int64)
        lps = np.full((n_pos, top_k), -np.inf)
        if not where.size:
            return ids, lps
        tops = [[_EMPTY] * n_mem for _ in where]
        for m, (f, out) in enumerate(zip(fed, outs, strict=True)):
            if f is None:
                continue
            for r, t in enumerate(where):
                j = f.index[t]
                tops[r][m] = self.projected(m, out[1][j], out[2][j], f.held[t])
        choice = self.choice
        weights = choice.weights
        if choice.policy.needs_prompt_nll:
            nll = np.array([-o[0].mean() if o is not None and len(o[0]) else 0.0 for o in outs])
            weights = choice.policy.prompt_weights(nll, weights, choice.params)
        confident = None
        if choice.policy.gated:
            (primary,) = choice.roles["primary"]
            f, out = fed[primary], outs[primary]
            confident = choice.policy.confident(
                out[2][f.index[where]], [choice.params] * len(where)
            )
        got_ids, got_lps = fuse_tops(
            choice, weights, tops, confident, len(self.student.table), top_k
        )
        ids[where], lps[where] = got_ids, got_lps
        return ids, lps

    def row_teacher(self, rows: list[list[int]], members: list, top_k: int, max_len: list[int]):
        """An async row teacher for ``fill_cache`` (members: the started engines)."""
        import asyncio

        async def one(r: int):
            row = rows[r]
            fed: list[FedRow | None] = []
            for m, active in enumerate(self.active):
                f = self.feed(m, row) if active else None
                if f is not None and len(f.ids) > max_len[m]:
                    raise DistillError(
                        f"row {r} is {len(f.ids)} tokens for member {self.names[m]!r}, more than "
                        f"its max_model_len {max_len[m]}; use a smaller --seq-len"
                    )
                fed.append(f)

            async def score(m: int):
                f = fed[m]
                if f is None or len(f.ids) < 2:
                    return (np.zeros(0), np.zeros((0, top_k), np.int64), np.zeros((0, top_k)))
                return await members[m].score(f"distill-{r}", f.ids, top_k)

            outs = await asyncio.gather(*(score(m) for m in range(len(members))))
            outs = [o if f is not None else None for o, f in zip(outs, fed, strict=True)]
            return self.fuse_row(row, fed, outs, top_k)

        return one

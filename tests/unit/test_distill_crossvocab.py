"""Cross-vocabulary teacher (distill/crossvocab.py) on real tokenizers of three kinds and
fake members: feeding covers every student position with exactly the student's text,
projection rules, the fusion formula, the same-vocabulary invariant, refusals."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest
from test_vocab import _byte_level, _corpus

from fusion_server.config import EnsembleConfig, FusionConfig, MemberConfig
from fusion_server.distill.crossvocab import CrossVocabTeacher
from fusion_server.distill.data import DistillError
from fusion_server.distill.run import teacher_choice
from fusion_server.distill.teacher import fused_topk
from fusion_server.tinyvocab import train_sentencepiece_bpe, train_unigram
from fusion_server.vocab import load_member_vocab

TEXT = "the quick brown fox naïve café 日本語 🙂 over\nthe lazy dog"
K = 6


@pytest.fixture(scope="module")
def vocabs():
    corpus = "\n".join(_corpus())
    spm = train_sentencepiece_bpe(None, 400, corpus)
    return {
        "spm": load_member_vocab(spm),
        "spm2": load_member_vocab(train_sentencepiece_bpe(None, 400, corpus)),  # same vocab
        "uni": load_member_vocab(train_unigram(None, 200, corpus)),
        "bpe": load_member_vocab(_byte_level()),
    }


class FakeMember:
    """Member.score over a deterministic distribution of the context (hash-seeded)."""

    def __init__(self, name: str, vocab_size: int):
        self.name, self.vocab_size = name, vocab_size
        self.calls: list[list[int]] = []

    def dist(self, context: list[int]) -> np.ndarray:
        seed = int(hashlib.sha256(f"{self.name}{context}".encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).dirichlet(np.full(self.vocab_size, 0.05))

    async def score(self, request_id: str, ids: list[int], top_k: int):
        self.calls.append(list(ids))
        actual, top_ids, top_lps = [], [], []
        for p in range(1, len(ids)):
            d = self.dist(ids[:p])
            order = np.argsort(-d, kind="stable")[:top_k]
            actual.append(np.log(d[ids[p]]))
            top_ids.append(order)
            top_lps.append(np.log(d[order]))
        return np.array(actual), np.array(top_ids), np.array(top_lps)


def _setup(vocabs, names, weights, student="spm", policy="mean", roles=None, params=None):
    config = EnsembleConfig(
        members=[
            MemberConfig(name=n, model="/x", weight=w) for n, w in zip(names, weights, strict=True)
        ],
        fusion=FusionConfig(policy=policy, roles=roles or {}, params=params or {}),
    )
    choice = teacher_choice(config)
    teacher = CrossVocabTeacher(names, [vocabs[n] for n in names], vocabs[student], choice)
    members = [FakeMember(n, len(vocabs[n].table)) for n in names]
    return choice, teacher, members


def _row(vocabs, text=TEXT, student="spm"):
    return list(vocabs[student].tokenizer(text, add_special_tokens=True)["input_ids"])


def _spell(vocab, ids) -> bytes:
    return b"".join(vocab.table[i] for i in ids)


@pytest.mark.parametrize("member", ["uni", "bpe"])
def test_feeding_gives_every_member_exactly_the_students_text_at_every_position(vocabs, member):
    _, teacher, _ = _setup(vocabs, ["spm", member], [0.5, 0.5])
    student = vocabs["spm"]
    row = _row(vocabs)
    fed = teacher.feed(1, row)
    # (the student's own text: a SentencePiece dummy prefix is part of it)
    assert _spell(vocabs[member], fed.ids) == _spell(student, row)
    assert (fed.index >= 0).all()
    for t in range(len(row) - 1):
        before = _spell(vocabs[member], fed.ids[: fed.index[t] + 1]) + fed.held[t]
        assert before == _spell(student, row[: t + 1]), t
    # a character split across student tokens is held back, never sent in halves
    assert any(fed.held)


def test_projection_rules(vocabs):
    _, teacher, _ = _setup(vocabs, ["spm", "bpe"], [0.5, 0.5])
    student, bpe = vocabs["spm"], vocabs["bpe"]
    exact = {t: i for i, t in enumerate(student.table) if t and i not in student.specials}
    checked = 0
    for u, spelled in enumerate(bpe.table):
        if u in bpe.specials or not spelled:
            continue
        s = teacher.project(1, u, b"")
        if spelled in exact:  # the same text is one student token: that token
            assert student.table[s] == spelled
        else:  # the student's first token of that text
            assert spelled.startswith(student.table[s]) and len(student.table[s]) < len(spelled)
        checked += 1
    assert checked > 100
    the = bpe.tokenizer.convert_tokens_to_ids("Ġthe")
    rest = student.table[teacher.project(1, the, b" ")]  # " the" past a held " "
    assert rest and b"the".startswith(rest)
    assert teacher.project(1, the, b"x") == -1  # does not continue the held bytes
    eos = min(bpe.eos_ids)
    assert teacher.project(1, eos, b"") == min(student.eos_ids)
    assert teacher.project(0, 57, b"") == 57  # same vocabulary: the id itself


def test_all_weight_on_the_students_vocabulary_is_that_members_own_teacher(vocabs):
    names = ["spm2", "uni", "bpe"]
    choice, teacher, members = _setup(vocabs, names, [1.0, 0.0, 0.0])
    row = _row(vocabs)
    ids, lps = asyncio.run(teacher.row_teacher([row], members, K, [10_000] * 3)(0))
    assert not members[1].calls and not members[2].calls  # weight 0: not run at all
    alone = teacher_choice(EnsembleConfig(members=[MemberConfig(name="spm2", model="/x")]))
    out = asyncio.run(members[0].score("x", row, K))
    ref_ids, ref_lps = fused_topk(
        alone, out[0][None], out[1][None], out[2][None], len(vocabs["spm"].table), K
    )
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(lps, ref_lps)


def test_mean_is_the_pool_of_projected_member_distributions(vocabs):
    names = ["spm", "bpe"]
    choice, teacher, members = _setup(vocabs, names, [0.25, 0.75])
    row = _row(vocabs)
    ids, lps = asyncio.run(teacher.row_teacher([row], members, K, [10_000] * 2)(0))
    assert np.isfinite(lps[:, 0]).all()  # a teacher at every position
    probs = np.exp(lps)
    assert (probs.sum(axis=1) <= 1 + 1e-9).all()
    fed = [teacher.feed(m, row) for m in range(2)]
    V = len(vocabs["spm"].table)
    for t in (0, 5, len(row) - 2):
        projected = []
        for m in range(2):
            context = fed[m].ids[: fed[m].index[t] + 1]
            d = members[m].dist(context)
            top = np.argsort(-d, kind="stable")[:K]
            mass: dict[int, float] = {}
            for u in top:
                s = teacher.project(m, int(u), fed[m].held[t])
                if s >= 0:
                    mass[s] = mass.get(s, 0.0) + d[u]
            projected.append(mass)
        for j, s in enumerate(ids[t]):
            if not np.isfinite(lps[t, j]):
                continue
            expected = 0.0
            for m, w in enumerate([0.25, 0.75]):
                mass = projected[m]
                fill = min(min(mass.values()), (1 - sum(mass.values())) / (V - len(mass)))
                expected += w * mass.get(int(s), fill)
            assert probs[t, j] == pytest.approx(expected, rel=1e-6), (t, j)


def test_alignment_is_refused_for_a_student_that_cannot_spell_every_byte(vocabs):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        ["some other words entirely"] * 5,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]),
    )
    vocabs = {**vocabs, "words": load_member_vocab(PreTrainedTokenizerFast(tokenizer_object=raw))}
    with pytest.raises(DistillError, match="no alignment possible.*256 byte values"):
        _setup(vocabs, ["spm", "bpe"], [0.5, 0.5], student="words")


@pytest.mark.parametrize(
    "policy, roles, params",
    [
        ("product", {}, {}),
        ("packllm", {}, {}),
        ("gate", {"bpe": "primary"}, {"tau": 0.3}),
        ("gate", {"bpe": "primary"}, {"tau": 0.0}),
    ],
)
def test_other_policies_teach_at_every_position_within_one(vocabs, policy, roles, params):
    names = ["spm", "uni", "bpe"]
    _, teacher, members = _setup(vocabs, names, [1.0] * 3, "spm", policy, roles, params)
    row = _row(vocabs)
    ids, lps = asyncio.run(teacher.row_teacher([row], members, K, [10_000] * 3)(0))
    assert np.isfinite(lps[:, 0]).all()
    assert (np.exp(lps).sum(axis=1) <= 1 + 1e-9).all()
    assert ids.max() < len(vocabs["spm"].table)
    if params.get("tau") == 0.0:  # the primary (another vocabulary) always decides alone
        fed = teacher.feed(2, row)
        for t in range(len(row) - 1):
            d = members[2].dist(fed.ids[: fed.index[t] + 1])
            top = teacher.project(2, int(np.argsort(-d, kind="stable")[0]), fed.held[t])
            assert top < 0 or top in ids[t].tolist()

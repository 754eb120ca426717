"""Byte-string candidate alignment (fusion.bytealign) on hand-made vocabularies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion_server.fusion.bytealign import CAP_MARGIN, EOS_KEY, ByteKeys, align_bytes
from fusion_server.fusion.candidates import MemberTopK

# member 0: ids 0..3 = specials/text; member 1: a different vocabulary
TABLE_A = [b"", b"", b"the", b" the", b"th", b"A", b"A", b"\xe4\xb8\x96", b"x"]
# 0: EOS, 1: BOS, 5 and 6 both spell "A" (a char piece and a byte-fallback piece)
TABLE_B = [b"", b" t", b" th", b" then", b" they", b"the", b"\xe4", b"\xe4\xb8", b"\x96!", b""]
# 0: EOS, 9: PAD (special)
SPECIALS = [{0, 1}, {0, 9}]
EOS = [{0}, {0}]


@pytest.fixture
def keys() -> ByteKeys:
    return ByteKeys([TABLE_A, TABLE_B], SPECIALS, EOS)


def top(pairs) -> MemberTopK:
    ids = [i for i, _ in pairs]
    return MemberTopK(np.array(ids, np.int64), np.log(np.array([p for _, p in pairs])))


def spelled(keys, batch, r=0):
    return [keys.spelled[k] if k >= 0 else None for k in batch.ids[r]]


def col(keys, batch, data, r=0):
    return spelled(keys, batch, r).index(data)


def fill(probs, vocab):
    k = len(probs)
    cap = min(probs) * (1 - CAP_MARGIN)
    return min(cap, min(probs), max(1 - sum(probs), 1e-12) / (vocab - k))


def test_exact_matches_across_vocabularies(keys):
    a = top([(3, 0.5), (2, 0.2), (8, 0.1)])
    b = top([(2, 0.3), (5, 0.25), (1, 0.2)])
    batch = align_bytes(keys, [[a, b]], [[b"", b""]])
    assert spelled(keys, batch) == [b" the", b"the", b"x", b" th", b" t"]
    c = col(keys, batch, b"the")
    assert batch.in_topk[0, :, c].tolist() == [True, True]
    assert batch.token_ids[0, :, c].tolist() == [2, 5]
    assert math.isclose(math.exp(batch.logprobs[0, 1, c]), 0.25)
    assert batch.top1[0].tolist() == [0, col(keys, batch, b" th")]


def test_duplicate_spellings_count_the_likeliest_not_the_sum(keys):
    a = top([(8, 0.3), (5, 0.25), (6, 0.2)])  # "A" twice: 0.25 + 0.2 > 0.3
    batch = align_bytes(keys, [[a, top([(5, 0.9)])]], [[b"", b""]])
    c = col(keys, batch, b"A")
    assert math.isclose(math.exp(batch.logprobs[0, 0, c]), 0.25)
    assert batch.token_ids[0, 0, c] == 5
    assert np.argmax(batch.logprobs[0, 0]) == col(keys, batch, b"x")


def test_extension_bound(keys):
    # member 1 has no " the" token; " then" and " they" extend it, " t" does not
    a = top([(3, 0.6), (4, 0.1)])
    b = top([(3, 0.3), (4, 0.2), (1, 0.1)])
    batch = align_bytes(keys, [[a, b]], [[b"", b""]])
    c = col(keys, batch, b" the")
    assert not batch.in_topk[0, 1, c]
    p_min = 0.1 * (1 - CAP_MARGIN)
    f = fill([0.3, 0.2, 0.1], len(TABLE_B))
    assert math.isclose(math.exp(batch.logprobs[0, 1, c]), min(p_min, max(0.3 + 0.2, f)))
    # member 0 on " t": its " the" (0.6) extends it, capped just below its p^(k) = 0.1
    c = col(keys, batch, b" t")
    assert math.exp(batch.logprobs[0, 0, c]) == pytest.approx(0.1 * (1 - CAP_MARGIN), rel=1e-12)
    # member 1 on "th": nothing of member 1 extends "th" -> its fill
    c = col(keys, batch, b"th")
    assert math.isclose(math.exp(batch.logprobs[0, 1, c]), f)


def test_extension_below_fill_and_no_opinion_get_the_fill(keys):
    a = top([(8, 0.5), (2, 0.4), (4, 1e-9)])
    b = top([(6, 0.5), (3, 0.4)])
    batch = align_bytes(keys, [[a, b]], [[b"", b""]])
    f0 = fill([0.5, 0.4, 1e-9], len(TABLE_A))
    f1 = fill([0.5, 0.4], len(TABLE_B))
    # " the" (member 1 "then" extends nothing of member 0's): no opinion -> fill
    assert math.isclose(math.exp(batch.logprobs[0, 0, col(keys, batch, b" then")]), f0)
    assert math.isclose(math.exp(batch.logprobs[0, 1, col(keys, batch, b"x")]), f1)
    assert (batch.logprobs[0][:, batch.mask[0]] > -np.inf).all()


def test_held_bytes_shift_a_members_tokens(keys):
    # member 1 holds "\xe4" back: its "\xe4\xb8" stands for "\xb8", "\x96!" is no candidate
    a = top([(7, 0.5), (8, 0.3)])
    b = top([(7, 0.6), (8, 0.2), (6, 0.1), (2, 0.05)])
    batch = align_bytes(keys, [[a, b]], [[b"", b"\xe4"]])
    assert spelled(keys, batch) == ["世".encode(), b"x", b"\xb8"]
    c = col(keys, batch, b"\xb8")
    assert batch.token_ids[0, 1, c] == 7
    assert batch.top1[0, 1] == c
    # member 1's opinion of "世" past its held byte: "\xb8" ... extends nothing -> fill
    f1 = fill([0.6, 0.2, 0.1, 0.05], len(TABLE_B))
    assert math.isclose(math.exp(batch.logprobs[0, 1, 0]), f1)


def test_eos_is_one_candidate_and_other_specials_are_private(keys):
    a = top([(0, 0.5), (1, 0.3)])
    b = top([(0, 0.4), (9, 0.3)])
    batch = align_bytes(keys, [[a, b]], [[b"", b""]])
    assert batch.ids[0, 0] == EOS_KEY
    assert batch.in_topk[0, :, 0].tolist() == [True, True]
    assert batch.mask[0].sum() == 3  # EOS, member 0's BOS, member 1's PAD
    bos, pad = batch.ids[0, 1], batch.ids[0, 2]
    assert bos != pad and keys.spelled[bos] == keys.spelled[pad] == b""
    assert batch.token_ids[0, :, 1].tolist() == [1, -1]
    dropped = align_bytes(keys, [[a, b]], [[b"", b""]], drop_eos=True)
    assert EOS_KEY not in dropped.ids[0]


def test_copied_rows_stand_for_skipped_members(keys):
    a = top([(3, 0.6), (2, 0.3)])
    stale = top([(5, 0.9)])
    batch = align_bytes(keys, [[a, stale]], [[b"", b""]], sources=[[0, 0]])
    assert spelled(keys, batch) == [b" the", b"the"]
    assert (batch.logprobs[0, 1] == batch.logprobs[0, 0]).all()
    assert (batch.token_ids[0, 1] == -1).all()


def test_batch_equals_one_request_at_a_time(keys):
    rng = np.random.default_rng(0)
    rows, held = [], []
    for _ in range(12):
        row = []
        for table in (TABLE_A, TABLE_B):
            ids = rng.choice(len(table), size=rng.integers(1, 5), replace=False)
            probs = rng.dirichlet(np.ones(ids.size + 1))[:-1]
            row.append(MemberTopK(ids.astype(np.int64), np.log(probs)))
        rows.append(row)
        held.append([b"", [b"", b"\xe4"][int(rng.integers(2))]])
    batch = align_bytes(keys, rows, held)
    for r, (row, h) in enumerate(zip(rows, held, strict=True)):
        one = align_bytes(keys, [row], [h])
        n = one.ids.shape[1]
        assert spelled(keys, one) == spelled(keys, batch, r)[:n]
        assert not batch.mask[r, n:].any()
        np.testing.assert_allclose(batch.logprobs[r, :, :n], one.logprobs[0])
        assert (batch.token_ids[r, :, :n] == one.token_ids[0]).all()
        assert (batch.top1[r] == one.top1[0]).all()


def test_a_members_top1_is_its_best_candidate():
    """The invariant's core: member m's row peaks at its own top-1, on random vocabularies."""
    rng = np.random.default_rng(1)
    alphabet = [b"a", b"b", b" ", "é".encode(), b"\xe4", b"\xb8"]
    for trial in range(200):
        tables = []
        for _ in range(3):
            size = int(rng.integers(8, 30))
            pieces = {b"".join(rng.choice(alphabet, size=rng.integers(1, 4))) for _ in range(size)}
            tables.append([b"", *sorted(pieces)])
        keys = ByteKeys(tables, [{0}] * 3, [{0}] * 3)
        row = []
        for table in tables:
            k = int(rng.integers(1, len(table)))
            ids = rng.choice(len(table), size=k, replace=False)
            probs = np.sort(rng.dirichlet(np.ones(len(table)))[ids])[::-1]
            row.append(MemberTopK(ids.astype(np.int64), np.log(probs)))
        batch = align_bytes(keys, [row], [[b"", b"", b""]])
        for m in range(3):
            best = int(np.argmax(batch.logprobs[0, m]))
            assert batch.token_ids[0, m, best] == row[m].ids[0], trial


# every policy, fed a byte-aligned batch: the per-policy rule of docs/cross-vocabulary.md
ONE_MEMBER_SETTINGS = {
    # policy: (params, roles for member m) such that member m alone decides
    "mean": ({}, {}),
    "product": ({}, {}),
    "max": ({}, {}),
    "entropy": ({}, {}),
    "vote": ({}, {}),
    "packllm": ({}, {}),
    "gate": ({"tau": 2.0}, {"primary": "m"}),  # tau > 1: everyone consulted, pooled
    "contrastive": ({"beta": 0.0}, {"expert": "m", "amateur": "other"}),
    "proxy": ({"alpha": 0.0}, {"base": "m", "expert": "other", "anti": "third"}),
}


@pytest.mark.parametrize("name", sorted(ONE_MEMBER_SETTINGS))
def test_every_policy_on_byte_candidates_follows_a_lone_member(name):
    """All weight (or the deciding role) on member m: the fused argmax is m's top-1."""
    from fusion_server.fusion.policies import POLICIES

    rng = np.random.default_rng(7)
    tables = [
        [
            b"",
            *sorted({bytes(rng.choice(list(b"ab c"), size=rng.integers(1, 4))) for _ in range(20)}),
        ]
        for _ in range(3)
    ]
    keys = ByteKeys(tables, [{0}] * 3, [{0}] * 3)
    names = ["m0", "m1", "m2"]
    policy = POLICIES[name](names)
    params_, role_spec = ONE_MEMBER_SETTINGS[name]
    for trial in range(40):
        m = trial % 3
        row = []
        for table in tables:
            ids = rng.choice(len(table), size=min(5, len(table)), replace=False)
            probs = np.sort(rng.dirichlet(np.ones(len(table)) * 0.3)[ids])[::-1]
            row.append(MemberTopK(ids.astype(np.int64), np.log(np.maximum(probs, 1e-300))))
        batch = align_bytes(keys, [row], [[b"", b"", b""]])
        others = [j for j in range(3) if j != m]
        who = {"m": names[m], "other": names[others[0]], "third": names[others[1]]}
        roles = {who[k]: role for role, k in role_spec.items()}
        weights = np.eye(3)[m][None, :]
        params = [policy.validate_params(params_)]
        args = (batch.logprobs, batch.mask, weights, params)
        if policy.roles:
            args += ([policy.validate_roles(names, roles)],)
        fused = policy.fuse(*args)
        assert np.isclose(np.logaddexp.reduce(fused[0][batch.mask[0]]), 0.0)
        assert batch.token_ids[0, m, int(np.argmax(fused[0]))] == row[m].ids[0], (name, trial)


def test_specials_with_the_same_name_are_one_candidate():
    names = [{0: "</s>", 1: "<s>"}, {0: "</s>", 9: "<s>"}]
    keys = ByteKeys([TABLE_A, TABLE_B], SPECIALS, EOS, names)
    a = top([(1, 0.5), (8, 0.3)])
    b = top([(9, 0.4), (5, 0.3)])
    batch = align_bytes(keys, [[a, b]], [[b"", b""]])
    assert spelled(keys, batch) == [b"", b"x", b"the"]
    assert batch.token_ids[0, :, 0].tolist() == [1, 9]  # each member's own "<s>"


def test_shared_ids_are_the_special_case_without_extensions():
    """Identical tables where no token extends another: byte scores == shared-id scores."""
    from fusion_server.fusion.candidates import align_shared

    table = [b""] + [bytes([a, b]) for a in b"abcd" for b in b"wxyz"]  # no proper prefixes
    keys = ByteKeys([table, table], [{0}, {0}], [{0}, {0}])
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(10):
        row = []
        for _ in range(2):
            ids = rng.choice(len(table), size=5, replace=False)
            probs = np.sort(rng.dirichlet(np.ones(len(table)))[ids])[::-1]
            row.append(MemberTopK(ids.astype(np.int64), np.log(probs)))
        rows.append(row)
    shared = align_shared(rows, len(table))
    byte = align_bytes(keys, rows, [[b"", b""]] * len(rows))
    for r in range(len(rows)):
        ids = [i for i in shared.ids[r] if i >= 0]
        assert spelled(keys, byte, r)[: len(ids)] == [table[i] for i in ids]
        n = len(ids)
        np.testing.assert_allclose(
            byte.logprobs[r, :, :n], shared.logprobs[r, :, :n], rtol=0, atol=2e-6
        )
        assert (byte.in_topk[r, :, :n] == shared.in_topk[r, :, :n]).all()

"""align_shared(): union order, padding, and the no-opinion fill rule."""

import math

import numpy as np
import pytest

from fusion_server.fusion.candidates import MemberTopK, align_shared


def _top(ids, probs):
    return MemberTopK(np.array(ids, dtype=np.int64), np.log(np.array(probs, dtype=np.float64)))


def test_union_order_padding_and_fill():
    vocab = 100
    a = _top([5, 7, 9], [0.5, 0.2, 0.1])
    b = _top([7, 3], [0.6, 0.3])
    c = _top([1], [0.9])
    batch = align_shared([[a, b], [c, c]], vocab)

    assert batch.ids.tolist() == [[5, 7, 9, 3], [1, -1, -1, -1]]
    assert batch.mask.tolist() == [[True] * 4, [True, False, False, False]]
    assert batch.in_topk[0].tolist() == [[True, True, True, False], [False, True, False, True]]

    # member a: p_min = 0.1, residual = 0.2 over 97 unseen ids
    fill_a = min(0.1, 0.2 / 97)
    # member b: p_min = 0.3, residual = 0.1 over 98 unseen ids
    fill_b = min(0.3, 0.1 / 98)
    expected = [
        [math.log(0.5), math.log(0.2), math.log(0.1), math.log(fill_a)],
        [math.log(fill_b), math.log(0.6), math.log(fill_b), math.log(0.3)],
    ]
    assert np.allclose(batch.logprobs[0], expected)
    assert batch.logprobs.dtype == np.float64
    assert np.isneginf(batch.logprobs[1, :, 1:]).all()
    assert np.allclose(batch.logprobs[1, :, 0], math.log(0.9))


def test_fill_bounded_by_smallest_reported():
    # tiny vocabulary: residual / (V - k) would exceed the smallest reported prob
    a = _top([0, 1], [0.2, 0.05])  # residual 0.75 over 2 ids -> 0.375 > 0.05
    b = _top([2], [0.9])
    batch = align_shared([[a, b]], vocab_size=4)
    assert np.isclose(batch.logprobs[0, 0, 2], math.log(0.05))
    assert np.isclose(batch.logprobs[0, 1, 0], math.log(min(0.9, 0.1 / 3)))


def test_residual_floor_never_zero():
    a = _top([0, 1], [0.7, 0.3000001])  # reported mass >= 1
    b = _top([2], [1.0])
    batch = align_shared([[a, b]], vocab_size=10)
    assert np.isfinite(batch.logprobs[0][batch.mask[0][None].repeat(2, 0)]).all()
    assert np.isclose(batch.logprobs[0, 0, 2], math.log(1e-12 / 8))


def test_duplicate_ids_keep_first():
    a = MemberTopK(np.array([4, 4, 2]), np.log(np.array([0.5, 0.4, 0.1])))
    batch = align_shared([[a]], vocab_size=10)
    assert batch.ids.tolist() == [[4, 2]]
    assert np.allclose(batch.logprobs[0, 0], np.log([0.5, 0.1]))


def test_bad_input():
    with pytest.raises(ValueError, match="outside"):
        align_shared([[_top([10], [0.5])]], vocab_size=10)
    with pytest.raises(ValueError, match="one top-k per member"):
        align_shared([[_top([1], [0.5])], []], vocab_size=10)


def _naive(tops, vocab):
    """Reference implementation with plain Python loops."""
    rows = []
    for row in tops:
        cand = []
        for top in row:
            for i in top.ids.tolist():
                if i not in cand:
                    cand.append(i)
        table = []
        for top in row:
            reported = dict(zip(top.ids.tolist(), np.exp(top.logprobs).tolist(), strict=True))
            p_min, residual = min(reported.values()), max(1 - sum(reported.values()), 1e-12)
            fill = min(p_min, residual / (vocab - len(reported)))
            table.append([math.log(reported.get(c, fill)) for c in cand])
        rows.append((cand, table))
    return rows


def test_matches_naive_on_random_batch():
    rng = np.random.default_rng(0)
    vocab, n_req, n_mem, k = 50, 64, 3, 20
    tops = []
    for _ in range(n_req):
        row = []
        for _ in range(n_mem):
            ids = rng.choice(vocab, size=k, replace=False)
            probs = rng.dirichlet(np.ones(vocab))[:k]
            row.append(MemberTopK(ids, np.log(np.sort(probs)[::-1])))
        tops.append(row)
    batch = align_shared(tops, vocab)
    for r, (cand, table) in enumerate(_naive(tops, vocab)):
        n = len(cand)
        assert batch.ids[r, :n].tolist() == cand and (batch.ids[r, n:] == -1).all()
        assert np.allclose(batch.logprobs[r, :, :n], table)
        assert np.isneginf(batch.logprobs[r, :, n:]).all()


def test_member_with_empty_top_k_is_uniform():
    a = _top([3, 4], [0.6, 0.3])
    empty = MemberTopK(np.empty(0, np.int64), np.empty(0))
    batch = align_shared([[a, empty]], vocab_size=8)
    assert not batch.in_topk[0, 1].any()
    assert np.allclose(batch.logprobs[0, 1], math.log(1 / 8))

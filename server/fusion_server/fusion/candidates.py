"""Candidate alignment for members that share one vocabulary.

Contract: turns every member's top-k at one step into one ``CandidateBatch`` of
``[requests x members x candidates]`` arrays that the policies fuse. Pure numpy; it
knows nothing about engines, tokenizers or text.

Candidates of a request are the union of its members' top-k token ids, ordered by
first appearance (member 0's ids in its reported order, then the new ids of member
1, ...). Rows are padded to the widest request with id -1, ``mask`` False and log-prob
-inf.

No-opinion rule (API contract): when candidate ``c`` is not in member ``m``'s top-k,
member ``m`` is given

    p_m(c) = min(p_m^(k), r_m / (V - k))

where ``p_m^(k)`` is the smallest probability the member reported (the true p_m(c)
cannot exceed it, since c is outside its top-k), ``r_m = max(1 - sum_topk p, 1e-12)``
is the mass it left outside its top-k (spread evenly over the ``V - k`` unreported
ids), ``V`` is the vocabulary size and ``k`` the number of distinct ids reported.
This is never a silent zero, so product-style policies are not vetoed by a member
that simply did not look at a candidate. Details: duplicate ids in one member's
top-k keep their first occurrence; ``p_m^(k)`` is taken over reported entries with
a positive probability (1 if there is none); when ``k >= V`` the bound is
``p_m^(k)`` alone (no id can then be missing). ``in_topk`` tells the reported values
from the filled ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESIDUAL_FLOOR = 1e-12
"""Smallest residual mass r_m a member is assumed to leave outside its top-k."""


@dataclass
class MemberTopK:
    """One member's top-k at one step of one request."""

    ids: np.ndarray
    """[k] int64 token ids in the shared vocabulary."""
    logprobs: np.ndarray
    """[k] float log-probabilities from the member's raw (untempered) distribution."""


@dataclass
class CandidateBatch:
    """Candidates of R requests and every member's log-prob of each."""

    ids: np.ndarray
    """[R, C] int64 candidate token ids, padded with -1."""
    mask: np.ndarray
    """[R, C] bool, True at real candidates."""
    logprobs: np.ndarray
    """[R, M, C] float64 member m's log-prob of candidate c (reported or filled); -inf at padding."""
    in_topk: np.ndarray
    """[R, M, C] bool, True where member m reported candidate c in its top-k."""


def flatten_tops(tops: list[list[MemberTopK]], n_mem: int, vocab_size):
    """All reported entries in (request, member, rank) order, with their segment.

    vocab_size: an int, or [M] one per member (ids are checked against it)."""
    flat = [top for row in tops for top in row]
    ids = [np.asarray(t.ids, dtype=np.int64).reshape(-1) for t in flat]
    lps = [np.asarray(t.logprobs, dtype=np.float64).reshape(-1) for t in flat]
    counts = np.array([a.size for a in ids], dtype=np.int64)  # [R*M]
    for n, (a, b) in enumerate(zip(ids, lps, strict=True)):
        if a.size != b.size:
            raise ValueError(f"tops[{n // n_mem}][{n % n_mem}]: ids and logprobs differ in length")
    ids = np.concatenate(ids) if flat else np.empty(0, np.int64)  # [N]
    lps = np.concatenate(lps) if flat else np.empty(0)  # [N]
    seg = np.repeat(np.arange(counts.size), counts)  # [N] request * M + member
    limit = vocab_size if np.ndim(vocab_size) == 0 else np.asarray(vocab_size)[seg % n_mem]
    if ids.size and (ids.min() < 0 or (ids >= limit).any()):
        raise ValueError(f"tops: token id outside [0, {vocab_size})")
    return ids, lps, seg


def segment_bounds(lps: np.ndarray, seg: np.ndarray, n_seg: int, vocab_size) -> tuple:
    """(log p^(k), log fill) per (request, member) segment: its smallest reported
    probability and the no-opinion fill min(p^(k), r / (V - k)).

    lps, seg: [N] deduplicated entries; vocab_size: an int or [S] per segment."""
    probs = np.exp(lps)
    k = np.bincount(seg, minlength=n_seg)  # [S]
    residual = np.maximum(1.0 - np.bincount(seg, weights=probs, minlength=n_seg), RESIDUAL_FLOOR)
    p_min = np.ones(n_seg)  # [S]
    positive = probs > 0
    np.minimum.at(p_min, seg[positive], probs[positive])
    unseen = vocab_size - k
    spread = np.minimum(p_min, residual / np.maximum(unseen, 1))
    return np.log(p_min), np.log(np.where(unseen > 0, spread, p_min))


def union_columns(req: np.ndarray, keys: np.ndarray, n_req: int, key_space: int):
    """Union of each request's keys, by first appearance (entries in (r, m, rank) order).

    req, keys: [N] request and key (0 <= key < key_space) of every entry. Returns
    (candidate keys [R, C] padded with -1, the candidate column of each entry [N],
    the sorted distinct ``req * key_space + key`` [U], the column of each of those [U]).
    """
    uniq, first, inverse = np.unique(req * key_space + keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique candidates by appearance
    cand_req = req[first[order]]  # [U] request of each candidate
    per_req = np.bincount(cand_req, minlength=n_req)  # [R]
    cand_col = np.arange(order.size) - (np.cumsum(per_req) - per_req)[cand_req]  # [U]
    col_of_unique = np.empty_like(order)
    col_of_unique[order] = cand_col
    n_cand = int(per_req.max()) if n_req else 0
    out = np.full((n_req, n_cand), -1, dtype=np.int64)  # [R, C]
    out[cand_req, cand_col] = keys[first[order]]
    return out, col_of_unique[inverse.reshape(-1)], uniq, col_of_unique


def align_shared(tops: list[list[MemberTopK]], vocab_size: int) -> CandidateBatch:
    """Union the members' top-k of each request into one padded candidate batch."""
    if vocab_size <= 0:
        raise ValueError("vocab_size must be positive")
    n_req = len(tops)
    n_mem = len(tops[0]) if n_req else 0
    if any(len(row) != n_mem for row in tops):
        raise ValueError("tops: every request needs one top-k per member")
    ids, lps, seg = flatten_tops(tops, n_mem, vocab_size)  # [N] each

    # duplicates within one member's top-k: keep the first occurrence
    _, first = np.unique(seg * vocab_size + ids, return_index=True)
    keep = np.sort(first)
    ids, lps, seg = ids[keep], lps[keep], seg[keep]
    req, mem = seg // max(n_mem, 1), seg % max(n_mem, 1)  # [N]
    fill = segment_bounds(lps, seg, n_req * n_mem, vocab_size)[1].reshape(n_req, n_mem)  # [R, M]

    out_ids, col, _, _ = union_columns(req, ids, n_req, vocab_size)  # [R, C], [N]
    n_cand = out_ids.shape[1]
    mask = out_ids >= 0  # [R, C]
    in_topk = np.zeros((n_req, n_mem, n_cand), dtype=bool)  # [R, M, C]
    in_topk[req, mem, col] = True
    logprobs = np.broadcast_to(fill[:, :, None], in_topk.shape).copy()  # [R, M, C]
    logprobs[req, mem, col] = lps
    logprobs[~np.broadcast_to(mask[:, None, :], logprobs.shape)] = -np.inf
    return CandidateBatch(ids=out_ids, mask=mask, logprobs=logprobs, in_topk=in_topk)

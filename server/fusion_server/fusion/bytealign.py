"""Candidate alignment for members whose vocabularies differ: candidates are byte strings.

Contract: turns every member's top-k at one step (each in its own vocabulary) into
one ``ByteCandidateBatch`` the policies fuse exactly like a shared-id batch. Pure
numpy over tables built once (``ByteKeys``); it knows nothing about engines, feeding
or text deltas. Vectorised over requests; only members that hold bytes back take a
per-entry Python path.

Candidates (API contract). A request's candidates are the union of its members'
top-k tokens as byte strings, by first appearance (member 0's in rank order, then
member 1's new ones, ...), padded as in ``align_shared``. A member ``m`` that holds
back ``h_m`` (bytes of the output it has not been sent: an incomplete UTF-8 tail, see
``feeder``) reported its top-k *before* ``h_m``: its token ``t`` stands for
``bytes(t)[len(h_m):]`` if ``bytes(t)`` starts with ``h_m`` and is longer, and is no
candidate otherwise. Every member's EOS token is one shared EOS candidate (key 0;
dropped when the ensemble stops by member instead, ``fusion.eos``); any other token
that spells no bytes (BOS, PAD, ``<|im_start|>``) is one candidate per token name,
shared by the members that have a special token of that name; an id with no name
(unused embedding rows) is a candidate of its own member only.

Scores: member ``m``'s probability of candidate ``c`` (p: probabilities, ``p^(k)`` its
smallest reported probability, ``fill`` the shared no-opinion fill
``min(p^(k), r / (V_m - k))`` of ``fusion.candidates``):

- exact: ``c`` is what one of its reported tokens spells -> that token's probability.
  When several reported tokens spell ``c`` (``A`` and ``<0x41>``), the likeliest one
  counts, not their sum: the score is the probability of the one token ``m`` is fed
  if ``c`` wins, and ``m``'s own greedy token stays its best candidate (so ``mean``
  with all weight on ``m`` reproduces ``m``'s greedy output token for token);
- extension: otherwise, with ``e`` the summed probability of its reported tokens that
  extend ``c`` (``c`` a proper prefix of what they spell),
  ``p_m(c) = min(p^(k) (1 - 1e-6), max(e, fill))``. The cap holds because no token
  spelling exactly ``c`` is among ``m``'s reported ones, so none is likelier than
  ``p^(k)``; the 1e-6 margin breaks a tie in favour of a reported token (with k = 1 the
  cap would otherwise equal m's top-1). ``e`` says ``m`` wants text starting with
  ``c``, but in a longer token;
- no opinion: ``min(p^(k) (1 - 1e-6), fill)`` (never a silent zero, as for shared ids;
  the margin matters only when the fill reaches p^(k): k = 1 on a small vocabulary).

Every policy fuses these ``[R, M, C]`` log-probs as it does shared-id ones; its
documented formula applies with ``p_i(c)`` read as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .candidates import CandidateBatch, MemberTopK, flatten_tops, segment_bounds, union_columns

EOS_KEY = 0
"""Key of the shared EOS candidate."""
CAP_MARGIN = 1e-6
"""The extension cap sits this fraction below p^(k): a reported token wins a tie."""


@dataclass
class ByteCandidateBatch(CandidateBatch):
    """A CandidateBatch whose ``ids`` are ``ByteKeys`` keys, plus who proposed what."""

    token_ids: np.ndarray = None
    """[R, M, C] int64 member m's token spelling candidate c exactly (-1: none)."""
    top1: np.ndarray = None
    """[R, M] int64 candidate column of member m's top-1 token (-1: it is no candidate)."""


class ByteKeys:
    """Every byte string the members' tokens spell, and their proper prefixes, as int keys.

    Built once per ensemble from the members' byte tables. Key 0 is EOS; other
    no-byte tokens are keyed by their name (``special_names[m][id]``, e.g. "<s>"),
    or privately per member when they have none. Keys of byte strings met later
    (suffixes of tokens past a member's held-back bytes) are added on demand.
    """

    def __init__(
        self,
        tables: Sequence[Sequence[bytes]],
        specials: Sequence[set[int] | frozenset[int]],
        eos_ids: Sequence[set[int] | frozenset[int]],
        special_names: Sequence[dict[int, str]] | None = None,
    ):
        self._index: dict[object, int] = {}
        self.spelled: list[bytes] = []  # key -> bytes (b"" for EOS and private keys)
        assert self.intern(("eos",), b"") == EOS_KEY
        self.tables = [list(t) for t in tables]
        self.specials = [frozenset(s) for s in specials]
        self.vocab_sizes = np.array([len(t) for t in tables], dtype=np.int64)  # [M]
        self.base = np.concatenate([[0], np.cumsum(self.vocab_sizes)[:-1]]).astype(np.int64)
        token_key, prefix_counts, prefix_keys = [], [], []
        for m, table in enumerate(self.tables):
            for t, spelled in enumerate(table):
                if t in eos_ids[m]:
                    token_key.append(EOS_KEY)
                    prefix_counts.append(0)
                elif not spelled or t in self.specials[m]:
                    name = special_names[m].get(t) if special_names else None
                    marker = ("special", name) if name else ("private", m, t)
                    token_key.append(self.intern(marker, b""))
                    prefix_counts.append(0)
                else:
                    token_key.append(self.intern(spelled))
                    prefixes = [self.intern(spelled[:j]) for j in range(1, len(spelled))]
                    prefix_keys += prefixes
                    prefix_counts.append(len(prefixes))
        self.token_key = np.array(token_key, dtype=np.int64)  # [sum V] key of each token
        self.prefix_off = np.concatenate([[0], np.cumsum(prefix_counts)]).astype(np.int64)
        self.prefix_keys = np.array(prefix_keys, dtype=np.int64)  # [P]

    def __len__(self) -> int:
        return len(self.spelled)

    def intern(self, item: object, spelled: bytes | None = None) -> int:
        """The key of a byte string (or of a private/EOS marker), added if new."""
        key = self._index.get(item)
        if key is None:
            key = self._index[item] = len(self.spelled)
            self.spelled.append(item if spelled is None else spelled)
        return key

    def prefixes(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, key): the proper-prefix keys of global token indices ``tokens`` [N]."""
        start, stop = self.prefix_off[tokens], self.prefix_off[tokens + 1]
        counts = stop - start  # [N]
        owner = np.repeat(np.arange(tokens.size), counts)  # [P']
        offset = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
        return owner, self.prefix_keys[np.repeat(start, counts) + offset]


def _relative(keys: ByteKeys, m: int, token: int, held: bytes) -> tuple[int, list[int]]:
    """(key, prefix keys) of member m's token past its held bytes; key -1: no candidate."""
    spelled = keys.tables[m][token]
    if token in keys.specials[m] or len(spelled) <= len(held) or not spelled.startswith(held):
        return -1, []
    rest = spelled[len(held) :]
    return keys.intern(rest), [keys.intern(rest[:j]) for j in range(1, len(rest))]


def align_bytes(
    keys: ByteKeys,
    tops: list[list[MemberTopK]],
    held: list[list[bytes]],
    sources: list[list[int]] | None = None,
    drop_eos: bool = False,
) -> ByteCandidateBatch:
    """Union the members' top-k of each request as byte strings (module contract).

    tops[r][m]: member m's top-k in its own vocabulary; held[r][m]: the bytes it holds
    back; sources[r][m]: m itself, or the member whose top-k m's stands for this step
    (a gated policy's skipped members copy the primary's row); drop_eos: leave the EOS
    candidate out.
    """
    n_req = len(tops)
    n_mem = len(keys.tables)
    if any(len(row) != n_mem for row in tops):
        raise ValueError("tops: every request needs one top-k per member")
    ids, lps, seg = flatten_tops(tops, n_mem, keys.vocab_sizes)  # [N] each
    _, first = np.unique(seg * int(keys.vocab_sizes.max(initial=1)) + ids, return_index=True)
    keep = np.sort(first)  # duplicate ids in one member's top-k: keep the first
    ids, lps, seg = ids[keep], lps[keep], seg[keep]
    n_seg = n_req * n_mem
    mem = seg % n_mem
    log_pmin, fill = segment_bounds(lps, seg, n_seg, keys.vocab_sizes[np.arange(n_seg) % n_mem])
    gtok = keys.base[mem] + ids  # [N] global token index
    key = keys.token_key[gtok]  # [N]
    owner, pkey = keys.prefixes(gtok)  # [P] entry and prefix key

    # members holding bytes back, or standing in for another: per-entry Python path
    live = np.ones(ids.size, dtype=bool)
    slow = np.zeros(ids.size, dtype=bool)
    extra_owner: list[int] = []
    extra_key: list[int] = []
    bounds = np.searchsorted(seg, np.arange(n_seg + 1))  # [S + 1] entries of each segment
    special = [
        (r, m, sources is not None and sources[r][m] != m)
        for r in range(n_req)
        for m in range(n_mem)
        if held[r][m] or (sources is not None and sources[r][m] != m)
    ]
    for r, m, copied in special:
        lo, hi = bounds[r * n_mem + m], bounds[r * n_mem + m + 1]
        slow[lo:hi] = True
        for e in range(lo, hi):
            k, pre = (-1, []) if copied else _relative(keys, m, int(ids[e]), held[r][m])
            key[e] = k
            live[e] = k >= 0
            extra_owner += [e] * len(pre)
            extra_key += pre
    if drop_eos:
        live &= key != EOS_KEY
    fast = ~slow[owner]
    owner = np.concatenate([owner[fast], np.asarray(extra_owner, dtype=np.int64)])
    pkey = np.concatenate([pkey[fast], np.asarray(extra_key, dtype=np.int64)])

    # candidates: union of the live entries' keys per request
    ent = np.flatnonzero(live)
    req = seg // n_mem
    space = len(keys)
    # uniq: every candidate as r * space + key, sorted; lookup: its column
    cand, col_ent, uniq, lookup = union_columns(req[ent], key[ent], n_req, space)
    n_cand = cand.shape[1]
    col = np.full(ids.size, -1, dtype=np.int64)
    col[ent] = col_ent
    mask = cand >= 0  # [R, C]

    # extension mass: reported tokens of m whose bytes properly extend a candidate
    probe = req[owner] * space + pkey  # [P]
    pos = np.minimum(np.searchsorted(uniq, probe), max(uniq.size - 1, 0))
    hit = live[owner] & (uniq[pos] == probe) if uniq.size else np.zeros(owner.size, bool)
    ext = np.bincount(
        seg[owner[hit]] * n_cand + lookup[pos[hit]],
        weights=np.exp(lps[owner[hit]]),
        minlength=n_seg * n_cand,
    ).reshape(n_req, n_mem, n_cand)  # [R, M, C]

    log_cap = log_pmin.reshape(n_req, n_mem, 1) + np.log1p(-CAP_MARGIN)  # [R, M, 1]
    with np.errstate(divide="ignore"):
        log_ext = np.log(ext)
    # min(p^(k) (1 - margin), max(e, fill)), in logs: [R, M, C]
    logprobs = np.minimum(log_cap, np.maximum(log_ext, fill.reshape(n_req, n_mem, 1)))
    # exact entries: the first (likeliest) token of m spelling each candidate
    _, first = np.unique(seg[ent] * max(n_cand, 1) + col[ent], return_index=True)
    ex = ent[first]
    in_topk = np.zeros((n_req, n_mem, n_cand), dtype=bool)
    in_topk[req[ex], mem[ex], col[ex]] = True
    logprobs[req[ex], mem[ex], col[ex]] = lps[ex]
    token_ids = np.full((n_req, n_mem, n_cand), -1, dtype=np.int64)
    token_ids[req[ex], mem[ex], col[ex]] = ids[ex]
    logprobs[~np.broadcast_to(mask[:, None, :], logprobs.shape)] = -np.inf
    top1 = np.full(n_seg, -1, dtype=np.int64)
    has = bounds[:-1] < bounds[1:]
    top1[has] = col[bounds[:-1][has]]
    top1 = top1.reshape(n_req, n_mem)
    if sources is not None:  # copied rows: the source member's scores, not its tokens
        for r in range(n_req):
            for m, src in enumerate(sources[r]):
                if src != m:
                    logprobs[r, m] = logprobs[r, src]
                    in_topk[r, m] = in_topk[r, src]
                    top1[r, m] = top1[r, src]
    return ByteCandidateBatch(
        ids=cand, mask=mask, logprobs=logprobs, in_topk=in_topk, token_ids=token_ids, top1=top1
    )

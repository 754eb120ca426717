"""The teacher signal: the ensemble's fused top-k distribution at every position.

Contract: for each packed training row (token ids in the ensemble's shared
vocabulary), every member runs one teacher-forced prefill (`Member.score`:
prompt_logprobs = top_k, no decoding); the per-position top-k lists are aligned
(`align_shared`, the no-opinion fill for unreported candidates) and fused by the
configured policy exactly as a Generate step fuses them. The fused distribution over
the candidates is cut to its `top_k` best ids K; the teacher q_t over K + one *tail*
outcome (every other id) gives the kept ids the mass the members give them together,
1 - T with T = sum_m w_m (1 - sum_{c in K} p_m(c)) (reported or no-opinion-filled p),
shared in proportion to the fused scores, and the tail T. For `mean` this is exactly
the linear pool sum_m w_m p_m(c) on K. Keeping the tail matters: a teacher
renormalised over its top-k makes the student over-confident, and with weak members
(where the actual token is often outside every top-k) held-out bits per byte get
worse, not better (measured: 3.261 -> 3.360 on the trained demo pair).

Gated policies: where the primary is confident the primary's row stands for every
member (it decides alone in Generate). packllm: member weights from each member's mean
NLL of the row.

Rows are computed in shards of `rows_per_shard` and written atomically
(`shard-00000.npz`: ids [S, L-1, k] int32, logprobs [S, L-1, k] float32 whose
probabilities sum to 1 - T (the tail is implicit), -inf padding),
next to a manifest naming what they were computed from (data hash, members, policy,
row length, top_k). A rerun with the same manifest reuses the finished shards
(resume); a different manifest is refused rather than silently mixed.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..fusion.candidates import MemberTopK, align_shared
from ..fusion.policies import Policy
from .data import DistillError

MANIFEST = "manifest.json"


@dataclass
class TeacherChoice:
    """The fusion the teacher applies: policy instance, params, weights, roles."""

    policy: Policy
    params: dict[str, float]
    weights: np.ndarray
    roles: dict[str, tuple[int, ...]]


def fused_topk(
    choice: TeacherChoice,
    actual: np.ndarray,
    top_ids: np.ndarray,
    top_logprobs: np.ndarray,
    vocab_size: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fused top-k at every position, with the tail mass left out (module docstring).

    actual: [M, N] each member's log-prob of the actual next token (packllm weights),
    top_ids / top_logprobs: [M, N, K]. Returns ids [N, k] and log-probs [N, k] whose
    probabilities sum to 1 - T (-inf and id 0 where fewer candidates exist).
    """
    n_mem, n_pos, _ = top_ids.shape
    tops = [
        [MemberTopK(ids=top_ids[m, t], logprobs=top_logprobs[m, t]) for m in range(n_mem)]
        for t in range(n_pos)
    ]
    weights = choice.weights
    if choice.policy.needs_prompt_nll:
        weights = choice.policy.prompt_weights(-actual.mean(axis=1), weights, choice.params)
    confident = None
    if choice.policy.gated:
        (primary,) = choice.roles["primary"]
        confident = choice.policy.confident(top_logprobs[primary], [choice.params] * n_pos)
    return fuse_tops(choice, weights, tops, confident, vocab_size, k)


def fuse_tops(
    choice: TeacherChoice,
    weights: np.ndarray,
    tops: list[list[MemberTopK]],
    confident: np.ndarray | None,
    vocab_size: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """fused_topk's fusion of per-position member top-k lists (tops[t][m]).

    weights: [M] the members' weights (packllm: already from the row's NLL);
    confident: [N] bool where a gated policy's primary decides alone (its row stands
    for every member), None for other policies.
    """
    n_pos = len(tops)
    batch = align_shared(tops, vocab_size)
    logprobs = batch.logprobs.copy()  # [N, M, C]
    policy = choice.policy
    if confident is not None:
        (primary,) = choice.roles["primary"]
        logprobs[confident] = logprobs[confident, primary][:, None, :]
    args: tuple[Any, ...] = (
        logprobs,
        batch.mask,
        np.tile(weights, (n_pos, 1)),
        [choice.params] * n_pos,
    )
    if policy.roles:
        args += ([choice.roles] * n_pos,)
    fused = np.where(batch.mask, policy.fuse(*args), -np.inf)  # [N, C]
    kk = min(k, fused.shape[1])
    if kk == 0:  # no member reported anything the student can be taught
        return np.zeros((n_pos, k), dtype=np.int64), np.full((n_pos, k), -np.inf)
    order = np.argsort(-fused, axis=1, kind="stable")[:, :kk]  # [N, kk]
    rows = np.arange(n_pos)[:, None]
    ids = np.where(batch.mask[rows, order], batch.ids[rows, order], 0)
    lps = fused[rows, order]
    top = lps.max(axis=1, keepdims=True)
    empty = ~np.isfinite(top)  # [N, 1] a position with no candidate: no teacher there
    top = np.where(empty, 0.0, top)
    with np.errstate(divide="ignore"):
        lps = lps - top - np.log(np.exp(lps - top).sum(axis=1, keepdims=True))  # over K
    lps = np.where(empty, -np.inf, lps)
    member_kept = np.exp(
        np.take_along_axis(batch.logprobs, order[:, None, :], axis=2)
    )  # [N, M, kk]
    member_kept = np.where(batch.mask[rows, order][:, None, :], member_kept, 0.0).sum(axis=2)
    kept_mass = np.clip((member_kept * weights[None, :]).sum(axis=1), 1e-12, 1.0)  # [N] 1 - T
    lps = lps + np.log(kept_mass)[:, None]
    if kk < k:
        ids = np.pad(ids, ((0, 0), (0, k - kk)))
        lps = np.pad(lps, ((0, 0), (0, k - kk)), constant_values=-np.inf)
    return ids, lps


class TeacherCache:
    """Shards of the teacher signal in `root`, with a manifest guarding reuse."""

    def __init__(self, root: pathlib.Path, manifest: dict, num_rows: int, rows_per_shard: int):
        self.root = root
        self.manifest = {**manifest, "num_rows": num_rows, "rows_per_shard": rows_per_shard}
        self.num_rows = num_rows
        self.rows_per_shard = rows_per_shard
        root.mkdir(parents=True, exist_ok=True)
        path = root / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            if old != self.manifest:
                changed = sorted(
                    k for k in {*old, *self.manifest} if old.get(k) != self.manifest.get(k)
                )
                raise DistillError(
                    f"{root}: teacher cache was made from other inputs ({', '.join(changed)} "
                    "differ); use another --work-dir or delete it"
                )
        else:
            _atomic_write(path, json.dumps(self.manifest, indent=1).encode())

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    def shard_path(self, i: int) -> pathlib.Path:
        return self.root / f"shard-{i:05d}.npz"

    def missing(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_path(i).exists()]

    def rows_of(self, i: int) -> range:
        return range(i * self.rows_per_shard, min((i + 1) * self.rows_per_shard, self.num_rows))

    def save(self, i: int, ids: np.ndarray, logprobs: np.ndarray) -> None:
        tmp = self.shard_path(i).with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids.astype(np.int32), logprobs=logprobs.astype(np.float32))
        os.replace(tmp, self.shard_path(i))

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """All shards: ids [R, L-1, k] int64 and logprobs [R, L-1, k] float32."""
        parts = [np.load(self.shard_path(i)) for i in range(self.num_shards)]
        return (
            np.concatenate([p["ids"] for p in parts]).astype(np.int64),
            np.concatenate([p["logprobs"] for p in parts]),
        )


async def fill_cache(cache: TeacherCache, row_teacher, progress=None) -> None:
    """Compute every missing shard; ``row_teacher(r)`` -> (ids, logprobs) of row r.

    Rows of a shard run concurrently (the engines batch them)."""
    for i in cache.missing():
        ids, lps = [], []
        for row_ids, row_lps in await asyncio.gather(*(row_teacher(r) for r in cache.rows_of(i))):
            ids.append(row_ids)
            lps.append(row_lps)
            if progress is not None:
                progress.update(1)
        cache.save(i, np.stack(ids), np.stack(lps))


def shared_row_teacher(
    rows: list[list[int]], members: list, choice: TeacherChoice, vocab_size, top_k
):
    """Row teacher when every member shares the student's vocabulary."""

    async def one(r: int):
        outs = await asyncio.gather(*(m.score(f"distill-{r}", rows[r], top_k) for m in members))
        return fused_topk(
            choice,
            np.stack([o[0] for o in outs]),
            np.stack([o[1] for o in outs]),
            np.stack([o[2] for o in outs]),
            vocab_size,
            top_k,
        )

    return one


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

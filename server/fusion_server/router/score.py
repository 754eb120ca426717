"""Score: the fused log-likelihood of a continuation after a prompt (shared vocabulary).

Contract: one teacher-forced prefill per member (``Member.score``: vLLM
``prompt_logprobs=top_k``), no step-by-step decoding; then every scored position is
aligned and fused in one vectorised call with the same ``align_shared`` and the same
policy ``fuse`` as the router, so Score and Generate see the same distribution.

What the fused score is, at each position t of the continuation (actual token x_t):

- candidates: the union of the members' top-k (``align_shared``, no-opinion fill for
  unreported candidates, exactly as a Generate step), plus x_t if it is not among them,
  plus one **tail** outcome standing for every other token of the vocabulary;
- every member's log-prob of x_t is its exact one (vLLM reports the actual token's
  log-prob beside the top-k), and its tail mass is T_i = max(1 - S_i, 1e-12), S_i
  being its (reported or filled) probability mass on the candidates; so each member's
  row is a distribution over candidates + tail;
- the policy's ``fuse`` runs over that row set (gate: where the primary is confident,
  every member's row is the primary's, as the primary then decides alone; packllm:
  weights from each member's mean NLL of the prompt tokens, as in Generate);
- the fused log-prob of the position is the fused value at x_t's column.

Consequences, documented in docs/score.md: with every S_i <= 1, ``mean`` (and gate /
packllm where they pool) is exactly log sum_i w_i p_i(x_t), the full-vocabulary linear
pool; a one-member ensemble scores exactly the member's own log-likelihood; ``product``
is a lower bound of the full-vocabulary product of experts (Hölder); ``max``, ``entropy``,
``vote``, ``contrastive`` and ``proxy`` treat the tail as one lumped candidate. Members
with different vocabularies are scored on their common segmentation
(``_score_segments``; docs/score.md).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import numpy as np

from ..fusion.candidates import RESIDUAL_FLOOR, MemberTopK, align_shared
from ..fusion.policies import Policy, PolicyError, Roles


class Unsupported(RuntimeError):
    """The ensemble cannot serve this request (e.g. Score across vocabularies, for now)."""


@dataclass
class ScoreParams:
    """A validated Score request (no protobuf, no engine objects)."""

    request_id: str
    prompt: str
    continuation: str
    policy: str = ""
    weights: dict[str, float] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    token_details: bool = False


@dataclass
class MemberScore:
    """One member's own (unfused) log-likelihood of the continuation."""

    member: str
    logprob: float
    bits_per_byte: float
    tokens: int


@dataclass
class ScoredToken:
    """One continuation token: fused and per-member log-probs."""

    token_id: int
    text: str
    logprob: float
    member_logprobs: list[float]


@dataclass
class ScoreResult:
    request_id: str
    logprob: float
    bits_per_byte: float
    num_bytes: int
    tokens: int
    prompt_tokens: int
    members: list[MemberScore]
    weights: dict[str, float]
    policy: str
    details: list[ScoredToken] = field(default_factory=list)


@dataclass
class FusionChoice:
    """The resolved policy of a request: instance, validated params, weights, roles."""

    policy: Policy
    params: dict[str, float]
    weights: np.ndarray
    """[M], sums to 1."""
    roles: Roles


def bits_per_byte(logprob: float, num_bytes: int) -> float:
    """-logprob (nats) in bits per byte."""
    return -logprob / (math.log(2) * num_bytes) if num_bytes else 0.0


def fuse_positions(
    choice: FusionChoice,
    actual: np.ndarray,
    top_ids: np.ndarray,
    top_logprobs: np.ndarray,
    targets: np.ndarray,
    vocab_size: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Fused log-prob of each actual token (module docstring's definition).

    actual: [M, N] each member's log-prob of targets, top_ids / top_logprobs:
    [M, N, K] each member's top-k, targets: [N] actual ids, weights: [M] (default:
    choice.weights). Returns [N].
    """
    n_mem, n_pos = actual.shape
    weights = choice.weights if weights is None else weights
    if n_pos == 0:
        return np.zeros(0)
    tops = [
        [MemberTopK(ids=top_ids[m, t], logprobs=top_logprobs[m, t]) for m in range(n_mem)]
        for t in range(n_pos)
    ]
    batch = align_shared(tops, vocab_size)  # logprobs [N, M, C]
    n_cand = batch.ids.shape[1]
    rows = np.arange(n_pos)
    hit = batch.ids == targets[:, None]  # [N, C]
    found = hit.any(axis=1)  # [N]
    x_col = np.where(found, hit.argmax(axis=1), n_cand)  # [N]
    # columns: the candidates, x (used where it is not a candidate), the tail
    logprobs = np.full((n_pos, n_mem, n_cand + 2), -np.inf)  # [N, M, C+2]
    logprobs[:, :, :n_cand] = batch.logprobs
    mask = np.zeros((n_pos, n_cand + 2), dtype=bool)  # [N, C+2]
    mask[:, :n_cand] = batch.mask
    mask[:, n_cand] = ~found
    mask[:, n_cand + 1] = True
    logprobs[rows, :, x_col] = actual.T  # exact for every member
    with np.errstate(divide="ignore"):
        live = np.where(mask[:, None, :], logprobs, -np.inf)[:, :, : n_cand + 1]
        top = live.max(axis=-1, keepdims=True)  # [N, M, 1]
        mass = np.exp(top[..., 0]) * np.exp(live - top).sum(axis=-1)  # [N, M] S_i
        logprobs[:, :, n_cand + 1] = np.log(np.maximum(1.0 - mass, RESIDUAL_FLOOR))
    logprobs[~np.broadcast_to(mask[:, None, :], logprobs.shape)] = -np.inf
    if choice.policy.gated:
        (primary,) = choice.roles["primary"]
        confident = choice.policy.confident(top_logprobs[primary], [choice.params] * n_pos)
        logprobs[confident] = logprobs[confident, primary][:, None, :]
    args = (logprobs, mask, np.tile(weights, (n_pos, 1)), [choice.params] * n_pos)
    if choice.policy.roles:
        args += ([choice.roles] * n_pos,)
    fused = choice.policy.fuse(*args)  # [N, C+2]
    return fused[rows, x_col]


class Scorer:
    """Scores continuations on a started Ensemble (shared ids or byte alignment)."""

    def __init__(self, ensemble, top_k: int) -> None:
        self.ensemble = ensemble
        self.top_k = top_k

    async def score(
        self, params: ScoreParams, choice: FusionChoice, prompt_ids: list[int], cont_ids: list[int]
    ) -> ScoreResult:
        ensemble = self.ensemble
        if not all(hasattr(m, "score") for m in ensemble.members):
            raise Unsupported(
                "Score needs every member's engine in this process for now "
                "(not available with endpoint: members or server.member_workers)"
            )
        if getattr(ensemble, "alignment", "shared-ids") != "shared-ids":
            return await self._score_segments(params, choice)
        ids = prompt_ids + cont_ids
        start = len(prompt_ids)  # >= 1: position 0 has no log-prob
        outs = await asyncio.gather(
            *(m.score(params.request_id, ids, self.top_k) for m in ensemble.members)
        )
        actual = np.stack([o[0] for o in outs])  # [M, len(ids) - 1]
        top_ids = np.stack([o[1] for o in outs])  # [M, len(ids) - 1, K]
        top_lps = np.stack([o[2] for o in outs])
        weights = choice.weights
        if choice.policy.needs_prompt_nll:
            prompt_part = actual[:, : start - 1]  # targets ids[1:start]
            nll = -prompt_part.mean(axis=1) if prompt_part.shape[1] else np.zeros(len(outs))
            weights = choice.policy.prompt_weights(nll, weights, choice.params)
        cont = slice(start - 1, None)
        targets = np.asarray(cont_ids, dtype=np.int64)
        fused = fuse_positions(
            choice,
            actual[:, cont],
            top_ids[:, cont],
            top_lps[:, cont],
            targets,
            ensemble.vocab_size,
            weights,
        )
        num_bytes = len(params.continuation.encode("utf-8"))
        total = float(fused.sum())
        names = ensemble.member_names
        member_lp = actual[:, cont].sum(axis=1)  # [M]
        result = ScoreResult(
            request_id=params.request_id,
            logprob=total,
            bits_per_byte=bits_per_byte(total, num_bytes),
            num_bytes=num_bytes,
            tokens=len(cont_ids),
            prompt_tokens=start,
            members=[
                MemberScore(n, float(lp), bits_per_byte(float(lp), num_bytes), len(cont_ids))
                for n, lp in zip(names, member_lp, strict=True)
            ],
            weights={n: float(w) for n, w in zip(names, weights, strict=True)},
            policy=choice.policy.name,
        )
        if params.token_details:
            table = ensemble.table
            result.details = [
                ScoredToken(
                    token_id=int(tok),
                    text=table[int(tok)].decode("utf-8", errors="replace"),
                    logprob=float(fused[j]),
                    member_logprobs=[float(v) for v in actual[:, cont][:, j]],
                )
                for j, tok in enumerate(targets)
            ]
        return result

    async def _score_segments(self, params: ScoreParams, choice: FusionChoice) -> ScoreResult:
        """Byte alignment: fuse on the members' common segmentation of the continuation.

        Each member scores its own tokenization (its prompt ids, then its continuation
        encoding of exactly the continuation's bytes: no BOS, no dummy prefix), in one
        prefill. The common segments end where every member has a token boundary and a
        character ends; a member's log-prob of a segment is the exact sum of its tokens'
        log-probs in it.
        Per segment the policy fuses two outcomes, the segment and a tail (1 - p), with
        the same code as shared-ids Score: `mean` is exactly log sum_m w_m p_m(segment),
        and a member with all the weight scores its own log-likelihood. Gate: the
        primary is confident where its segment probability is >= tau.
        """
        from ..feeder import ContinuationEncoder

        ensemble = self.ensemble
        data = params.continuation.encode("utf-8")
        prompts = ensemble.encode_members(params.prompt)
        conts = []
        for m, v, prompt in zip(ensemble.members, ensemble.vocabs, prompts, strict=True):
            encoder = v.encoder or ContinuationEncoder(m.name, v.tokenizer, v.table, v.specials)
            ids = encoder.encode(data)
            if b"".join(v.table[i] for i in ids) != data:
                raise Unsupported(
                    f"member {m.name!r}'s tokenizer cannot spell the continuation exactly"
                )
            if not prompt:
                raise PolicyError(
                    "prompt", f"must not be empty for member {m.name!r} (its tokenizer adds no BOS)"
                )
            if len(prompt) + len(ids) >= m.max_model_len:
                raise PolicyError(
                    "continuation",
                    f"prompt + continuation is {len(prompt) + len(ids)} tokens for member {m.name!r}; "
                    f"its context fits at most {m.max_model_len - 1}",
                )
            conts.append(ids)
        outs = await asyncio.gather(
            *(
                m.score(params.request_id, prompt + cont, 1)
                for m, prompt, cont in zip(ensemble.members, prompts, conts, strict=True)
            )
        )
        ends: list[np.ndarray] = []  # per member: byte offset where each cont token ends
        member_lps = []  # per member: log-prob of each cont token
        for v, prompt, cont, out in zip(ensemble.vocabs, prompts, conts, outs, strict=True):
            ends.append(np.cumsum([len(v.table[i]) for i in cont]))
            member_lps.append(out[0][len(prompt) - 1 :])
        chars = set(np.cumsum([len(ch.encode("utf-8")) for ch in params.continuation]).tolist())
        # includes len(data); never inside a character, so every segment is whole text
        common = sorted(chars.intersection(*(set(e.tolist()) for e in ends)))
        bounds = np.asarray(common)
        seg = np.stack(
            [
                np.bincount(np.searchsorted(bounds, e), weights=lp, minlength=len(bounds))
                for e, lp in zip(ends, member_lps, strict=True)
            ]
        )  # [M, S]
        weights = choice.weights
        if choice.policy.needs_prompt_nll:
            nll = np.array(
                [
                    -o[0][: len(p) - 1].mean() if len(p) > 1 else 0.0
                    for o, p in zip(outs, prompts, strict=True)
                ]
            )
            weights = choice.policy.prompt_weights(nll, weights, choice.params)
        n_seg = seg.shape[1]
        fused = fuse_positions(  # each segment as the one candidate every member reports
            choice,
            seg,
            np.zeros((len(conts), n_seg, 1), dtype=np.int64),
            seg[:, :, None],
            np.zeros(n_seg, dtype=np.int64),
            ensemble.vocab_size,
            weights,
        )
        total = float(fused.sum())
        names = ensemble.member_names
        result = ScoreResult(
            request_id=params.request_id,
            logprob=total,
            bits_per_byte=bits_per_byte(total, len(data)),
            num_bytes=len(data),
            tokens=n_seg,
            prompt_tokens=max(len(p) for p in prompts),
            members=[
                MemberScore(n, float(lp.sum()), bits_per_byte(float(lp.sum()), len(data)), len(c))
                for n, lp, c in zip(names, member_lps, conts, strict=True)
            ],
            weights={n: float(w) for n, w in zip(names, weights, strict=True)},
            policy=choice.policy.name,
        )
        if params.token_details:
            starts = [0, *common[:-1]]
            result.details = [
                ScoredToken(
                    token_id=-1,  # a common segment, not one vocabulary's token
                    text=data[a:b].decode("utf-8", errors="replace"),
                    logprob=float(fused[j]),
                    member_logprobs=[float(v) for v in seg[:, j]],
                )
                for j, (a, b) in enumerate(zip(starts, common, strict=True))
            ]
        return result

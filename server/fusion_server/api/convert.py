"""Protobuf <-> domain objects, with request validation (field-named errors)."""

from __future__ import annotations

import math
import uuid

from fusion_client._proto.fusion.v1 import fusion_pb2 as pb

from ..config import LimitsConfig
from ..router.request import Delta, FinishReason, GenerateParams, StepStats, TokenDetail
from ..router.score import ScoreParams, ScoreResult
from .errors import ValidationError

MAX_STOP_STRINGS = 16
MAX_REQUEST_ID = 128

FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
}


def _check_text(field: str, text: str, limits: LimitsConfig) -> None:
    if len(text) > limits.max_prompt_chars:
        raise ValidationError(
            field, f"{len(text)} characters is above the limit of {limits.max_prompt_chars}"
        )


def _check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID:
        raise ValidationError("request_id", f"must be at most {MAX_REQUEST_ID} characters")


def params_from_pb(req: pb.GenerateRequest, limits: LimitsConfig, top_k: int) -> GenerateParams:
    """Validate a GenerateRequest's own fields (not those that need the ensemble)."""
    if not req.prompt:
        raise ValidationError("prompt", "must not be empty")
    _check_text("prompt", req.prompt, limits)
    _check_request_id(req.request_id)
    s = req.sampling
    max_tokens = s.max_tokens if s.HasField("max_tokens") else limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ValidationError(
            "sampling.max_tokens", f"must be in [1, {limits.max_tokens}], got {max_tokens}"
        )
    temperature = s.temperature if s.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise ValidationError("sampling.temperature", f"must be >= 0, got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValidationError("sampling.top_p", f"must be in (0, 1], got {top_p}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise ValidationError("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, stop in enumerate(s.stop):
        if not stop:
            raise ValidationError(f"sampling.stop[{i}]", "must not be empty")
    if req.output.logprobs > top_k:
        raise ValidationError("output.logprobs", f"must be <= {top_k} (the ensemble's top_k)")
    return GenerateParams(
        request_id=req.request_id or uuid.uuid4().hex,
        prompt=req.prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
        policy=req.fusion.policy,
        weights=dict(req.fusion.weights),
        params=dict(req.fusion.params),
        roles=dict(req.fusion.roles),
        logprobs=req.output.logprobs,
        member_details=req.output.member_details,
    )


def token_to_pb(token: TokenDetail) -> pb.TokenDetail:
    return pb.TokenDetail(
        token_id=token.token_id,
        text=token.text,
        logprob=token.logprob,
        top_logprobs=[
            pb.TokenLogprob(token_id=i, text=t, logprob=lp) for i, t, lp in token.top_logprobs
        ],
        members=[
            pb.MemberTokenDetail(member=m.member, logprob=m.logprob, top_token_id=m.top_token_id)
            for m in token.members
        ],
    )


def stats_to_pb(stats: StepStats, member_names: list[str]) -> pb.FusionStats:
    return pb.FusionStats(
        fused_steps=stats.fused_steps,
        primary_only_steps=stats.primary_only_steps,
        members=[
            pb.MemberStats(
                member=name,
                consulted_steps=stats.consulted[m],
                top1_agreement=stats.agreed[m] / stats.consulted[m] if stats.consulted[m] else 0.0,
            )
            for m, name in enumerate(member_names)
        ],
        weights=stats.weights,
    )


def usage_to_pb(delta: Delta) -> pb.Usage:
    return pb.Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens)


def stream_to_pb(
    request_id: str, delta: Delta, members: list[str] | None
) -> pb.GenerateStreamResponse:
    """members: the member names when member_details was asked (stats on the last message)."""
    msg = pb.GenerateStreamResponse(
        request_id=request_id,
        text=delta.text,
        finish_reason=FINISH_TO_PB[delta.finish_reason],
        tokens=[token_to_pb(t) for t in delta.tokens],
    )
    if delta.finish_reason is not None:
        msg.usage.CopyFrom(usage_to_pb(delta))
        if delta.stats is not None:
            msg.members.extend(delta.stats.members)
        if members is not None and delta.stats is not None:
            msg.fusion_stats.CopyFrom(stats_to_pb(delta.stats, members))
    return msg


def response_to_pb(
    request_id: str, deltas: list[Delta], members: list[str] | None
) -> pb.GenerateResponse:
    last = deltas[-1]
    msg = pb.GenerateResponse(
        request_id=request_id,
        text="".join(d.text for d in deltas),
        finish_reason=FINISH_TO_PB[last.finish_reason],
        usage=usage_to_pb(last),
        tokens=[token_to_pb(t) for d in deltas for t in d.tokens],
    )
    if last.stats is not None:
        msg.members.extend(last.stats.members)
    if members is not None and last.stats is not None:
        msg.fusion_stats.CopyFrom(stats_to_pb(last.stats, members))
    return msg


def score_params_from_pb(req: pb.ScoreRequest, limits: LimitsConfig) -> ScoreParams:
    """Validate a ScoreRequest's own fields (limits.max_prompt_chars: prompt + continuation)."""
    if not req.continuation:
        raise ValidationError("continuation", "must not be empty")
    _check_text("prompt", req.prompt, limits)
    _check_text("continuation", req.prompt + req.continuation, limits)
    _check_request_id(req.request_id)
    return ScoreParams(
        request_id=req.request_id or uuid.uuid4().hex,
        prompt=req.prompt,
        continuation=req.continuation,
        policy=req.fusion.policy,
        weights=dict(req.fusion.weights),
        params=dict(req.fusion.params),
        roles=dict(req.fusion.roles),
        token_details=req.token_details,
    )


def score_to_pb(result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        request_id=result.request_id,
        logprob=result.logprob,
        bits_per_byte=result.bits_per_byte,
        bytes=result.num_bytes,
        tokens=result.tokens,
        prompt_tokens=result.prompt_tokens,
        members=[
            pb.MemberScore(
                member=m.member, logprob=m.logprob, bits_per_byte=m.bits_per_byte, tokens=m.tokens
            )
            for m in result.members
        ],
        policy=result.policy,
        weights=result.weights,
        token_details=[
            pb.ScoreToken(
                token_id=t.token_id,
                text=t.text,
                logprob=t.logprob,
                member_logprobs=t.member_logprobs,
            )
            for t in result.details
        ],
    )

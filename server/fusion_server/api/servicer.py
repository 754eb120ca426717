"""FusionService: thin gRPC servicer (convert, call the router, convert back)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from fusion_client._proto.fusion.v1 import fusion_pb2 as pb
from fusion_client._proto.fusion.v1 import fusion_pb2_grpc

from ..fusion.policies import describe_policies, normalize_weights
from ..router.request import Delta, FusionRequest, GenerateParams
from ..router.router import Overloaded, Router
from ..router.score import FusionChoice, Scorer
from .convert import (
    params_from_pb,
    response_to_pb,
    score_params_from_pb,
    score_to_pb,
    stream_to_pb,
)
from .errors import NotReady, ValidationError, status_for

log = logging.getLogger(__name__)


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    """Serves one ensemble through its router (None while engines start)."""

    def __init__(self, config) -> None:
        self.config = config
        self.router: Router | None = None
        self.draining = False
        # (rpc, status code name) -> None; the server points it at the metrics.
        self.on_rpc_done: Callable[[str, str], None] = lambda rpc, code: None
        self._scorer: Scorer | None = None
        self._scoring = 0  # Score requests in flight

    # -- request building --------------------------------------------------------
    def _router(self) -> Router:
        if self.router is None:
            raise NotReady("the ensemble's engines are starting; retry shortly")
        if self.draining:
            raise NotReady("the server is shutting down")
        return self.router

    def _choose(self, params) -> FusionChoice:
        """The request's policy, parameters, weights and roles, validated (Generate, Score)."""
        router = self._router()
        ensemble = router.ensemble
        fusion = self.config.fusion
        name = params.policy or fusion.policy
        if ":" in name and name != fusion.policy:  # never import client-chosen modules
            raise ValidationError(
                "fusion.policy",
                f"{name!r}: module:Class policies can only be set in the server config (fusion.policy)",
            )
        policy = router.policy(name)
        return FusionChoice(
            policy=policy,
            params=policy.validate_params({**fusion.params, **params.params}),
            weights=normalize_weights(
                ensemble.member_names,
                {m.name: m.config.weight for m in ensemble.members},
                params.weights,
            ),
            roles=policy.validate_roles(ensemble.member_names, {**fusion.roles, **params.roles}),
        )

    def _build(self, req: pb.GenerateRequest) -> FusionRequest:
        params: GenerateParams = params_from_pb(req, self.config.limits, self.config.fusion.top_k)
        choice = self._choose(params)
        ensemble = self._router().ensemble
        prompts = ensemble.encode_members(params.prompt)  # per member, its own ids
        prompt_ids = max(prompts, key=len)
        room = ensemble.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValidationError(
                "prompt",
                f"{len(prompt_ids)} tokens does not fit the members' context of "
                f"{ensemble.max_model_len} tokens",
            )
        return FusionRequest(
            params,
            prompts[0],
            choice.policy,
            choice.params,
            choice.weights,
            max_tokens=min(params.max_tokens, room),
            roles=choice.roles,
            member_prompt_ids=prompts,
        )

    async def _fail(self, rpc: str, context, err: BaseException) -> None:
        code, message = status_for(err)
        self.on_rpc_done(rpc, code.name)
        await context.abort(code, message)

    async def _run(
        self, req: pb.GenerateRequest, context, rpc: str
    ) -> AsyncIterator[tuple[str, Delta]]:
        """Submit a request and yield its deltas; always releases its sessions."""
        try:
            request = self._build(req)
            await self._router().admit(request)  # may wait in the queue
        except asyncio.CancelledError:  # left the queue: cancelled or past its deadline
            self.on_rpc_done(rpc, "CANCELLED")
            raise
        except Exception as err:
            await self._fail(rpc, context, err)
            return
        if self.config.server.log_prompts:
            log.debug("request %s prompt: %r", request.id, request.params.prompt)
        outcome = "CANCELLED"  # unless it finishes or fails below
        try:
            while True:
                event = await request.events.get()
                if isinstance(event, BaseException):
                    outcome = ""
                    await self._fail(rpc, context, event)
                    return
                yield request.id, event
                if event.finish_reason is not None:
                    outcome = "OK"
                    return
        finally:  # finished, failed, cancelled by the client, or past its deadline
            if outcome:
                self.on_rpc_done(rpc, outcome)
            await self.router.release(request)

    # -- RPCs --------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        deltas: list[Delta] = []
        request_id = ""
        async for request_id, delta in self._run(request, context, "Generate"):  # noqa: B007
            deltas.append(delta)
        return response_to_pb(request_id, deltas, self._stats_members(request))

    def _stats_members(self, request: pb.GenerateRequest) -> list[str] | None:
        if not request.output.member_details or self.router is None:
            return None
        return self.router.ensemble.member_names

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        async for request_id, delta in self._run(request, context, "GenerateStream"):  # noqa: B007
            yield stream_to_pb(request_id, delta, self._stats_members(request))

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        try:
            params = score_params_from_pb(request, self.config.limits)
            choice = self._choose(params)
            ensemble = self._router().ensemble
            prompt_ids = ensemble.encode(params.prompt)
            if not prompt_ids:
                raise ValidationError(
                    "prompt",
                    "must not be empty: the tokenizer adds no BOS token, so the first "
                    "continuation token would have no context",
                )
            cont_ids = ensemble.encode_continuation(params.continuation)
            total = len(prompt_ids) + len(cont_ids)
            if total >= ensemble.max_model_len:
                raise ValidationError(
                    "continuation",
                    f"prompt + continuation is {total} tokens; the members' context of "
                    f"{ensemble.max_model_len} tokens fits at most {ensemble.max_model_len - 1}",
                )
            limit = self.config.limits.max_concurrent_requests
            if self._scoring >= limit:
                raise Overloaded(f"{self._scoring} Score requests running (limit {limit})")
            if self._scorer is None or self._scorer.ensemble is not ensemble:
                self._scorer = Scorer(ensemble, self.config.fusion.top_k)
            self._scoring += 1
            try:
                result = await self._scorer.score(params, choice, prompt_ids, cont_ids)
            finally:
                self._scoring -= 1
        except Exception as err:
            await self._fail("Score", context, err)
            return pb.ScoreResponse()
        self.on_rpc_done("Score", "OK")
        return score_to_pb(result)

    async def GetEnsemble(self, request: pb.GetEnsembleRequest, context) -> pb.GetEnsembleResponse:
        try:
            router = self._router()
        except Exception as err:
            await self._fail("GetEnsemble", context, err)
            return pb.GetEnsembleResponse()
        ensemble = router.ensemble
        vocabs = ensemble.vocabs or [None] * len(ensemble.members)
        self.on_rpc_done("GetEnsemble", "OK")
        return pb.GetEnsembleResponse(
            members=[
                pb.MemberInfo(
                    name=m.name,
                    model=m.config.model,
                    weight=m.config.weight,
                    vocab_size=m.vocab_size,
                    tokenizer_fingerprint=v.fingerprint if v else ensemble.fingerprint,
                    tokenizer_kind=v.kind if v else ensemble.kind,
                    max_model_len=m.max_model_len,
                )
                for m, v in zip(ensemble.members, vocabs, strict=True)
            ],
            default_policy=self.config.fusion.policy,
            policies=[
                pb.PolicyInfo(
                    name=info["name"],
                    description=info["description"],
                    params=[pb.PolicyParamInfo(**p) for p in info["params"]],
                    roles=[
                        pb.PolicyRoleInfo(
                            name=r["name"],
                            description=r["description"],
                            min_members=r["min"],
                            max_members=r["max"] or 0,
                        )
                        for r in info["roles"]
                    ],
                )
                for info in describe_policies()
            ],
            alignment=router.alignment.name,
            top_k=self.config.fusion.top_k,
            max_tokens_limit=self.config.limits.max_tokens,
            default_max_tokens=self.config.limits.default_max_tokens,
        )

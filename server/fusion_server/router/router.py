"""The lock-step router: advance every request across all members, one fused token a step.

Contract: each live request has one resident session per member. When all of a
request's members have returned their top-k for the next position, the request is
*ready*. The loop takes every ready request at once, aligns, fuses and samples them
in one vectorised call, then advances each (stops, text delta, feed the chosen token
to every member). Requests never wait for each other: a request that is ready joins
the next batch, one still waiting on its members joins a later one.

Admission: at most `max_running` requests hold member sessions; up to `max_queued`
more wait in a FIFO queue for a slot (a cancelled or timed-out waiter just leaves it);
beyond that `admit` raises Overloaded at once.

Member failure: a member whose session fails (its engine died) ends the request
(the error maps to UNAVAILABLE), or, with `degrade`, is dropped from that request:
weight 0, an empty top-k (the no-opinion fill) from then on, and the request's
`members_left` says who remains. A member holding a policy role, or the last live
member, cannot be dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable

import numpy as np

from ..engines.member import EngineUnavailable
from ..fusion.candidates import MemberTopK
from ..fusion.policies import Policy, resolve_policy
from ..fusion.sampler import sample
from .alignment import Pick, make_alignment
from .ensemble import Ensemble
from .request import Delta, FinishReason, FusionRequest, MemberDetail, TokenDetail
from .stats import RouterStats

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """Too many requests are running; the caller should retry later."""


class Router:
    """Owns the decode loop over an Ensemble of started members."""

    def __init__(
        self,
        ensemble: Ensemble,
        max_running: int,
        stats: RouterStats | None = None,
        max_queued: int = 0,
        degrade: bool = False,
        alignment: str | None = None,
    ):
        self.ensemble = ensemble
        self.alignment = make_alignment(ensemble, alignment)  # shared ids or bytes
        self.max_running = max_running
        self.max_queued = max_queued
        self.degrade = degrade
        self.stats = stats or RouterStats()
        self.running: dict[str, FusionRequest] = {}
        self._queue: collections.deque[asyncio.Future] = collections.deque()
        self._granted = 0  # slots handed to queued requests that have not submitted yet
        self._closing: set[asyncio.Task] = set()  # releases still closing sessions
        # Called when a member's engine fails under a request (the server's watchdog).
        self.on_engine_failure: Callable[[], None] = lambda: None
        self._ready: list[FusionRequest] = []
        self._wake = asyncio.Event()
        self._policies: dict[type[Policy], Policy] = {}
        self._by_name: dict[str, Policy] = {}
        self._loop_task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="router")

    async def stop(self) -> None:
        for request in list(self.running.values()):
            await self.release(request)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    def policy(self, name: str) -> Policy:
        """The shared instance of a policy class (by name or module:Class).

        Names are resolved once (entry-point lookups are not cheap); names that
        resolve to the same class share one instance, so their requests fuse together.
        """
        policy = self._by_name.get(name)
        if policy is None:
            klass = resolve_policy(name)
            if klass not in self._policies:
                self._policies[klass] = klass(self.ensemble.member_names)
            policy = self._by_name[name] = self._policies[klass]
        return policy

    # -- requests --------------------------------------------------------------
    @property
    def queued(self) -> int:
        return sum(not slot.done() for slot in self._queue)

    def _has_room(self) -> bool:
        return len(self.running) + self._granted < self.max_running

    async def admit(self, request: FusionRequest) -> None:
        """Submit the request now, or after waiting in the bounded queue for a slot."""
        if not self.queued and self._has_room():
            self.submit(request)
            return
        if self.queued >= self.max_queued:
            raise Overloaded(
                f"{len(self.running)} requests running and {self.queued} queued "
                f"(limits {self.max_running} and {self.max_queued})"
            )
        slot = asyncio.get_running_loop().create_future()
        self._queue.append(slot)
        self.stats.on_queue(self.queued)
        try:
            await slot
        except asyncio.CancelledError:  # the caller left (cancelled, deadline)
            if slot.done() and not slot.cancelled():  # granted meanwhile: pass it on
                self._granted -= 1
                self._grant()
            with contextlib.suppress(ValueError):
                self._queue.remove(slot)
            self.stats.on_queue(self.queued)
            raise
        self._granted -= 1
        try:
            self.submit(request)
        except BaseException:
            self._grant()
            raise

    def _grant(self) -> None:
        """Hand free running slots to the oldest waiters."""
        while self._queue and self._has_room():
            slot = self._queue.popleft()
            if not slot.done():
                self._granted += 1
                slot.set_result(None)
        self.stats.on_queue(self.queued)

    def submit(self, request: FusionRequest) -> None:
        """Open the request's member sessions and send its prompt to every member."""
        if not self._has_room():
            raise Overloaded(f"{len(self.running)} requests running (limit {self.max_running})")
        # open_session does no I/O (a session starts with its first send), so a
        # member that refuses leaves nothing to clean up in the others.
        request.sessions = [member.open_session(request.id) for member in self.ensemble.members]
        self.running[request.id] = request
        request.started = time.perf_counter()
        self.stats.on_submit(request)
        self._feed_each(request, self.alignment.prompts(request))

    async def release(self, request: FusionRequest) -> None:
        """End a request's member sessions (finished, failed, cancelled or timed out).

        The cleanup runs to the end even when our caller is cancelled meanwhile (a gRPC
        handler can be cancelled again while it releases): the caller gets its
        CancelledError at once, the sessions are still closed.
        """
        if self.running.pop(request.id, None) is None:
            return
        cleanup = asyncio.get_running_loop().create_task(self._close(request))
        self._closing.add(cleanup)
        cleanup.add_done_callback(self._closing.discard)
        await asyncio.shield(cleanup)

    async def _close(self, request: FusionRequest) -> None:
        try:
            task = request.step_task
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task})
            await asyncio.gather(*(s.close() for s in request.sessions), return_exceptions=True)
        finally:
            self.stats.on_release(request)
            self._grant()

    def _feed_each(self, request: FusionRequest, ids: list[list[int]]) -> None:
        """Append each member's own ids (byte alignment: they differ), then step."""
        for pending, own in zip(request.pending, ids, strict=True):
            pending.extend(own)
        self._feed(request, [])

    def _feed(self, request: FusionRequest, ids: list[int]) -> None:
        request.step_task = asyncio.get_running_loop().create_task(self._step(request, ids))

    async def _step(self, request: FusionRequest, ids: list[int]) -> None:
        """Step the request's members concurrently, then mark it ready.

        Every member gets `ids` (appended to what it has not been sent yet). A gated
        policy asks its primary first; the others are consulted, catching up on all
        their pending ids in one chunk, only when the primary is unsure.
        """
        t0 = time.perf_counter()
        policy = request.policy
        for pending in request.pending:
            pending.extend(ids)
        first = request.completion_tokens == 0
        n = len(request.sessions)
        try:
            if policy.gated:
                primary = request.roles["primary"][0]
                (top,) = await self._ask(request, [primary], first)
                confident = policy.confident(_pad([top.logprobs]), [request.policy_params])[0]
                if confident:
                    request.consulted = [m == primary for m in range(n)]
                    request.tops = [top] * n  # the primary decides alone
                else:
                    others = [m for m in range(n) if m != primary]
                    tops = dict(zip(others, await self._ask(request, others, first), strict=True))
                    tops[primary] = top
                    request.consulted = [m not in request.dropped for m in range(n)]
                    request.tops = [tops[m] for m in range(n)]
            else:
                request.tops = await self._ask(request, range(n), first)
                request.consulted = [m not in request.dropped for m in range(n)]
            if first and policy.needs_prompt_nll:
                nll = np.array([s.prompt_nll for s in request.sessions])
                request.weights = policy.prompt_weights(nll, request.weights, request.policy_params)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # engine died, engine rejected input, ...
            if is_engine_failure(err):
                self.on_engine_failure()
            self._fail(request, err)
            return
        self.stats.on_fanout(time.perf_counter() - t0)
        self._ready.append(request)
        self._wake.set()

    async def _ask(self, request: FusionRequest, members, first: bool) -> list:
        """Send each member its pending ids, then collect their top-k (no task per member).

        A member with nothing pending (byte alignment: it holds the chosen bytes back)
        is not stepped; its last top-k still stands. A dropped member (degraded request)
        answers with an empty top-k.
        """
        members = list(members)
        want_nll = first and request.policy.needs_prompt_nll
        sent = []
        for m in members:
            if m in request.dropped or not (request.pending[m] or request.own_tops[m] is None):
                continue
            try:
                request.sessions[m].send(request.pending[m], prompt_nll=want_nll)
                sent.append(m)
            except Exception as err:
                self._drop(request, m, err)
            request.pending[m] = []
        for m in sent:
            try:
                request.own_tops[m] = await request.sessions[m].receive()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._drop(request, m, err)
        return [_NO_OPINION if m in request.dropped else request.own_tops[m] for m in members]

    def _drop(self, request: FusionRequest, m: int, err: Exception) -> None:
        """Continue `request` without member m, or re-raise `err` when that is not allowed."""
        holds_role = any(m in members for members in request.roles.values())
        left = len(request.sessions) - len(request.dropped) - 1
        if not (self.degrade and is_engine_failure(err)) or holds_role or left < 1:
            raise err
        self.on_engine_failure()
        name = self.ensemble.member_names[m]
        log.warning("request %s continues without member %s: %s", request.id, name, err)
        request.dropped.add(m)
        live = np.array([i not in request.dropped for i in range(len(request.sessions))], float)
        weights = request.weights * live
        if weights.sum() <= 0:  # the lost member had all the weight: share it evenly
            weights = live
        request.weights = weights / weights.sum()

    # -- the loop --------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ready = [r for r in self._ready if r.id in self.running and not r.finished]
            self._ready.clear()
            if not ready:
                continue
            try:
                self._advance_batch(ready)
            except Exception as err:  # a bug must fail these requests, not the server
                log.exception("router step failed")
                for request in ready:
                    self._fail(request, err)

    def _advance_batch(self, ready: list[FusionRequest]) -> None:
        t0 = time.perf_counter()
        batch = self.alignment.align(ready)
        # batch.logprobs: [R, M, C]; batch.mask: [R, C]
        fused = np.full(batch.mask.shape, -np.inf)  # [R, C]
        groups: dict[int, list[int]] = {}
        for i, request in enumerate(ready):
            groups.setdefault(id(request.policy), []).append(i)
        failed: set[int] = set()
        for rows in groups.values():
            idx = np.asarray(rows)
            policy = ready[rows[0]].policy
            weights = np.stack([ready[i].weights for i in rows])  # [G, M]
            params = [ready[i].policy_params for i in rows]
            args = (batch.logprobs[idx], batch.mask[idx], weights, params)
            if policy.roles:  # older third-party policies take no roles argument
                args += ([ready[i].roles for i in rows],)
            try:
                fused[idx] = policy.fuse(*args)
            except Exception as err:  # e.g. a third-party policy: fail only its requests
                log.exception("policy %s failed", type(policy).__name__)
                for i in rows:
                    self._fail(ready[i], err)
                failed.update(rows)
                fused[idx] = np.where(batch.mask[idx], 0.0, -np.inf)  # placeholder, unused
        temperature = np.array([r.params.temperature for r in ready])
        uniforms = np.array([r.rng.uniform() for r in ready])  # one draw per request and step
        if not temperature.any():  # all greedy: argmax (first max = lowest candidate index)
            choice = np.argmax(np.where(batch.mask, fused, -np.inf), axis=-1)
        else:
            choice = sample(
                fused,
                batch.mask,
                temperature,
                np.array([r.params.top_p for r in ready]),
                np.array([r.params.top_k for r in ready], dtype=np.int64),
                uniforms,
            )  # [R] candidate index
        self.stats.on_fuse(time.perf_counter() - t0, len(ready))
        for i, request in enumerate(ready):
            if i in failed:
                continue
            try:
                self._advance(request, batch, fused, i, int(choice[i]))
            except Exception as err:
                log.exception("advancing request %s failed", request.id)
                self._fail(request, err)

    @staticmethod
    def _fail(request: FusionRequest, err: BaseException) -> None:
        if request.error is None:
            request.error = err
            request.events.put_nowait(err)

    def _advance(self, request: FusionRequest, batch, fused, i: int, c: int) -> None:
        """Apply the chosen candidate: stops, text delta, feed members."""
        pick: Pick = self.alignment.pick(request, batch, i, c)
        request.completion_tokens += 1
        agree = pick.agree
        self.stats.on_token(request, agree)
        step = request.stats
        if all(c or m in request.dropped for m, c in enumerate(request.consulted)):
            step.fused_steps += 1
        else:
            step.primary_only_steps += 1
        for m, consulted in enumerate(request.consulted):
            if consulted:
                step.consulted[m] += 1
                step.agreed[m] += agree[m]
        is_eos = pick.eos and not request.params.ignore_eos
        text = "" if is_eos else request.text.push(pick.data)
        details = (
            [self._detail(request, batch, fused, i, c)] if self._wants_details(request) else []
        )
        finish = None
        if is_eos:
            finish = FinishReason.EOS
        elif request.text.stopped:
            finish = FinishReason.STOP
        elif request.completion_tokens >= request.max_tokens or pick.overflow:
            finish = FinishReason.LENGTH
        if finish is not None:
            text += request.text.finish() if finish is not FinishReason.STOP else ""
            request.finish_reason = finish
        request.events.put_nowait(
            Delta(
                text=text,
                tokens=details,
                finish_reason=finish,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=request.completion_tokens,
                stats=self._final_stats(request) if finish is not None else None,
            )
        )
        if finish is None:
            self._feed_each(request, pick.feed)

    def _final_stats(self, request: FusionRequest):
        names = self.ensemble.member_names
        request.stats.weights = {n: float(w) for n, w in zip(names, request.weights, strict=True)}
        request.stats.members = [n for m, n in enumerate(names) if m not in request.dropped]
        return request.stats

    @staticmethod
    def _wants_details(request: FusionRequest) -> bool:
        return request.params.logprobs > 0 or request.params.member_details

    def _detail(self, request: FusionRequest, batch, fused, i: int, c: int) -> TokenDetail:
        label = self.alignment.label
        token, text = label(request, batch, i, c)
        detail = TokenDetail(token_id=token, text=text, logprob=float(fused[i, c]))
        n = request.params.logprobs
        if n:
            order = np.argsort(-fused[i], kind="stable")[:n]
            detail.top_logprobs = [
                (*label(request, batch, i, j), float(fused[i, j]))
                for j in order
                if batch.mask[i, j]
            ]
        if request.params.member_details:
            detail.members = [
                MemberDetail(
                    member=name,
                    logprob=float(batch.logprobs[i, m, c]),
                    top_token_id=int(request.tops[m].ids[np.argmax(request.tops[m].logprobs)]),
                )
                for m, name in enumerate(self.ensemble.member_names)
                if request.consulted[m]
            ]
        return detail


def is_engine_failure(err: BaseException) -> bool:
    """A member engine died or is down (as opposed to a bad input or a bug)."""
    return isinstance(err, EngineUnavailable) or type(err).__name__ in (
        "EngineDeadError",
        "EngineGenerateError",
    )


_NO_OPINION = MemberTopK(ids=np.empty(0, np.int64), logprobs=np.empty(0))
"""A dropped member's top-k: nothing reported, so alignment gives it the no-opinion fill."""


def _pad(rows: list[np.ndarray]) -> np.ndarray:
    """Stack 1-D arrays of different lengths into [R, K], padded with -inf."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), -np.inf)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out

"""One ensemble member: a vLLM AsyncLLM engine and its per-request sessions.

Contract: a Session is one resident vLLM streaming-input request. Its first
`send(ids)` sends the prompt ids, every later `send(ids)` only the new ids; each
`receive()` returns the member's top-k for the next position. The engine keeps the KV
cache between steps, so no prefix is ever re-sent. This module knows nothing about
fusion, text or other members. vLLM is imported lazily (client installs lack it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import numpy as np

from ..config import MemberConfig
from ..fusion.candidates import MemberTopK

log = logging.getLogger(__name__)

_END = object()


class EngineUnavailable(RuntimeError):
    """The member's engine is not running (not started, shut down or dead)."""


class EngineObserver(Protocol):
    """Receives per-member engine figures (metrics.py turns them into gauges)."""

    def engine_step(self, member: str, running: int, waiting: int, kv_usage: float) -> None:
        """vLLM's scheduler figures, once per engine output batch."""

    def member_step(self, member: str, seconds: float) -> None:
        """One session step: send to the member's top-k back."""


def _stat_logger_factory(member: Member):
    """A vLLM StatLoggerBase factory reporting scheduler figures to `member.observer`.

    vLLM's own Prometheus logger keeps one global registry (a second engine in the
    process unregisters the first one's metrics), so the members report through
    this logger instead and metrics.py labels the figures with the member's name.
    Streaming-input sessions waiting for their next chunk are not "running" in
    vLLM's count.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class MemberStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None and member.observer is not None:
                member.observer.engine_step(
                    member.name,
                    scheduler_stats.num_running_reqs,
                    scheduler_stats.num_waiting_reqs,
                    scheduler_stats.kv_cache_usage,
                )

        def log_engine_initialized(self) -> None:
            pass

    return MemberStatLogger


class Member:
    """A named vLLM engine hosting one source model."""

    def __init__(self, config: MemberConfig, top_k: int) -> None:
        self.config = config
        self.name = config.name
        self.top_k = top_k
        self.llm: Any = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.restarts = 0
        self.observer: EngineObserver | None = None
        self._sampling_params: Any = None

    async def start(self) -> None:
        """Start the engine (its EngineCore process) and wait until it is ready.

        The engine is built in a worker thread (vLLM's start-up blocks for seconds
        to minutes), so the event loop keeps serving health checks and the other
        members' requests meanwhile.
        """
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        settings = dict(self.config.engine)
        threads = settings.pop("cpu_threads", None)
        settings.setdefault("max_logprobs", max(20, self.top_k))
        # vLLM's own Prometheus logger unregisters other engines' collectors.
        settings.setdefault("disable_log_stats", True)
        # The router tokenizes and detokenizes itself; vLLM's per-chunk input handling
        # is cheaper without a tokenizer (measured: ~20% less router CPU per token).
        settings.setdefault("skip_tokenizer_init", True)
        args = AsyncEngineArgs(model=str(self.config.model), **settings)
        # VLLM_CPU_OMP_THREADS_BIND is read by the engine process at spawn time.
        saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        if threads is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(threads)
        try:
            self.llm = await asyncio.to_thread(
                AsyncLLM.from_engine_args, args, stat_loggers=[_stat_logger_factory(self)]
            )
        finally:
            if threads is not None:
                if saved is None:
                    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
                else:
                    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
        self.max_model_len = self.llm.model_config.max_model_len
        self.vocab_size = self.llm.model_config.get_vocab_size()
        self._sampling_params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=self.top_k,
            detokenize=False,
            flat_logprobs=True,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=False,
        )
        # First chunk of a session whose policy weighs members by prompt perplexity.
        self._prompt_nll_params = self._sampling_params.clone()
        self._prompt_nll_params.prompt_logprobs = 0
        # vLLM decides this in __post_init__ (not on clone): a prefix-cache hit would
        # leave the cached positions' prompt log-probs unset (garbage on vllm-cpu 0.32).
        self._prompt_nll_params.skip_reading_prefix_cache = True
        log.info("member %s: engine process %s", self.name, self.engine_pid)

    @property
    def engine_pid(self) -> int | None:
        """PID of the member's EngineCore process (None when not started)."""
        try:
            return self.llm.engine_core.resources.engine_manager.processes[0].pid
        except (AttributeError, IndexError):
            return None

    async def restart(self) -> None:
        """Replace a dead (or live) engine with a fresh one."""
        self.shutdown()
        self.restarts += 1
        await self.start()

    async def score(self, request_id: str, ids: list[int], top_k: int):
        """One teacher-forced prefill of `ids` (a one-shot request, prompt_logprobs=top_k).

        Returns numpy arrays for the targets ids[1:] (position p scores ids[p] given
        ids[:p]): actual [N-1] the log-prob of each actual token, top_ids [N-1, K] and
        top_logprobs [N-1, K] the member's top-K at each position (full-vocabulary
        log-softmax, like the decode steps).
        """
        if not self.running:
            raise EngineUnavailable(f"member {self.name!r} is not running")
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = self._sampling_params.clone()
        params.logprobs = None
        params.prompt_logprobs = top_k
        params.skip_reading_prefix_cache = True  # see _prompt_nll_params
        params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        prompt = TokensPrompt(prompt_token_ids=list(ids))
        async for out in self.llm.generate(prompt, params, f"{request_id}:{self.name}"):
            final = out
        return _prompt_arrays(final.prompt_logprobs, len(ids), top_k)

    @property
    def running(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def open_session(self, request_id: str) -> Session:
        if not self.running:
            raise EngineUnavailable(f"member {self.name!r} is not running")
        return Session(self, f"{request_id}:{self.name}")

    def num_engine_requests(self) -> int:
        """Requests the engine front-end still tracks (0 when every session ended)."""
        if self.llm is None:
            return 0
        return len(self.llm.output_processor.request_states)

    def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.shutdown()
            except Exception:  # a dead engine may fail to shut down cleanly
                log.exception("member %s: engine shutdown failed", self.name)


class Session:
    """One request's resident streaming-input session on one member."""

    def __init__(self, member: Member, request_id: str) -> None:
        self.member = member
        self.request_id = request_id
        self.num_tokens = 0
        self._inputs: asyncio.Queue = asyncio.Queue()
        self._outputs: AsyncIterator[Any] | None = None
        self._closed = False
        self._sent_at = 0.0
        self.prompt_nll = 0.0

    async def _input_stream(self):
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs import TokensPrompt

        while True:
            item = await self._inputs.get()
            if item is _END:
                return
            ids, params = item
            yield StreamingInput(prompt=TokensPrompt(prompt_token_ids=ids), sampling_params=params)

    def send(self, ids: list[int], prompt_nll: bool = False) -> None:
        """Queue ids for the engine without waiting (pair with `receive`).

        prompt_nll (first chunk only): also compute the member's mean negative
        log-likelihood of these ids, left in `self.prompt_nll` by `receive`.
        """
        if self._closed:
            raise RuntimeError(f"session {self.request_id} is closed")
        llm = self.member.llm
        if llm is None or llm.errored:
            raise EngineUnavailable(f"member {self.member.name!r} is not running")
        if self._outputs is None:
            self._outputs = llm.generate(
                self._input_stream(), self.member._sampling_params, self.request_id
            )
        self.num_tokens += len(ids)
        self._sent_at = time.perf_counter()
        params = self.member._prompt_nll_params if prompt_nll else None
        self._inputs.put_nowait((list(ids), params))

    async def receive(self) -> MemberTopK:
        """The member's top-k for the next position after the last `send`."""
        out = await anext(self._outputs)
        observer = self.member.observer
        if observer is not None:
            observer.member_step(self.member.name, time.perf_counter() - self._sent_at)
        if out.prompt_logprobs:
            self.prompt_nll = _mean_nll(out.prompt_logprobs)
        flat = out.outputs[0].logprobs
        start, end = flat.start_indices[-1], flat.end_indices[-1]
        token_ids = flat.token_ids[start:end]
        logprobs = flat.logprobs[start:end]
        # The first entry is the engine's own sampled token (greedy = its top-1),
        # followed by the ranked top-k; drop duplicates.
        if len(token_ids) > 1 and token_ids[0] in token_ids[1:]:
            token_ids, logprobs = token_ids[1:], logprobs[1:]
        return MemberTopK(
            ids=np.asarray(token_ids, dtype=np.int64),
            logprobs=np.asarray(logprobs, dtype=np.float64),
        )

    async def close(self) -> None:
        """End the session; the engine frees the request and its KV cache."""
        if self._closed:
            return
        self._closed = True
        self._inputs.put_nowait(_END)
        if self._outputs is not None:
            with contextlib.suppress(Exception):
                await self._outputs.aclose()  # aborts the request in the engine


def _mean_nll(prompt_logprobs) -> float:
    """Mean negative log-likelihood of the prompt's tokens (position 0 has none)."""
    values = [lp for lp in getattr(prompt_logprobs, "logprobs", [])]
    if not values:  # dict-per-position form
        values = [next(iter(d.values())).logprob for d in prompt_logprobs if d]
    return -sum(values) / len(values) if values else 0.0


def _prompt_arrays(flat, n: int, k: int):
    """FlatLogprobs of n prompt positions (entry 0 empty; then [actual, top-1..top-k])
    -> (actual [n-1], top_ids [n-1, k], top_logprobs [n-1, k])."""
    starts = np.asarray(flat.start_indices[1:n], dtype=np.int64)  # [n-1]
    ids = np.asarray(flat.token_ids, dtype=np.int64)
    lps = np.asarray(flat.logprobs, dtype=np.float64)
    actual = lps[starts]
    cols = starts[:, None] + 1 + np.arange(k)  # [n-1, k]
    return actual, ids[cols], lps[cols]

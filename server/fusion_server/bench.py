"""`fusion bench`: fused throughput vs. each member alone vs. naive per-step fusion.

Contract: one process, one run, one started Ensemble shared by every driver, so the
ratios between drivers are measured under the same conditions (the absolute figures
move with the machine and whatever else runs on it). Drivers, per concurrency level:

- ``alone``: each member by itself, continuous decode of N tokens per request
  (``AsyncLLM.generate`` with ``max_tokens=N``): output tokens/s.
- ``naive``: per request and per step, a fresh vLLM request on every member with the
  whole prefix (``max_tokens=1``, top-k logprobs), the members' top-k fused with the
  same ``align_shared`` + policy + greedy ``sample`` as the router, token appended,
  N steps: fused tokens/s.
- ``fused``: fusion-serve's Router on resident streaming-input sessions: fused tokens/s.

Every driver runs the same prompts (a few lines of Python source each, different per
request), ``conc`` closed-loop workers, the same number of requests. The "harmonic
limit" ``1 / sum_i(1 / alone_i)`` is what lock-step fusion would reach if the
members' work were its only cost. Engines start here, so callers must be
``if __name__ == "__main__"``-safe (the ``fusion bench`` entry point is).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import logging
import math
import os
import pathlib
import platform
import statistics
import sys
import sysconfig
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from .config import EnsembleConfig

log = logging.getLogger(__name__)

MIN_REQUESTS = 32
"""Requests per driver and level at least (rounded up to a multiple of the level)."""
REPEATS = 3
"""Each level runs every driver this many times, interleaved; the table shows medians."""
MIN_SECONDS = 2.0
"""A driver repeats a level's requests (same prompts) until it has run this long."""
WARMUP_REQUESTS = 4
"""Warm-up requests per driver (also used to check naive == router token for token)."""
MAX_PROMPT_TOKENS = 96
"""Prompts longer than this (in the shared tokenizer) are skipped."""
PROMPT_SOURCES = (
    "ast.py",
    "difflib.py",
    "heapq.py",
    "shlex.py",
    "tokenize.py",
    "fractions.py",
    "statistics.py",
    "calendar.py",
    "bisect.py",
    "contextlib.py",
)
"""Standard-library modules the prompts are cut from (not in the demo tokenizer's corpus)."""


# -- prompts ---------------------------------------------------------------------------
def make_prompts(count: int, lines_per_prompt: int = 4) -> list[str]:
    """`count` distinct prompts of a few consecutive non-blank lines of Python source."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    prompts: list[str] = []
    seen: set[str] = set()
    for name in PROMPT_SOURCES:
        try:
            lines = (stdlib / name).read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        lines = [ln.rstrip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        for start in range(0, len(lines) - lines_per_prompt, 11):
            text = "\n".join(lines[start : start + lines_per_prompt]) + "\n"
            if len(text) > 300 or text in seen:
                continue
            seen.add(text)
            prompts.append(text)
    # Interleave the sources so that neighbouring requests differ in content.
    by_source = [prompts[i :: len(PROMPT_SOURCES)] for i in range(len(PROMPT_SOURCES))]
    mixed = [p for group in itertools.zip_longest(*by_source) for p in group if p is not None]
    i = 0
    while len(mixed) < count:  # no stdlib sources: synthesise distinct code lines
        mixed.append(f"def f{i}(x, y={i}):\n    z = x * {i} + y\n    return z - {i % 7}\n")
        i += 1
    return mixed


# -- results ---------------------------------------------------------------------------
@dataclass
class LevelResult:
    conc: int
    requests: int
    alone: dict[str, float] = field(default_factory=dict)
    naive: float = 0.0
    fused: float = 0.0
    fuse_rows_per_call: float = 0.0
    fuse_us_per_row: float = 0.0
    fused_cpu_us: float = 0.0
    """CPU time of this (router) process per fused token, all threads."""
    runs: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)
    """Per driver, per repeat: (tokens/s, wall seconds, passes over the level's requests)."""

    @property
    def limit(self) -> float:
        rates = list(self.alone.values())
        if not rates or any(r <= 0 for r in rates):
            return 0.0
        return 1.0 / sum(1.0 / r for r in rates)


def _total(conc: int) -> int:
    """Requests per driver at one level: at least MIN_REQUESTS, a multiple of conc."""
    return conc * max(1, math.ceil(MIN_REQUESTS / conc))


async def _closed_loop(conc: int, total: int, one: Callable[[int], Awaitable[int]]):
    """Run requests 0..total-1 on `conc` workers; returns (tokens, seconds)."""
    indices = iter(range(total))  # shared: each worker takes the next request

    async def worker() -> int:
        tokens = 0
        for i in indices:
            tokens += await one(i)
        return tokens

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(worker() for _ in range(conc)))
    return sum(counts), time.perf_counter() - t0


async def _measure(conc: int, total: int, one: Callable[[int], Awaitable[int]]):
    """Passes of `_closed_loop` until MIN_SECONDS have passed; returns (tok/s, s, passes)."""
    tokens, seconds, passes = 0, 0.0, 0
    while seconds < MIN_SECONDS:
        t, s = await _closed_loop(conc, total, one)
        tokens, seconds, passes = tokens + t, seconds + s, passes + 1
    return tokens / seconds, seconds, passes


async def run_request(router, request) -> tuple[int, list[int]]:
    """Submit to the router, read to the end, release: (completion tokens, detail ids)."""
    router.submit(request)
    tokens: list[int] = []
    try:
        while True:
            event = await request.events.get()
            if isinstance(event, BaseException):
                raise event
            tokens.extend(t.token_id for t in event.tokens)
            if event.finish_reason is not None:
                return event.completion_tokens, tokens
    finally:
        await router.release(request)


def footer() -> list[str]:
    """Date and command lines that end every bench report."""
    return [
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "Command:",
        "",
        "```",
        _command(),
        "```",
        "",
    ]


# -- the benchmark ---------------------------------------------------------------------
class _Bench:
    def __init__(self, ensemble, config: EnsembleConfig, policy_name: str, max_tokens: int):
        from vllm import SamplingParams

        from .fusion.policies import normalize_weights
        from .router.router import Router

        self.ensemble = ensemble
        self.config = config
        self.n = max_tokens
        self.router = Router(ensemble, max_running=10_000)
        self.policy = self.router.policy(policy_name)
        self.policy_params = self.policy.validate_params(dict(config.fusion.params))
        self.weights = normalize_weights(
            ensemble.member_names, {m.name: m.config.weight for m in ensemble.members}, {}
        )
        self.policy_name = policy_name
        top_k = config.fusion.top_k
        self.alone_params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        )
        self.naive_params = SamplingParams(
            max_tokens=1, logprobs=top_k, temperature=0.0, detokenize=False, flat_logprobs=True
        )
        self.prompts: list[str] = []
        self.prompt_ids: list[list[int]] = []
        self.tag = uuid.uuid4().hex[:8]

    def set_prompts(self, count: int) -> None:
        room = self.ensemble.max_model_len - self.n - 1
        limit = min(MAX_PROMPT_TOKENS, room)
        for text in make_prompts(count * 3):
            ids = self.ensemble.encode(text)
            if 0 < len(ids) <= limit:
                self.prompts.append(text)
                self.prompt_ids.append(ids)
            if len(self.prompts) >= count:
                break
        if len(self.prompts) < count:
            raise RuntimeError(f"only {len(self.prompts)} prompts fit, need {count}")

    def _rid(self, driver: str, i: int) -> str:
        return f"bench-{self.tag}-{driver}-{i}-{uuid.uuid4().hex[:6]}"

    # -- driver 1: one member alone ----------------------------------------------------
    async def alone_one(self, member, i: int) -> int:
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=self.prompt_ids[i])
        final = None
        async for out in member.llm.generate(prompt, self.alone_params, self._rid("alone", i)):
            final = out
        return len(final.outputs[0].token_ids)

    # -- driver 2: naive fusion, a fresh request per member per step -------------------
    async def _naive_top(self, member, ids: list[int], rid: str):
        from vllm.inputs import TokensPrompt

        from .fusion.candidates import MemberTopK

        final = None
        async for out in member.llm.generate(
            TokensPrompt(prompt_token_ids=ids), self.naive_params, rid
        ):
            final = out
        flat = final.outputs[0].logprobs
        start, end = flat.start_indices[-1], flat.end_indices[-1]
        token_ids, logprobs = flat.token_ids[start:end], flat.logprobs[start:end]
        if len(token_ids) > 1 and token_ids[0] in token_ids[1:]:  # sampled token first
            token_ids, logprobs = token_ids[1:], logprobs[1:]
        return MemberTopK(
            ids=np.asarray(token_ids, dtype=np.int64),
            logprobs=np.asarray(logprobs, dtype=np.float64),
        )

    async def naive_tokens(self, i: int) -> list[int]:
        from .fusion.candidates import align_shared
        from .fusion.sampler import sample

        ids = list(self.prompt_ids[i])
        out: list[int] = []
        rid = self._rid("naive", i)
        for step in range(self.n):
            tops = await asyncio.gather(
                *(self._naive_top(m, ids, f"{rid}-{step}-{m.name}") for m in self.ensemble.members)
            )
            batch = align_shared([tops], self.ensemble.vocab_size)
            fused = self.policy.fuse(
                batch.logprobs, batch.mask, self.weights[None, :], [self.policy_params]
            )
            c = sample(
                fused,
                batch.mask,
                np.zeros(1),
                np.ones(1),
                np.zeros(1, dtype=np.int64),
                np.zeros(1),
            )[0]
            token = int(batch.ids[0, c])
            ids.append(token)
            out.append(token)
        return out

    async def naive_one(self, i: int) -> int:
        return len(await self.naive_tokens(i))

    # -- driver 3: fusion-serve's router -----------------------------------------------
    def build_request(self, i: int, details: bool = False):
        """A FusionRequest as the servicer's _build makes one."""
        from .router.request import FusionRequest, GenerateParams

        ids = self.prompt_ids[i]
        params = GenerateParams(
            request_id=self._rid("fused", i),
            prompt=self.prompts[i],
            max_tokens=self.n,
            temperature=0.0,
            ignore_eos=True,
            policy=self.policy_name,
            logprobs=1 if details else 0,
        )
        return FusionRequest(
            params,
            list(ids),
            self.policy,
            self.policy_params,
            self.weights.copy(),
            max_tokens=min(self.n, self.ensemble.max_model_len - len(ids)),
        )

    async def fused_run(self, i: int, details: bool = False) -> tuple[int, list[int]]:
        return await run_request(self.router, self.build_request(i, details))

    async def fused_one(self, i: int) -> int:
        return (await self.fused_run(i))[0]

    # -- orchestration -------------------------------------------------------------------
    async def warm_up(self) -> tuple[int, int]:
        """A few requests through every driver; returns (naive == router, checked)."""
        k = WARMUP_REQUESTS
        for member in self.ensemble.members:
            await _closed_loop(k, k, lambda i, m=member: self.alone_one(m, i))
        naive = await asyncio.gather(*(self.naive_tokens(i) for i in range(k)))
        fused = await asyncio.gather(*(self.fused_run(i, details=True) for i in range(k)))
        same = sum(a == b[1] for a, b in zip(naive, fused, strict=True))
        return same, k

    async def level(self, conc: int, repeats: int) -> LevelResult:
        """Every driver `repeats` times, interleaved; rates are the medians."""
        total = _total(conc)
        result = LevelResult(conc=conc, requests=total)
        drivers: list[tuple[str, Callable[[int], Awaitable[int]]]] = [
            (f"alone:{m.name}", lambda i, m=m: self.alone_one(m, i)) for m in self.ensemble.members
        ]
        drivers += [("naive", self.naive_one), ("fused", self.fused_one)]
        stats = self.router.stats
        before = (stats.fuse_calls, stats.fused_rows, stats.fuse_seconds)
        fused_tokens, fused_cpu = 0, 0.0
        for _ in range(repeats):
            for name, one in drivers:
                tokens_before, cpu_before = stats.tokens, time.process_time()
                rate, secs, passes = await _measure(conc, total, one)
                result.runs.setdefault(name, []).append((rate, secs, passes))
                if name == "fused":
                    fused_tokens += stats.tokens - tokens_before
                    fused_cpu += time.process_time() - cpu_before
        median = {name: statistics.median(r[0] for r in runs) for name, runs in result.runs.items()}
        result.alone = {m.name: median[f"alone:{m.name}"] for m in self.ensemble.members}
        result.naive, result.fused = median["naive"], median["fused"]
        if fused_tokens:
            result.fused_cpu_us = fused_cpu / fused_tokens * 1e6
        calls = stats.fuse_calls - before[0]
        rows = stats.fused_rows - before[1]
        fuse_s = stats.fuse_seconds - before[2]
        result.fuse_rows_per_call = rows / calls if calls else 0.0
        result.fuse_us_per_row = fuse_s / rows * 1e6 if rows else 0.0
        return result


# -- report ----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv else "fusion"
    if prog in ("__main__.py", "cli.py", "-c", ""):
        prog = "python -m fusion_server"
    return " ".join([prog, *sys.argv[1:]])


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def render(
    results: list[LevelResult],
    member_names: list[str],
    facts: list[tuple[str, str]],
    args: argparse.Namespace,
) -> str:
    head = (
        ["conc"]
        + [f"{n} alone" for n in member_names]
        + ["harmonic limit", "naive", "fused", "fused/naive", "fused/limit"]
        + ["fuse rows/call", "fuse µs/row", "router CPU µs/token"]
    )
    lines = [
        f"# fusion-serve throughput (tokens/s, {args.max_tokens} tokens/request, greedy, "
        f"policy `{args.policy}`; medians of interleaved repeats)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" for _ in head) + "|",
    ]
    for r in results:
        cells = (
            [str(r.conc)]
            + [_fmt(r.alone[n]) for n in member_names]
            + [_fmt(r.limit), _fmt(r.naive), _fmt(r.fused)]
            + [
                f"{r.fused / r.naive:.2f}×" if r.naive else "-",
                f"{r.fused / r.limit:.2f}×" if r.limit else "-",
                f"{r.fuse_rows_per_call:.1f}",
                f"{r.fuse_us_per_row:.0f}",
                f"{r.fused_cpu_us:.0f}",
            ]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Target (issue): fused ≥ 2× naive at concurrency 1 and at 64."]
    if not any(r.conc in (1, 64) for r in results):
        lines.append("- (neither level was run)")
    for r in results:
        if r.conc in (1, 64) and r.naive:
            ok = "met" if r.fused >= 2 * r.naive else "NOT met"
            lines.append(f"- conc {r.conc}: fused/naive = {r.fused / r.naive:.2f}× ({ok})")
    lines += ["", "## Run", ""]
    lines += [f"- {k}: {v}" for k, v in facts]
    lines += ["", "Every repeat's rate (tokens/s), in run order, and the seconds it ran:", ""]
    for r in results:
        lines.append(f"- conc {r.conc} ({r.requests} requests a pass):")
        for name, runs in r.runs.items():
            each = ", ".join(f"{rate:,.0f} ({secs:.1f} s)" for rate, secs, _ in runs)
            lines.append(f"  - {name}: {each}")
    lines += ["", "Command:", "", "```", _command(), "```", ""]
    return "\n".join(lines)


def _engine_facts(ensemble) -> list[tuple[str, str]]:
    facts = []
    for m in ensemble.members:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(m.config.engine.items()))
        extra = ""
        try:
            cache = m.llm.vllm_config.cache_config
            sched = m.llm.vllm_config.scheduler_config
            extra = (
                f"; prefix caching {cache.enable_prefix_caching}, "
                f"max_num_batched_tokens {sched.max_num_batched_tokens}"
            )
        except AttributeError:
            pass
        facts.append(
            (
                f"member {m.name}",
                f"{m.config.model} (weight {m.config.weight}); engine: {settings}{extra}",
            )
        )
    return facts


async def _main(
    config: EnsembleConfig, args: argparse.Namespace, levels: list[int], repeats: int
) -> str:
    import torch
    import vllm

    from .router.ensemble import Ensemble

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    ensemble = await Ensemble.start(config)
    started = time.perf_counter() - t_start
    bench = None
    try:
        bench = _Bench(ensemble, config, args.policy, args.max_tokens)
        bench.set_prompts(max(WARMUP_REQUESTS, *(_total(c) for c in levels)))
        bench.router.start()
        log.info("bench: warming up")
        same, checked = await bench.warm_up()
        results = []
        for conc in levels:
            log.info("bench: concurrency %d", conc)
            result = await bench.level(conc, repeats)
            log.info(
                "bench: conc %d: alone %s, naive %.0f, fused %.0f tok/s",
                conc,
                {k: round(v) for k, v in result.alone.items()},
                result.naive,
                result.fused,
            )
            results.append(result)
        load_after = os.getloadavg()
        lens = [len(ids) for ids in bench.prompt_ids]
        facts = [
            ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
            (
                "machine",
                f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
                f"{_cpu_model()}, {platform.machine()}",
            ),
            ("load average", f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"),
            (
                "software",
                f"Python {platform.python_version()}, vllm {vllm.__version__}, "
                f"torch {torch.__version__}, numpy {np.__version__}",
            ),
            (
                "fusion",
                f"policy {args.policy}, top_k {config.fusion.top_k}, greedy, "
                f"ignore_eos, {args.max_tokens} tokens per request",
            ),
            (
                "prompts",
                f"{len(lens)} distinct Python-source snippets, "
                f"{min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f}); "
                "the same prompts for every driver",
            ),
            (
                "requests",
                f"per driver and level: max({MIN_REQUESTS}, conc) requests rounded up to "
                f"a multiple of conc, on conc closed-loop workers, passes repeated until "
                f"{MIN_SECONDS:g} s have passed; every driver {repeats}× per level, interleaved, "
                f"table = medians; {WARMUP_REQUESTS} warm-up requests per driver first",
            ),
            (
                "check",
                f"naive and router chose the same tokens on {same}/{checked} warm-up requests",
            ),
            ("engine start", f"{started:.0f} s for {len(ensemble.members)} members"),
            (
                "VLLM_CPU_OMP_THREADS_BIND",
                os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "unset (auto)")
                + " (a member's engine.cpu_threads overrides it)",
            ),
            *_engine_facts(ensemble),
        ]
        return render(results, ensemble.member_names, facts, args)
    finally:
        if bench is not None:
            await bench.router.stop()
        ensemble.shutdown()


def run_bench(config: EnsembleConfig, args: argparse.Namespace) -> int:
    """Run every driver at every concurrency level; print (and write) the markdown table."""
    from .fusion.policies import PolicyError, resolve_policy

    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError:
        print(
            f"fusion bench: --concurrency: not a list of integers: {args.concurrency!r}",
            file=sys.stderr,
        )
        return 2
    if not levels or any(c < 1 for c in levels):
        print("fusion bench: --concurrency: levels must be integers >= 1", file=sys.stderr)
        return 2
    if args.max_tokens < 1:
        print("fusion bench: --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        resolve_policy(args.policy)
    except PolicyError as err:
        print(f"fusion bench: --policy: {err}", file=sys.stderr)
        return 2
    repeats = int(getattr(args, "repeats", None) or REPEATS)  # no CLI flag yet
    if repeats < 1:
        print("fusion bench: --repeats must be >= 1", file=sys.stderr)
        return 2
    report = asyncio.run(_main(config, args, levels, repeats))
    print(report)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return 0

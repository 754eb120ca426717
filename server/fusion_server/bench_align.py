"""`fusion bench --alignment`: byte alignment's cost next to shared ids, same members.

Contract: one process, one started Ensemble whose members share a vocabulary, two
Routers on it: one on shared ids (the fast path), one forced onto byte alignment
(``fusion.alignment: bytes`` does the same in a server). Both run the same prompts,
greedy, ``conc`` closed-loop workers, interleaved repeats, medians; the table shows
fused tokens/s of each, their ratio (the issue's target: bytes ≥ 0.8× shared at
concurrency 32), the router's fuse time per row (align + fuse + sample, where the
two paths differ) and how often both paths chose the same tokens on the warm-up
requests (they may differ: for a candidate outside a member's top-k, byte
alignment credits the member's tokens that extend it, shared ids give the fill).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from .bench import MIN_SECONDS, REPEATS, _closed_loop, _total, footer, make_prompts, run_request
from .config import EnsembleConfig
from .fusion.policies import normalize_weights
from .router.request import FusionRequest, GenerateParams

ALIGNMENTS = ("shared-ids", "bytes")


class _Driver:
    """Requests through one Router (one alignment)."""

    def __init__(self, router, config: EnsembleConfig, policy: str, prompts: list[str], n: int):
        ensemble = router.ensemble
        self.router, self.n, self.prompts = router, n, prompts
        self.policy = router.policy(policy)
        self.params = self.policy.validate_params(dict(config.fusion.params))
        self.weights = normalize_weights(
            ensemble.member_names, {m.name: m.config.weight for m in ensemble.members}, {}
        )
        self.encoded = [ensemble.encode_members(p) for p in prompts]
        self.count = 0

    async def run(self, i: int, details: bool = False) -> tuple[int, list[int]]:
        self.count += 1
        prompts = self.encoded[i % len(self.encoded)]
        params = GenerateParams(
            request_id=f"ab-{self.router.alignment.name}-{self.count}-{i}",
            prompt=self.prompts[i % len(self.prompts)],
            max_tokens=self.n,
            ignore_eos=True,
            logprobs=1 if details else 0,
        )
        request = FusionRequest(
            params,
            list(prompts[0]),
            self.policy,
            self.params,
            self.weights.copy(),
            self.n,
            member_prompt_ids=prompts,
        )
        return await run_request(self.router, request)

    async def one(self, i: int) -> int:
        return (await self.run(i))[0]


async def _main(config: EnsembleConfig, policy: str, levels: list[int], n: int) -> str:
    from .router.ensemble import Ensemble
    from .router.router import Router

    ensemble = await Ensemble.start(config)
    routers = [Router(ensemble, max_running=10_000, alignment=a) for a in ALIGNMENTS]
    for router in routers:
        router.start()
    try:
        prompts = [p for p in make_prompts(max(64, *levels)) if len(ensemble.encode(p)) <= 96]
        drivers = [_Driver(r, config, policy, prompts, n) for r in routers]
        warm = [await asyncio.gather(*(d.run(i, True) for i in range(8))) for d in drivers]
        same = sum(a[1] == b[1] for a, b in zip(*warm, strict=True))
        rows = []
        for conc in levels:
            runs: dict[str, list[tuple[float, float, float]]] = {a: [] for a in ALIGNMENTS}
            for _ in range(REPEATS):
                for name, d in zip(ALIGNMENTS, drivers, strict=True):
                    stats = d.router.stats
                    rows_before, secs_before = stats.fused_rows, stats.fuse_seconds
                    cpu_before = time.process_time()
                    tokens, seconds = 0, 0.0
                    while seconds < MIN_SECONDS:
                        t, s = await _closed_loop(conc, _total(conc), d.one)
                        tokens, seconds = tokens + t, seconds + s
                    done = max(stats.fused_rows - rows_before, 1)
                    runs[name].append(
                        (
                            tokens / seconds,
                            (stats.fuse_seconds - secs_before) / done * 1e6,
                            (time.process_time() - cpu_before) / max(tokens, 1) * 1e6,
                        )
                    )
            rows.append((conc, runs))
    finally:
        for router in routers:
            await router.stop()
        ensemble.shutdown()
    return _render(rows, n, policy, ensemble.member_names, same, 8)


def _render(rows, n: int, policy: str, members: list[str], same: int, checked: int) -> str:
    lines = [
        f"# fusion-serve alignment cost ({n} tokens/request, greedy, policy `{policy}`, "
        f"members {', '.join(members)}; medians of {REPEATS} interleaved repeats)",
        "",
        "| conc | shared-ids tok/s | bytes tok/s | bytes/shared | fuse µs/row shared | "
        "fuse µs/row bytes | router CPU µs/token shared | router CPU µs/token bytes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    for conc, runs in rows:
        med = {a: [statistics.median(r[j] for r in runs[a]) for j in range(3)] for a in runs}
        shared, byte = med["shared-ids"], med["bytes"]
        ratios[conc] = byte[0] / shared[0]
        lines.append(
            f"| {conc} | {shared[0]:,.0f} | {byte[0]:,.0f} | {ratios[conc]:.2f}× | "
            f"{shared[1]:.0f} | {byte[1]:.0f} | {shared[2]:.0f} | {byte[2]:.0f} |"
        )
    lines += ["", "Target (issue 3): bytes/shared ≥ 0.80× at concurrency 32."]
    if 32 in ratios:
        ok = "met" if ratios[32] >= 0.8 else "NOT met"
        lines.append(f"- conc 32: {ratios[32]:.2f}× ({ok})")
    lines += [
        "",
        f"- same greedy tokens on {same}/{checked} warm-up requests (see the module docstring)",
        "- router CPU: CPU time of this process (router and vLLM front-ends, no gRPC) per fused token",
        "",
        "Every repeat, in run order (tok/s, fuse µs/row, router CPU µs/token):",
        "",
    ]
    for conc, runs in rows:
        for name, each in runs.items():
            text = ", ".join(f"{a:,.0f} / {b:.0f} / {c:.0f}" for a, b, c in each)
            lines.append(f"- conc {conc}, {name}: {text}")
    return "\n".join(lines + footer())


def run_alignment_bench(config: EnsembleConfig, args: argparse.Namespace) -> int:
    levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    report = asyncio.run(_main(config, args.policy, levels, args.max_tokens))
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0

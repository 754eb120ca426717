"""`fusion bench --workers`: members in the router's process vs. as worker processes.

Contract: one process, one run. Two ensembles of the same members are started side
by side: ``in-process`` (each member an AsyncLLM in this process) and ``workers``
(``server.member_workers``: each member a `fusion worker` process reached over a Unix
socket). The same Router-driven fused requests (bench.py's ``fused`` driver) run
against each, interleaved per concurrency level, so both modes see the same machine
load. Reported per level: fused tokens/s (median of the repeats) and the CPU time of
this process (the router: fusion, plus, in-process, the members' vLLM front-ends) per
request-step, where one request-step is one fused token of one request. The worker
processes' own CPU per request-step (their vLLM front-ends and gRPC; not their
EngineCores) is shown too, so that the total is visible. Engines start here: callers
must be ``if __name__ == "__main__"``-safe.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import platform
import statistics
import time

from .bench import REPEATS, WARMUP_REQUESTS, _Bench, _command, _cpu_model, _measure, _total
from .config import EnsembleConfig

MODES = ("in-process", "workers")
TARGET_CPU_CUT = 0.40
TARGET_THROUGHPUT = 0.90


@dataclasses.dataclass
class ModeResult:
    rates: list[float] = dataclasses.field(default_factory=list)
    steps: int = 0
    router_cpu: float = 0.0
    worker_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def router_us(self) -> float:
        return self.router_cpu / self.steps * 1e6 if self.steps else 0.0

    @property
    def worker_us(self) -> float:
        return self.worker_cpu / self.steps * 1e6 if self.steps else 0.0


def _worker_cpu(ensemble) -> float:
    """User + system CPU seconds of the ensemble's worker processes (not their children)."""
    total = 0.0
    for member in ensemble.members:
        process = getattr(member, "process", None)
        if process is not None and process.poll() is None:
            with open(f"/proc/{process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _level(benches: dict[str, _Bench], conc: int, repeats: int) -> dict[str, ModeResult]:
    results = {mode: ModeResult() for mode in benches}
    total = _total(conc)
    for _ in range(repeats):
        for mode, bench in benches.items():
            stats = bench.router.stats
            steps0, cpu0 = stats.tokens, time.process_time()
            workers0 = _worker_cpu(bench.ensemble)
            rate, _, _ = await _measure(conc, total, bench.fused_one)
            r = results[mode]
            r.router_cpu += time.process_time() - cpu0
            r.worker_cpu += _worker_cpu(bench.ensemble) - workers0
            r.steps += stats.tokens - steps0
            r.rates.append(rate)
    return results


async def _main(config: EnsembleConfig, args: argparse.Namespace, levels, repeats) -> str:
    from .router.ensemble import Ensemble

    load_before = os.getloadavg()
    ensembles, benches = {}, {}
    try:
        for mode in MODES:
            server = dataclasses.replace(config.server, member_workers=mode == "workers")
            t0 = time.perf_counter()
            ensembles[mode] = await Ensemble.start(dataclasses.replace(config, server=server))
            print(f"bench: {mode} members started in {time.perf_counter() - t0:.0f} s", flush=True)
        for mode, ensemble in ensembles.items():
            bench = benches[mode] = _Bench(ensemble, config, args.policy, args.max_tokens)
            bench.set_prompts(max(WARMUP_REQUESTS, *(_total(c) for c in levels)))
            bench.router.start()
        checks = {}
        for mode, bench in benches.items():
            checks[mode] = await asyncio.gather(
                *(bench.fused_run(i, details=True) for i in range(WARMUP_REQUESTS))
            )
        same = sum(a == b for a, b in zip(*checks.values(), strict=True))
        results = {}
        for conc in levels:
            results[conc] = await _level(benches, conc, repeats)
            print(
                f"bench: conc {conc}: "
                + ", ".join(
                    f"{m} {r.rate:,.0f} tok/s, router {r.router_us:.0f} µs/step"
                    for m, r in results[conc].items()
                ),
                flush=True,
            )
        load_after = os.getloadavg()
    finally:
        for bench in benches.values():
            await bench.router.stop()
        for ensemble in ensembles.values():
            ensemble.shutdown()
    facts = [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        (
            "machine",
            f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {_cpu_model()}, "
            f"{platform.machine()}; load average {load_before[0]:.2f} before, "
            f"{load_after[0]:.2f} after (other jobs share the machine)",
        ),
        ("members", ", ".join(f"{m.name}: {m.model}" for m in config.members)),
        (
            "requests",
            f"policy {args.policy}, top_k {config.fusion.top_k}, greedy, ignore_eos, "
            f"{args.max_tokens} tokens each; per level max(32, conc) requests on conc "
            f"closed-loop workers, repeated ≥ 2 s; modes interleaved {repeats}×, "
            "tokens/s = median, CPU = sum over repeats / request-steps",
        ),
        ("check", f"both modes chose the same tokens on {same}/{WARMUP_REQUESTS} requests"),
    ]
    return render(results, facts, args)


def render(results: dict[int, dict[str, ModeResult]], facts, args) -> str:
    head = [
        "conc",
        "in-process tok/s",
        "workers tok/s",
        "workers/in-process",
        "router CPU µs/step in-process",
        "router CPU µs/step workers",
        "router CPU cut",
        "worker processes CPU µs/step",
    ]
    lines = [
        "# fusion-serve: members in the router's process vs. worker processes",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" for _ in head) + "|",
    ]
    verdicts = []
    for conc, r in results.items():
        a, b = r["in-process"], r["workers"]
        ratio = b.rate / a.rate if a.rate else 0.0
        cut = 1 - b.router_us / a.router_us if a.router_us else 0.0
        lines.append(
            f"| {conc} | {a.rate:,.0f} | {b.rate:,.0f} | {ratio:.2f}× | {a.router_us:.0f} "
            f"| {b.router_us:.0f} | {cut:.0%} | {b.worker_us:.0f} |"
        )
        verdicts.append(
            f"- conc {conc}: router CPU cut {cut:.0%} "
            f"({'met' if cut >= TARGET_CPU_CUT else 'NOT met'}), throughput {ratio:.2f}× "
            f"({'met' if ratio >= TARGET_THROUGHPUT else 'NOT met'})"
        )
    lines += [
        "",
        f"Targets (issue): router CPU per request-step cut ≥ {TARGET_CPU_CUT:.0%}, "
        f"throughput ≥ {TARGET_THROUGHPUT:.1f}× in-process.",
        *verdicts,
        "",
        "## Run",
        "",
        *(f"- {k}: {v}" for k, v in facts),
        "",
        "Every repeat's tokens/s, in run order:",
        "",
    ]
    for conc, r in results.items():
        lines.append(
            f"- conc {conc}: "
            + "; ".join(f"{m}: " + ", ".join(f"{x:,.0f}" for x in v.rates) for m, v in r.items())
        )
    lines += ["", "Command:", "", "```", _command(), "```", ""]
    return "\n".join(lines)


def run_workers_bench(config: EnsembleConfig, args: argparse.Namespace) -> int:
    levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    repeats = int(getattr(args, "repeats", None) or REPEATS)
    report = asyncio.run(_main(config, args, levels, repeats))
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0

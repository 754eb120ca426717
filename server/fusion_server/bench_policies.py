"""`fusion bench --policies`: fused throughput of several policies side by side.

One process, one run, the same engines and prompts for every policy: each spec
runs through the router at each concurrency level (interleaved repeats, medians),
and the table shows tokens/s, the ratio to the first spec, and the share of steps
that fused all members (gated policies decide most steps with the primary alone).

Spec syntax: `name[:key=value,...]`; a numeric value is a policy parameter, any
other value a member role, e.g. `mean;gate:tau=0.5,alpha=primary`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from dataclasses import dataclass, field

from .bench import MIN_SECONDS, REPEATS, _closed_loop, _total, footer, make_prompts
from .config import EnsembleConfig
from .fusion.policies import normalize_weights
from .router.request import FusionRequest, GenerateParams


@dataclass
class PolicySpec:
    """One policy with its parameters and roles, parsed from the command line."""

    text: str
    name: str
    params: dict[str, float] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        name, _, rest = text.strip().partition(":")
        spec = cls(text=text.strip(), name=name)
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--policies: expected key=value in {text!r}, got {item!r}")
            try:
                spec.params[key] = float(value)
            except ValueError:
                spec.roles[key] = value
        return spec


class _Driver:
    def __init__(self, router, config: EnsembleConfig, spec: PolicySpec, prompts, n: int):
        ensemble = router.ensemble
        self.router, self.n, self.prompts = router, n, prompts
        self.policy = router.policy(spec.name)
        self.params = self.policy.validate_params({**config.fusion.params, **spec.params})
        self.roles = self.policy.validate_roles(
            ensemble.member_names, {**config.fusion.roles, **spec.roles}
        )
        self.weights = normalize_weights(
            ensemble.member_names, {m.name: m.config.weight for m in ensemble.members}, {}
        )
        self.spec = spec
        self.fused_steps = 0
        self.steps = 0
        self.count = 0

    async def one(self, i: int) -> int:
        self.count += 1
        ids = self.prompts[i % len(self.prompts)]
        params = GenerateParams(
            request_id=f"pb-{self.spec.name}-{self.count}-{i}",
            prompt="",
            max_tokens=self.n,
            ignore_eos=True,
            policy=self.spec.name,
        )
        request = FusionRequest(
            params,
            list(ids),
            self.policy,
            self.params,
            self.weights.copy(),
            self.n,
            roles=self.roles,
        )
        self.router.submit(request)
        try:
            while True:
                event = await request.events.get()
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason is not None:
                    break
        finally:
            await self.router.release(request)
        self.fused_steps += request.stats.fused_steps
        self.steps += request.stats.fused_steps + request.stats.primary_only_steps
        return request.completion_tokens


async def _main(config: EnsembleConfig, specs: list[PolicySpec], levels: list[int], n: int) -> str:
    from .router.ensemble import Ensemble
    from .router.router import Router

    ensemble = await Ensemble.start(config)
    router = Router(ensemble, max_running=10_000)
    router.start()
    try:
        prompts = [ensemble.encode(p) for p in make_prompts(max(64, *levels))]
        drivers = [_Driver(router, config, s, prompts, n) for s in specs]
        for d in drivers:  # warm-up
            await asyncio.gather(*(d.one(i) for i in range(4)))
        rows = []
        for conc in levels:
            rates: dict[str, list[float]] = {d.spec.text: [] for d in drivers}
            fused_share: dict[str, float] = {}
            for _ in range(REPEATS):
                for d in drivers:
                    d.fused_steps = d.steps = 0
                    tokens, seconds = 0, 0.0
                    while seconds < MIN_SECONDS:
                        t, s = await _closed_loop(conc, _total(conc), d.one)
                        tokens, seconds = tokens + t, seconds + s
                    rates[d.spec.text].append(tokens / seconds)
                    fused_share[d.spec.text] = d.fused_steps / max(d.steps, 1)
            rows.append(
                (conc, {k: statistics.median(v) for k, v in rates.items()}, dict(fused_share))
            )
    finally:
        await router.stop()
        ensemble.shutdown()
    return _render(specs, rows, n)


def _render(specs: list[PolicySpec], rows, n: int) -> str:
    base = specs[0].text
    head = (
        "| conc | "
        + " | ".join(f"`{s.text}` tok/s | fused steps | ×`{base}`" for s in specs)
        + " |"
    )
    lines = [
        f"# fusion-serve policy throughput ({n} tokens/request, greedy; medians of {REPEATS} interleaved repeats)",
        "",
        head,
        "|---:|" + "---:|---:|---:|" * len(specs),
    ]
    for conc, rates, share in rows:
        cells = [
            f"{rates[s.text]:,.0f} | {share[s.text]:.0%} | {rates[s.text] / rates[base]:.2f}×"
            for s in specs
        ]
        lines.append(f"| {conc} | " + " | ".join(cells) + " |")
    return "\n".join(lines + footer())


def run_policy_bench(config: EnsembleConfig, args: argparse.Namespace) -> int:
    specs = [PolicySpec.parse(t) for t in args.policies.split(";") if t.strip()]
    levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    report = asyncio.run(_main(config, specs, levels, args.max_tokens))
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0

"""`fusion eval`: does fusion help? Quality per member and per policy, in one run.

Contract: everything goes through a running server's public API (a given --server,
or `fusion serve` started here on the demo ensemble or --config, stopped at the end),
on text no member was trained on (``demo_train.HELD_OUT_MODULES``). Rows: each member
alone, then each policy. Columns:

- bits per byte: ``Score`` of fixed text windows (prompt: up to ``PROMPT_CHARS`` of
  preceding lines; continuation: the next lines, up to ``CONTINUATION_CHARS``), summed
  over all windows: -sum logprob / (ln 2 * sum bytes). A member alone: its own
  full-vocabulary log-likelihood (``ScoreResponse.members``), fused rows: the fused
  one (docs/score.md defines it per policy).
- line exact match: given the file up to the start of a line (its last
  ``PROMPT_CHARS`` characters, cut at a line start), greedy ``Generate`` with stop
  "\\n"; a hit when the text equals the line exactly. A member alone: all weight on it
  (``mean`` then decodes exactly its own greedy choice; the other members still run
  in lock-step, so its tokens/s is not a solo engine's).
- tokens/s: completion tokens of the line task / its wall time, at --concurrency.

Windows and lines are drawn with one seeded RNG; the same ones serve every row. The
windows stay within the demo members' training length (256 tokens).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from .bench_policies import PolicySpec
from .demo_train import held_out_texts

PROMPT_CHARS = 300
CONTINUATION_CHARS = 400
MAX_LINE_TOKENS = 48


@dataclass
class Row:
    name: str
    bpb: float = math.nan
    exact: float = math.nan
    tokens_per_s: float = math.nan


def _tail_lines(lines: list[str], end: int, max_chars: int) -> str:
    """The last whole lines before index `end`, at most max_chars (at least one line)."""
    out: list[str] = []
    size = 0
    for line in reversed(lines[:end]):
        if out and size + len(line) > max_chars:
            break
        out.append(line)
        size += len(line)
    return "".join(reversed(out))[-max_chars:]


def make_windows(texts: dict[str, str], count: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs at random line starts of the held-out modules."""
    candidates = []
    for name in sorted(texts):
        lines = texts[name].splitlines(keepends=True)
        for i in range(1, len(lines) - 1):
            cont, size = [], 0
            for line in lines[i:]:
                if cont and size + len(line) > CONTINUATION_CHARS:
                    break
                cont.append(line)
                size += len(line)
            text = "".join(cont)[:CONTINUATION_CHARS]
            if text.strip():
                candidates.append((_tail_lines(lines, i, PROMPT_CHARS), text))
    return rng.sample(candidates, min(count, len(candidates)))


def make_lines(texts: dict[str, str], count: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, line) pairs: the file up to a non-blank line, and that line (no newline)."""
    candidates = []
    for name in sorted(texts):
        lines = texts[name].splitlines(keepends=True)
        for i in range(1, len(lines)):
            line = lines[i].rstrip("\n")
            if line.strip():
                candidates.append((_tail_lines(lines, i, PROMPT_CHARS), line))
    return rng.sample(candidates, min(count, len(candidates)))


def _map(fn, items, concurrency: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(fn, items))


def _bpb(responses, pick) -> float:
    nats = -sum(pick(r) for r in responses)
    return nats / (math.log(2) * sum(r.bytes for r in responses))


def _lines_row(client, lines, concurrency: int, **options) -> tuple[float, float]:
    """(exact-match rate, completion tokens/s) of greedy next-line completion."""

    def one(item):
        prompt, line = item
        resp = client.generate(
            prompt, max_tokens=MAX_LINE_TOKENS, temperature=0, stop=["\n"], **options
        )
        return resp.text == line, resp.usage.completion_tokens

    t0 = time.perf_counter()
    results = _map(one, lines, concurrency)
    wall = time.perf_counter() - t0
    hits = sum(h for h, _ in results)
    return hits / len(lines), sum(n for _, n in results) / wall


def evaluate(client, specs: list[PolicySpec], args) -> list[Row]:
    rng = random.Random(args.seed)
    texts = held_out_texts()
    windows = make_windows(texts, args.windows, rng)
    lines = make_lines(texts, args.lines, rng)
    names = [m.name for m in client.get_ensemble().members]
    rows: list[Row] = []

    def score_all(**options):
        return _map(lambda w: client.score(w[0], w[1], **options), windows, args.concurrency)

    base = score_all()
    for m, name in enumerate(names):
        row = Row(name + " (alone)", bpb=_bpb(base, lambda r, m=m: r.members[m].logprob))
        weights = {n: float(n == name) for n in names}
        row.exact, row.tokens_per_s = _lines_row(
            client, lines, args.concurrency, policy="mean", weights=weights
        )
        rows.append(row)
        print(f"eval: {row}", file=sys.stderr, flush=True)
    for spec in specs:
        options = {"policy": spec.name, "params": spec.params, "roles": spec.roles}
        row = Row(spec.text, bpb=_bpb(score_all(**options), lambda r: r.logprob))
        row.exact, row.tokens_per_s = _lines_row(client, lines, args.concurrency, **options)
        rows.append(row)
        print(f"eval: {row}", file=sys.stderr, flush=True)
    return rows


def render(rows: list[Row], args, n_members: int) -> str:
    best_bpb = min(r.bpb for r in rows[:n_members])
    best_exact = max(r.exact for r in rows[:n_members])
    out = [
        f"`{_command(args)}` — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{args.windows} text windows, {args.lines} line positions, seed {args.seed}, "
        f"concurrency {args.concurrency}; held-out modules: demo_train.HELD_OUT_MODULES",
        "",
        "| row | bits/byte | vs best member | line exact match | vs best member | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.name} | {r.bpb:.4f} | {r.bpb / best_bpb:.3f}x | {r.exact:.1%} | "
            f"{r.exact - best_exact:+.1%} | {r.tokens_per_s:.0f} |"
        )
    return "\n".join(out) + "\n"


def _command(args) -> str:
    parts = ["fusion eval"]
    for flag in ("config", "policies", "lines", "windows", "seed", "concurrency"):
        value = getattr(args, flag)
        if value is not None:
            parts.append(f"--{flag} {value!r}" if flag == "policies" else f"--{flag} {value}")
    return " ".join(parts)


@contextlib.contextmanager
def _server(args):
    """(address, process): --server (process None), or `fusion serve` started here."""
    if args.server:
        yield args.server, None
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "fusion_server", "serve", "--port", str(port)]
    argv += ["--metrics-port", "-1"] + (["--config", args.config] if args.config else [])
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_ready(client, proc) -> bool:
    """Wait for SERVING; False if our server process exited first. A first start of the
    demo ensemble trains its members (minutes), so there is no deadline for our own."""
    if proc is None:
        client.wait_ready(timeout=600)
        return True
    while proc.poll() is None:
        try:
            client.wait_ready(timeout=10)
            return True
        except TimeoutError:
            continue
    return False


def run_eval(args: argparse.Namespace) -> int:
    from fusion_client import FusionClient

    specs = [PolicySpec.parse(t) for t in args.policies.split(";") if t.strip()]
    with _server(args) as (target, proc), FusionClient(target) as client:
        if not _wait_ready(client, proc):
            print(f"fusion eval: the server exited ({proc.returncode})", file=sys.stderr)
            return 1
        n_members = len(client.get_ensemble().members)
        rows = evaluate(client, specs, args)
    table = render(rows, args, n_members)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0

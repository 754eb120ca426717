"""Server-side `fusion` subcommands: serve, demo-models, bench.

Reached through the client package's CLI front (`fusion <cmd>`), or directly as
`python -m fusion_server <cmd>`. Anything that starts engines runs under
`if __name__ == "__main__"`-safe entry points (vLLM spawns engine processes).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys

from .config import CPU_ENGINE_DEFAULTS, ConfigError, EnsembleConfig, demo_config


def load_config(
    path: str | None, port: int | None = None, metrics_port: int | None = None
) -> EnsembleConfig:
    """The config file (or the demo ensemble), CLI overrides applied, CPU defaults filled."""
    config = EnsembleConfig.load(path) if path else demo_config()
    if port is not None:
        config.server.port = port
    if metrics_port is not None:
        config.server.metrics_port = metrics_port
    config.server.check("server")
    if _on_cpu():
        config = config.with_engine_defaults(CPU_ENGINE_DEFAULTS)
    return config


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return True
    return current_platform.is_cpu()


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    config = load_config(args.config, args.port, args.metrics_port)
    asyncio.run(serve(config))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .engines.worker import worker_main

    return worker_main(args, CPU_ENGINE_DEFAULTS if _on_cpu() else {})


def _demo_models(args: argparse.Namespace) -> int:
    from .demo import ensure_demo_models, ensure_trained_models

    if args.tiny:
        paths = ensure_demo_models()
    else:
        names = tuple(n.strip() for n in args.members.split(",")) if args.members else None
        paths = ensure_trained_models(names)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval import run_eval

    return run_eval(args)


def _bench(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.workers:
        from .bench_workers import run_workers_bench

        return run_workers_bench(config, args)
    if args.policies:
        from .bench_policies import run_policy_bench

        return run_policy_bench(config, args)
    if args.alignment:
        from .bench_align import run_alignment_bench

        return run_alignment_bench(config, args)
    from .bench import run_bench

    return run_bench(config, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion", description="fusion-serve server commands")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve an ensemble over gRPC (default: the demo ensemble)")
    serve.add_argument("--config", help="ensemble YAML file (default: the built-in demo ensemble)")
    serve.add_argument(
        "--port", type=int, help="gRPC port (overrides server.port; 0 = any free port)"
    )
    serve.add_argument(
        "--metrics-port", type=int, help="Prometheus port (overrides server.metrics_port; -1 = off)"
    )
    serve.set_defaults(func=_serve)
    worker = sub.add_parser(
        "worker", help="serve one member's engine to routers over gRPC (engine.proto)"
    )
    worker.add_argument("--model", required=True, help="model directory (or demo:NAME)")
    worker.add_argument("--name", help="member name for logs (default: the directory name)")
    worker.add_argument("--host", default="0.0.0.0", help="address to bind")
    worker.add_argument("--port", type=int, default=50061, help="gRPC port")
    worker.add_argument("--listen", help="bind this address instead (host:port or unix:PATH)")
    worker.add_argument(
        "--top-k", type=int, default=20, help="top candidates per step (>= the router's)"
    )
    worker.add_argument(
        "--engine",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="vLLM engine setting (repeatable; VALUE is YAML), e.g. --engine max_model_len=2048",
    )
    worker.add_argument("--engine-json", help="engine settings as one JSON object")
    worker.add_argument("--grace-seconds", type=float, default=10.0)
    worker.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when the launching process is gone (fusion serve's server.member_workers)",
    )
    worker.set_defaults(func=_worker)
    demo = sub.add_parser(
        "demo-models",
        help="train (once, minutes each) and print the trained demo members' model dirs",
    )
    demo.add_argument(
        "--tiny", action="store_true", help="the tiny random members instead (seconds; tests)"
    )
    demo.add_argument("--members", help="comma-separated trained members (default: all)")
    demo.set_defaults(func=_demo_models)
    ev = sub.add_parser(
        "eval",
        help="quality table on held-out stdlib modules: bits per byte (Score) and "
        "next-line exact match per member and policy",
    )
    ev.add_argument("--server", help="evaluate this running server (default: start the demo)")
    ev.add_argument("--config", help="ensemble YAML to start (default: the demo ensemble)")
    ev.add_argument(
        "--policies",
        default="mean;product;max;entropy;vote;packllm",
        help="'name[:k=v,...];...' as in bench --policies",
    )
    ev.add_argument("--lines", type=int, default=60, help="sampled line positions")
    ev.add_argument("--windows", type=int, default=40, help="scored text windows")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--concurrency", type=int, default=8)
    ev.add_argument("--out", help="also write the markdown table to this file")
    ev.set_defaults(func=_eval)
    bench = sub.add_parser("bench", help="throughput benchmark: fused vs. members alone vs. naive")
    bench.add_argument("--config", help="ensemble YAML file (default: the demo ensemble)")
    bench.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels")
    bench.add_argument("--max-tokens", type=int, default=32)
    bench.add_argument("--policy", default="mean")
    bench.add_argument("--out", help="also write the markdown table to this file")
    bench.add_argument(
        "--policies",
        help="compare policies instead: 'name[:k=v,...];...' (numeric v: parameter, else member role), "
        "e.g. 'mean;gate:tau=0.5,alpha=primary'",
    )
    bench.add_argument(
        "--alignment",
        action="store_true",
        help="compare shared-id and byte alignment on the same members (they must share ids)",
    )
    bench.add_argument(
        "--workers",
        action="store_true",
        help="compare members in the router's process with members as worker processes",
    )
    bench.set_defaults(func=_bench)
    _add_distill(sub)
    return parser


def _add_distill(sub) -> None:
    from .distill.train import TrainSettings

    p = sub.add_parser(
        "distill", help="distil the ensemble into one student model (Hugging Face directory)"
    )
    p.add_argument("--config", help="ensemble YAML file (default: the demo ensemble)")
    p.add_argument(
        "--data", required=True, help="training text: .txt/.py/.md file, .jsonl or directory"
    )
    p.add_argument(
        "--student",
        required=True,
        help="member name, Hugging Face directory, or new:tiny|small|<hidden>x<layers>",
    )
    p.add_argument("--out", required=True, help="export directory (written atomically)")
    p.add_argument("--work-dir", help="teacher cache and checkpoints (default: OUT.work); resumes")
    p.add_argument("--mode", choices=("token", "sequence"), default="token")
    p.add_argument(
        "--prompts", help="sequence mode: prompts (.txt one document, .jsonl, or directory)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training row")
    p.add_argument("--top-k", type=int, default=20, help="teacher top-k kept per position")
    p.add_argument(
        "--eval-data", help="held-out text: bits per byte before/after, members, ensemble"
    )
    p.add_argument("--device", default="cpu", help="torch device for the student (cpu, cuda)")
    for f in dataclasses.fields(TrainSettings):  # --steps, --lr, --kl-weight, ...
        if f.name != "stop_after":
            flag = "--" + f.name.replace("_", "-")
            p.add_argument(
                flag, type=type(f.default), default=f.default, help=f"default {f.default}"
            )
    p.add_argument("--stop-after", type=int, help="stop after N steps of this run (resume later)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_distill)


def _distill(args) -> int:
    from .distill.data import DistillError
    from .distill.run import DistillSettings, distill
    from .distill.train import TrainSettings

    train = TrainSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)}
    )
    settings = DistillSettings(
        data=args.data,
        student=args.student,
        out=args.out,
        work_dir=args.work_dir,
        mode=args.mode,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        seq_len=args.seq_len,
        top_k=args.top_k,
        eval_data=args.eval_data,
        device=args.device,
        progress=not args.no_progress,
        train=train,
    )
    try:
        result = distill(settings, load_config(args.config))
    except DistillError as err:
        print(f"fusion distill: {err}", file=sys.stderr)
        return 2
    return 0 if result.get("finished") else 3


SERVER_MODULES = (
    "vllm",
    "numpy",
    "transformers",
    "yaml",
    "grpc_health",
    "grpc_reflection",
    "prometheus_client",
)


def missing_server_module() -> str | None:
    """The first module of the server extra that is not installed, if any."""
    import importlib.util

    for module in SERVER_MODULES:
        if importlib.util.find_spec(module) is None:
            return module
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_server_module()
    if missing is not None:
        print(
            f"fusion {args.command} needs the server extra: pip install 'fusion-serve[cpu]' "
            f"(or [gpu] on CUDA); missing module: {missing}",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fusion: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

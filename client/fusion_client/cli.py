"""The `fusion` command.

Client subcommands (generate, score, ensemble, health) need only grpcio + protobuf. Server
subcommands (serve, bench, demo-models) are forwarded verbatim to `fusion_server.cli`,
which is imported only when one of them runs and needs the cpu or gpu extra.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Sequence

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from fusion_client._proto.fusion.v1 import fusion_pb2
from fusion_client.client import DEFAULT_TARGET, FusionClient

# Subcommands that live in fusion_server.cli, with their one-line help.
SERVER_COMMANDS = {
    "serve": "run the fusion gRPC server (needs the server extra)",
    "worker": "serve one member's engine to routers (needs the server extra)",
    "bench": "benchmark a server or an ensemble (needs the server extra)",
    "demo-models": "train (once) the demo members offline (needs the server extra)",
    "eval": "quality table: bits per byte and line completion per member and policy (needs the server extra)",
    "distill": "distil the ensemble into one student model (needs the server extra)",
}

_SERVER_EXTRA_HINT = "pip install 'fusion-serve[cpu]' (or [gpu] on CUDA)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Server subcommands go straight through: argparse.REMAINDER will not take a
    # leading option (`fusion serve --help`), and the server parses its own flags.
    if argv and argv[0] in SERVER_COMMANDS:
        return _run_server_command(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion", description="fusion-serve client and server.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate a completion")
    gen.add_argument("prompt", help="prompt text")
    _add_connection_flags(gen)
    _add_fusion_flags(gen)
    gen.add_argument("--max-tokens", type=int, help="default: the server default")
    gen.add_argument("--temperature", type=float, help="0: greedy (default: greedy)")
    gen.add_argument("--top-p", type=float, help="nucleus mass in (0, 1]")
    gen.add_argument("--top-k", type=int, default=0, help="0: off")
    gen.add_argument("--seed", type=int, help="random seed (default: random)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    gen.add_argument("--logprobs", type=int, default=0, help="fused top candidates per token")
    gen.add_argument("--member-details", action="store_true", help="per-member token details")
    gen.add_argument("--request-id", default="", help="caller-chosen request id")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--json", action="store_true", help="print responses as JSON")
    gen.set_defaults(run=_generate)

    score = commands.add_parser(
        "score", help="fused log-likelihood and bits per byte of a continuation after a prompt"
    )
    score.add_argument("continuation", help="text to score ('-': read it from stdin)")
    score.add_argument("--prompt", default="", help="context before it (default: none)")
    _add_connection_flags(score)
    _add_fusion_flags(score)
    score.add_argument("--tokens", action="store_true", help="per-token detail")
    score.add_argument("--request-id", default="", help="caller-chosen request id")
    score.add_argument("--json", action="store_true", help="print the response as JSON")
    score.set_defaults(run=_score)

    ens = commands.add_parser("ensemble", help="describe the ensemble (JSON)")
    _add_connection_flags(ens)
    ens.set_defaults(run=_ensemble)

    health = commands.add_parser("health", help="print the health status; exit 0 iff SERVING")
    _add_connection_flags(health)
    health.add_argument("--service", default="", help="service name (default: the server)")
    health.set_defaults(run=_health)

    # Listed for `fusion --help`; main() forwards them before parsing.
    for name, help_text in SERVER_COMMANDS.items():
        server = commands.add_parser(name, help=help_text, add_help=False)
        server.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("FUSION_SERVER", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help="server address (default: $FUSION_SERVER or %(default)s)",
    )
    parser.add_argument("--timeout", type=float, help="deadline in seconds (default: none)")
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="use TLS; PEM CA that signed the server certificate"
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM key of --tls-cert")
    parser.add_argument(
        "--token",
        default=os.environ.get("FUSION_TOKEN"),
        help="bearer token (default: $FUSION_TOKEN)",
    )


def _add_fusion_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="", help="fusion policy (default: the server's)")
    parser.add_argument(
        "--weight",
        dest="weights",
        metavar="NAME=W",
        type=_name_value,
        action="append",
        default=[],
        help="member weight (repeatable)",
    )
    parser.add_argument(
        "--param",
        dest="params",
        metavar="NAME=V",
        type=_name_value,
        action="append",
        default=[],
        help="policy parameter (repeatable)",
    )
    parser.add_argument(
        "--role",
        dest="roles",
        metavar="MEMBER=ROLE",
        type=_name_role,
        action="append",
        default=[],
        help="member role for the policy, e.g. alpha=expert (repeatable)",
    )


def _fusion_options(args: argparse.Namespace) -> dict:
    return {
        "policy": args.policy,
        "weights": dict(args.weights),
        "params": dict(args.params),
        "roles": dict(args.roles),
    }


def _connect(args: argparse.Namespace) -> FusionClient:
    """A client for the connection flags: TLS when any --tls-* is given, token as metadata."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("fusion: --tls-cert and --tls-key go together")
    credentials = None
    if args.tls_ca or args.tls_cert:

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as err:
                raise SystemExit(f"fusion: cannot read {path}: {err.strerror}") from None

        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(args.tls_ca),
            private_key=read(args.tls_key),
            certificate_chain=read(args.tls_cert),
        )
    metadata = {"authorization": f"Bearer {args.token}"} if args.token else None
    return FusionClient(
        args.server, timeout=args.timeout, credentials=credentials, metadata=metadata
    )


def _name_value(text: str) -> tuple[str, float]:
    """argparse type for NAME=NUMBER."""
    name, sep, value = text.partition("=")
    try:
        if not (sep and name):
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}") from None


def _name_role(text: str) -> tuple[str, str]:
    """argparse type for MEMBER=ROLE."""
    name, sep, role = text.partition("=")
    if not (sep and name and role):
        raise argparse.ArgumentTypeError(f"expected MEMBER=ROLE, got {text!r}")
    return name, role


def _run_server_command(command: str, argv: list[str]) -> int:
    try:
        server_cli = importlib.import_module("fusion_server.cli")
    except ImportError as err:
        print(f"fusion {command} needs the server extra: {_SERVER_EXTRA_HINT}", file=sys.stderr)
        print(f"  (import failed: {err})", file=sys.stderr)
        return 2
    return server_cli.main([command, *argv])


def _generate(args: argparse.Namespace) -> int:
    options = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        **_fusion_options(args),
        "logprobs": args.logprobs,
        "member_details": args.member_details,
        "request_id": args.request_id,
    }
    with _connect(args) as client:
        if args.stream:
            _print_stream(client.generate_stream(args.prompt, **options), as_json=args.json)
            return 0
        response = client.generate(args.prompt, **options)
    if args.json:
        print(_to_json(response))
    else:
        print(response.text)
        _print_summary(response)
    return 0


def _score(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.continuation == "-" else args.continuation
    with _connect(args) as client:
        response = client.score(
            args.prompt,
            text,
            token_details=args.tokens,
            request_id=args.request_id,
            **_fusion_options(args),
        )
    if args.json:
        print(_to_json(response))
        return 0
    print(
        f"fused ({response.policy}): logprob={response.logprob:.4f} "
        f"bits_per_byte={response.bits_per_byte:.4f} "
        f"tokens={response.tokens} bytes={response.bytes}"
    )
    for m in response.members:
        print(
            f"  {m.member}: logprob={m.logprob:.4f} bits_per_byte={m.bits_per_byte:.4f} "
            f"weight={response.weights.get(m.member, 0.0):.3f}"
        )
    for t in response.token_details:
        members = " ".join(f"{v:.3f}" for v in t.member_logprobs)
        print(f"  {t.token_id:>6} {t.text!r:<16} fused={t.logprob:.3f} members=[{members}]")
    return 0


def _print_stream(stream: Iterable[fusion_pb2.GenerateStreamResponse], *, as_json: bool) -> None:
    """Text deltas as they arrive (or one JSON object per line), then the summary."""
    last = None
    for message in stream:
        if as_json:
            print(_to_json(message, indent=None), flush=True)
        else:
            sys.stdout.write(message.text)
            sys.stdout.flush()
        last = message
    if not as_json:
        print()
        if last is not None:
            _print_summary(last)


def _print_summary(
    response: fusion_pb2.GenerateResponse | fusion_pb2.GenerateStreamResponse,
) -> None:
    reason = fusion_pb2.FinishReason.Name(response.finish_reason)
    reason = reason.removeprefix("FINISH_REASON_").lower()
    usage = response.usage
    print(
        f"finish_reason={reason} prompt_tokens={usage.prompt_tokens} "
        f"completion_tokens={usage.completion_tokens}",
        file=sys.stderr,
    )


def _ensemble(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        print(_to_json(client.get_ensemble()))
    return 0


def _health(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _to_json(message: Message, indent: int | None = 2) -> str:
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=indent,
    )

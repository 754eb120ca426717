"""fusion_client against a fake FusionService on a real gRPC server (no vLLM)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import fusion_client
from fusion_client import (
    AsyncFusionClient,
    FusionClient,
    build_request,
    fusion_pb2,
    fusion_pb2_grpc,
)
from fusion_client import client as client_module
from fusion_client.cli import main

DELTAS = ["Hel", "lo", ", wor", "ld"]
ENSEMBLE = fusion_pb2.GetEnsembleResponse(
    members=[fusion_pb2.MemberInfo(name="a", model="tiny-a", weight=1.0, vocab_size=256)],
    default_policy="mean",
    policies=[fusion_pb2.PolicyInfo(name="mean", description="weighted mean")],
    alignment="shared-ids",
    top_k=20,
)


class FakeFusion(fusion_pb2_grpc.FusionServiceServicer):
    """Echoes the prompt; 'bad' aborts with INVALID_ARGUMENT, 'slow' sleeps 2 s."""

    def __init__(self) -> None:
        self.requests: list[fusion_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []

    def _record(self, request, context) -> str:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.prompt == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is bad")
        if request.prompt == "slow":
            time.sleep(2)
        return request.request_id or "server-id"

    def Generate(self, request, context):
        request_id = self._record(request, context)
        return fusion_pb2.GenerateResponse(
            request_id=request_id,
            text=f"echo: {request.prompt}",
            finish_reason=fusion_pb2.FINISH_REASON_LENGTH,
            usage=fusion_pb2.Usage(prompt_tokens=2, completion_tokens=request.sampling.max_tokens),
        )

    def GenerateStream(self, request, context):
        request_id = self._record(request, context)
        for delta in DELTAS:
            yield fusion_pb2.GenerateStreamResponse(request_id=request_id, text=delta)
        yield fusion_pb2.GenerateStreamResponse(
            request_id=request_id,
            finish_reason=fusion_pb2.FINISH_REASON_STOP,
            usage=fusion_pb2.Usage(prompt_tokens=2, completion_tokens=len(DELTAS)),
        )

    def GetEnsemble(self, request, context):
        return ENSEMBLE


class Server(types.SimpleNamespace):
    address: str
    fake: FakeFusion
    health: health.HealthServicer


@pytest.fixture(scope="module")
def server():
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    fake = FakeFusion()
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(fake, grpc_server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield Server(address=f"127.0.0.1:{port}", fake=fake, health=health_servicer)
    grpc_server.stop(None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- build_request and the health wire format ---------------------------------------


def test_build_request_sets_given_fields():
    request = build_request(
        "hi",
        max_tokens=8,
        temperature=0.0,
        top_p=0.9,
        top_k=5,
        seed=0,
        stop=["\n", "END"],
        ignore_eos=True,
        policy="mean",
        weights={"a": 2.0},
        params={"alpha": 0.5},
        logprobs=3,
        member_details=True,
        request_id="r1",
    )
    sampling = request.sampling
    assert (request.prompt, request.request_id) == ("hi", "r1")
    assert (sampling.max_tokens, sampling.top_k, sampling.ignore_eos) == (8, 5, True)
    # temperature 0 and seed 0 are given, so they are present despite being zero.
    assert sampling.HasField("temperature") and sampling.temperature == 0.0
    assert sampling.HasField("seed") and sampling.seed == 0
    assert sampling.top_p == pytest.approx(0.9)
    assert list(sampling.stop) == ["\n", "END"]
    assert request.fusion.policy == "mean"
    assert dict(request.fusion.weights) == {"a": 2.0}
    assert dict(request.fusion.params) == {"alpha": 0.5}
    assert (request.output.logprobs, request.output.member_details) == (3, True)


def test_build_score_request_sets_given_fields():
    from fusion_client.client import build_score_request

    request = build_score_request(
        "ctx", "text", policy="product", weights={"a": 1.0}, token_details=True, request_id="s"
    )
    assert (request.prompt, request.continuation, request.request_id) == ("ctx", "text", "s")
    assert request.fusion.policy == "product" and dict(request.fusion.weights) == {"a": 1.0}
    assert request.token_details


def test_build_request_leaves_optional_fields_unset():
    sampling = build_request("hi").sampling
    for field in ("temperature", "top_p", "seed"):
        assert not sampling.HasField(field)
    assert build_request("hi", stop="\n").sampling.stop == ["\n"]  # one string, not its chars


@pytest.mark.parametrize("service", ["", "fusion.v1.FusionService", "x" * 300, "é"])
def test_health_request_encoding_matches_protobuf(service):
    expected = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert client_module._encode_health_request(service) == expected


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_health_response_decoding_matches_protobuf(status):
    data = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    assert client_module._decode_health_status(data) == name
    # Unknown fields of every wire type are skipped.
    extra = b"\x12\x02ab" + b"\x19" + bytes(8) + b"\x25" + bytes(4) + b"\x28\x96\x01"
    assert client_module._decode_health_status(extra + data + extra) == name


def test_health_response_decoding_rejects_truncation():
    with pytest.raises(ValueError):
        client_module._decode_health_status(b"\x08")
    with pytest.raises(ValueError):
        client_module._decode_health_status(b"\x12\x05ab")


# --- sync client -------------------------------------------------------------------


def test_sync_generate(server):
    with FusionClient(server.address, metadata={"x-api-key": "k"}) as client:
        response = client.generate("hello", max_tokens=4, weights={"a": 0.5}, request_id="r7")
    assert (response.text, response.request_id) == ("echo: hello", "r7")
    assert response.finish_reason == fusion_pb2.FINISH_REASON_LENGTH
    assert response.usage.completion_tokens == 4
    assert dict(server.fake.requests[-1].fusion.weights) == {"a": 0.5}
    assert server.fake.metadata[-1]["x-api-key"] == "k"


def test_sync_generate_stream(server):
    with FusionClient(server.address) as client:
        messages = list(client.generate_stream("hello"))
    assert "".join(m.text for m in messages) == "".join(DELTAS)
    assert messages[-1].finish_reason == fusion_pb2.FINISH_REASON_STOP
    assert messages[-1].usage.completion_tokens == len(DELTAS)


def test_sync_errors_and_timeouts(server):
    with FusionClient(server.address, timeout=0.2) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("bad")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            client.generate("slow")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_sync_get_ensemble_and_health(server):
    with FusionClient(server.address) as client:
        assert client.get_ensemble() == ENSEMBLE
        assert client.health() == "SERVING"
        assert client.health("down") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:  # the standard servicer: unknown service
            client.health("no-such-service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_sync_wait_ready(server):
    server.health.set("warming", health_pb2.HealthCheckResponse.NOT_SERVING)
    threading.Timer(
        0.3, server.health.set, ("warming", health_pb2.HealthCheckResponse.SERVING)
    ).start()
    with FusionClient(server.address) as client:
        start = time.monotonic()
        client.wait_ready(timeout=10, service="warming", interval=0.05)
        assert 0.2 < time.monotonic() - start < 5
        with pytest.raises(TimeoutError, match="NOT_SERVING"):
            client.wait_ready(timeout=0.3, service="down", interval=0.05)


def test_sync_wait_ready_times_out_without_server():
    client = FusionClient(f"127.0.0.1:{_free_port()}")
    with client, pytest.raises(TimeoutError, match="UNAVAILABLE"):
        client.wait_ready(timeout=0.5, interval=0.05)


# --- async client ------------------------------------------------------------------


async def test_async_generate_and_stream(server):
    async with AsyncFusionClient(server.address) as client:
        response = await client.generate("hello", max_tokens=3, temperature=0.7)
        assert response.text == "echo: hello"
        assert server.fake.requests[-1].sampling.temperature == pytest.approx(0.7)
        messages = [m async for m in client.generate_stream("hello")]
        assert "".join(m.text for m in messages) == "".join(DELTAS)
        assert messages[-1].finish_reason == fusion_pb2.FINISH_REASON_STOP
        stream = client.generate_stream("hello")
        assert (await anext(stream)).text == DELTAS[0]
        await stream.aclose()  # cancels the call
        with pytest.raises(grpc.RpcError) as err:
            await client.generate("bad")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_async_get_ensemble_health_wait_ready(server):
    server.health.set("warming-async", health_pb2.HealthCheckResponse.NOT_SERVING)
    threading.Timer(
        0.3, server.health.set, ("warming-async", health_pb2.HealthCheckResponse.SERVING)
    ).start()
    async with AsyncFusionClient(server.address) as client:
        assert await client.get_ensemble() == ENSEMBLE
        assert await client.health() == "SERVING"
        assert await client.health("down") == "NOT_SERVING"
        await client.wait_ready(timeout=10, service="warming-async", interval=0.05)
    async with AsyncFusionClient(f"127.0.0.1:{_free_port()}") as client:
        with pytest.raises(TimeoutError):
            await client.wait_ready(timeout=0.3, interval=0.05)


# --- CLI ---------------------------------------------------------------------------


def test_cli_generate(server, capsys):
    argv = ["generate", "hello", "--server", server.address, "--max-tokens", "5"]
    argv += ["--weight", "a=0.5", "--weight", "b=2", "--param", "alpha=1e-2"]
    argv += ["--stop", "x", "--stop", "y", "--seed", "7", "--policy", "mean"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "echo: hello\n"
    assert "finish_reason=length" in err and "completion_tokens=5" in err
    request = server.fake.requests[-1]
    assert dict(request.fusion.weights) == {"a": 0.5, "b": 2.0}
    assert dict(request.fusion.params) == {"alpha": 0.01}
    assert list(request.sampling.stop) == ["x", "y"]
    assert request.sampling.seed == 7 and not request.sampling.HasField("temperature")


def test_cli_generate_stream(server, capsys):
    assert main(["generate", "hello", "--server", server.address, "--stream"]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(DELTAS) + "\n"
    assert "finish_reason=stop" in err


def test_cli_generate_json(server, capsys):
    assert main(["generate", "hello", "--server", server.address, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["text"] == "echo: hello"
    assert body["finish_reason"] == "FINISH_REASON_LENGTH"
    assert main(["generate", "hello", "--server", server.address, "--stream", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == [*DELTAS, ""]


def test_cli_grpc_error_is_one_line(server, capsys):
    assert main(["generate", "bad", "--server", server.address]) == 1
    out, err = capsys.readouterr()
    assert err == "error: INVALID_ARGUMENT: prompt is bad\n"
    assert out == ""


def test_cli_bad_weight_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "hello", "--weight", "a:1"])
    assert exit_info.value.code == 2
    assert "--weight" in capsys.readouterr().err


def test_cli_ensemble_and_health(server, capsys, monkeypatch):
    assert main(["ensemble", "--server", server.address]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["default_policy"] == "mean" and body["members"][0]["name"] == "a"
    monkeypatch.setenv("FUSION_SERVER", server.address)  # the default --server
    assert main(["health"]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert main(["health", "--service", "down"]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"


def test_cli_server_command_without_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fusion_server.cli", None)  # import raises ImportError
    assert main(["serve", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "fusion serve needs the server extra: pip install 'fusion-serve[cpu]' (or [gpu] on CUDA)\n"
    )


def test_cli_server_command_is_forwarded(monkeypatch):
    seen = []
    fake_cli = types.ModuleType("fusion_server.cli")
    fake_cli.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fusion_server.cli", fake_cli)
    assert main(["demo-models", "--help"]) == 7
    assert main(["serve", "--", "x"]) == 7
    assert seen == [["demo-models", "--help"], ["serve", "--", "x"]]


def test_import_pulls_in_no_server_dependencies():
    client_root = str(pathlib.Path(fusion_client.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([client_root, os.environ.get("PYTHONPATH", "")]),
    }
    code = (
        "import sys, fusion_client, fusion_client.cli\n"
        "heavy = ('numpy', 'vllm', 'torch', 'yaml', 'fusion_server')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
    result = subprocess.run(
        [sys.executable, "-m", "fusion_client", "--help"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "generate" in result.stdout

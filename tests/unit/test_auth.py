"""server.tls / server.auth config, the token loader, and AuthInterceptor on a fake server."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from certutil import make_certs
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fusion_client import AsyncFusionClient, fusion_pb2, fusion_pb2_grpc
from fusion_client.cli import build_parser
from fusion_server.api.auth import AuthInterceptor, TokenSet, bearer_token
from fusion_server.config import AuthConfig, ConfigError, EnsembleConfig, TLSConfig

MEMBERS = [{"name": "a", "model": "/m/a"}]


def _config(server: dict) -> EnsembleConfig:
    return EnsembleConfig.from_dict({"members": MEMBERS, "server": server})


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


# --- config -------------------------------------------------------------------------


def test_tls_and_auth_parse(certs, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("t1\n")
    cfg = _config(
        {
            "tls": {
                "cert_file": str(certs.server_cert),
                "key_file": str(certs.server_key),
                "client_ca_file": str(certs.ca),
            },
            "auth": {"tokens_file": str(tokens), "tokens_env": "FUSION_TEST_TOKENS"},
        }
    )
    assert isinstance(cfg.server.tls, TLSConfig)
    assert cfg.server.tls.client_ca_file == str(certs.ca)
    assert isinstance(cfg.server.auth, AuthConfig)
    assert _config({}).server.tls is None and _config({}).server.auth is None


@pytest.mark.parametrize(
    ("server", "field", "words"),
    [
        ({"tls": {"cert": "x"}}, "server.tls.cert", "unknown field"),
        ({"auth": {"token": "x"}}, "server.auth.token", "unknown field"),
        ({"tls": "yes"}, "server.tls", "mapping"),
        ({"auth": ["x"]}, "server.auth", "mapping"),
        ({"tls": {"key_file": "CERTKEY"}}, "server.tls.cert_file", "required"),
        ({"tls": {"cert_file": "CERT"}}, "server.tls.key_file", "required"),
        (
            {"tls": {"cert_file": "/nope.pem", "key_file": "CERTKEY"}},
            "server.tls.cert_file",
            "no such file",
        ),
        (
            {"tls": {"cert_file": "CERT", "key_file": "/nope.key"}},
            "server.tls.key_file",
            "no such file",
        ),
        (
            {"tls": {"cert_file": "CERT", "key_file": "CERTKEY", "client_ca_file": "/nope"}},
            "server.tls.client_ca_file",
            "no such file",
        ),
        ({"auth": {}}, "server.auth", "tokens_file"),
        ({"auth": {"tokens_file": "/no/tokens"}}, "server.auth.tokens_file", "no such file"),
        ({"auth": {"tokens_env": ""}}, "server.auth", "tokens_file"),
        ({"auth": {"tokens_env": 5}}, "server.auth.tokens_env", "variable name"),
    ],
)
def test_config_errors_name_the_field(certs, server, field, words):
    def fill(value):
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, str):
            return {"CERT": str(certs.server_cert), "CERTKEY": str(certs.server_key)}.get(
                value, value
            )
        return value

    with pytest.raises(ConfigError) as err:
        _config(fill(server))
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert words in str(err.value)


def test_tokens_from_file_and_env(tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\n\n  alpha  \nbeta\n   # indented comment\n")
    monkeypatch.setenv("FUSION_TEST_TOKENS", " gamma, ,delta ")
    assert AuthConfig(tokens_file=str(tokens)).load_tokens() == ["alpha", "beta"]
    assert AuthConfig(tokens_env="FUSION_TEST_TOKENS").load_tokens() == ["gamma", "delta"]
    both = AuthConfig(tokens_file=str(tokens), tokens_env="FUSION_TEST_TOKENS")
    assert both.load_tokens() == ["alpha", "beta", "gamma", "delta"]


def test_no_tokens_is_a_config_error(tmp_path, monkeypatch):
    empty = tmp_path / "tokens"
    empty.write_text("# nothing here\n\n")
    monkeypatch.delenv("FUSION_TEST_TOKENS", raising=False)
    for auth in (
        AuthConfig(tokens_file=str(empty)),
        AuthConfig(tokens_env="FUSION_TEST_TOKENS"),
        AuthConfig(tokens_file=str(empty), tokens_env="FUSION_TEST_TOKENS"),
    ):
        with pytest.raises(ConfigError) as err:
            auth.load_tokens()
        assert err.value.field == "server.auth"
        assert "no tokens" in str(err.value)


# --- token matching -----------------------------------------------------------------


def test_bearer_token_parsing():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x", "y"), ("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", b"Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("x-api-key", "abc")]) is None
    assert bearer_token(None) is None


def test_token_set_matches_only_configured_tokens():
    tokens = TokenSet(["alpha", "beta"])
    assert tokens.matches("alpha") and tokens.matches("beta")
    assert not tokens.matches("alph")
    assert not tokens.matches("alphax")
    assert not tokens.matches("")
    assert not tokens.matches(None)
    with pytest.raises(ValueError):
        TokenSet([])


# --- the interceptor on a real grpc.aio server with a fake FusionService ------------


class _Fake(fusion_pb2_grpc.FusionServiceServicer):
    async def Generate(self, request, context):
        return fusion_pb2.GenerateResponse(text=f"echo: {request.prompt}")

    async def GenerateStream(self, request, context):
        for part in ("a", "b"):
            yield fusion_pb2.GenerateStreamResponse(text=part)

    async def GetEnsemble(self, request, context):
        return fusion_pb2.GetEnsembleResponse(default_policy="mean")


async def _start(tls_credentials=None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[AuthInterceptor(["good-token", "other"])])
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(_Fake(), server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls_credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", tls_credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _code(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def _stream_code(client: AsyncFusionClient) -> grpc.StatusCode:
    async def consume():
        return [m.text async for m in client.generate_stream("hi")]

    return await _code(consume())


async def test_interceptor_requires_a_token_except_for_health():
    server, target = await _start()
    try:
        async with AsyncFusionClient(target, timeout=10) as client:
            assert await client.health() == "SERVING"  # open for probes
            assert await _code(client.generate("hi")) == grpc.StatusCode.UNAUTHENTICATED
            assert await _stream_code(client) == grpc.StatusCode.UNAUTHENTICATED
            assert await _code(client.get_ensemble()) == grpc.StatusCode.UNAUTHENTICATED
            try:
                await client.generate("hi")
            except grpc.aio.AioRpcError as err:
                assert err.details() == "missing or invalid bearer token"
        bad = {"authorization": "Bearer good-tokenX"}
        async with AsyncFusionClient(target, timeout=10, metadata=bad) as client:
            assert await _code(client.generate("hi")) == grpc.StatusCode.UNAUTHENTICATED
            assert await _stream_code(client) == grpc.StatusCode.UNAUTHENTICATED
        good = {"authorization": "Bearer other"}
        async with AsyncFusionClient(target, timeout=10, metadata=good) as client:
            assert (await client.generate("hi")).text == "echo: hi"
            assert [m.text async for m in client.generate_stream("hi")] == ["a", "b"]
            assert (await client.get_ensemble()).default_policy == "mean"
    finally:
        await server.stop(None)


async def test_interceptor_over_mutual_tls(certs):
    credentials = grpc.ssl_server_credentials(
        [(certs.read("server_key"), certs.read("server_cert"))],
        root_certificates=certs.read("ca"),
        require_client_auth=True,
    )
    server, target = await _start(credentials)
    good = {"authorization": "Bearer good-token"}
    mtls = grpc.ssl_channel_credentials(
        certs.read("ca"), certs.read("client_key"), certs.read("client_cert")
    )
    try:
        async with AsyncFusionClient(target, timeout=10, credentials=mtls) as client:
            assert await client.health() == "SERVING"
            assert await _code(client.generate("hi")) == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncFusionClient(target, timeout=10, credentials=mtls, metadata=good) as c:
            assert (await c.generate("hi")).text == "echo: hi"
        no_cert = grpc.ssl_channel_credentials(certs.read("ca"))
        async with AsyncFusionClient(target, timeout=5, credentials=no_cert, metadata=good) as c:
            assert await _code(c.generate("hi")) == grpc.StatusCode.UNAVAILABLE
        async with AsyncFusionClient(target, timeout=5, metadata=good) as c:  # plaintext
            assert await _code(c.generate("hi")) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


# --- CLI flags ----------------------------------------------------------------------


def test_cli_connection_flags(monkeypatch):
    monkeypatch.setenv("FUSION_TOKEN", "from-env")
    args = build_parser().parse_args(
        ["health", "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "c.key"]
    )
    assert (args.tls_ca, args.tls_cert, args.tls_key, args.token) == (
        "ca.pem",
        "c.pem",
        "c.key",
        "from-env",
    )
    args = build_parser().parse_args(["generate", "hi", "--token", "explicit"])
    assert args.token == "explicit" and args.tls_ca is None


async def test_interceptor_over_server_only_tls(certs):
    credentials = grpc.ssl_server_credentials(
        [(certs.read("server_key"), certs.read("server_cert"))]
    )
    server, target = await _start(credentials)
    good = {"authorization": "Bearer good-token"}
    tls = grpc.ssl_channel_credentials(certs.read("ca"))
    try:
        async with AsyncFusionClient(target, timeout=10, credentials=tls) as client:
            assert await client.health() == "SERVING"  # no client cert needed
            assert await _code(client.generate("hi")) == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncFusionClient(target, timeout=10, credentials=tls, metadata=good) as c:
            assert (await c.generate("hi")).text == "echo: hi"
        async with AsyncFusionClient(target, timeout=5, metadata=good) as c:  # plaintext
            assert await _code(c.generate("hi")) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)

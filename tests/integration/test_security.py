"""TLS, mutual TLS and bearer tokens on the real `fusion serve` (one server for the module).

Certificates are made here (tests/certutil.py); the server runs with server.tls
(client CA set: client certificates required) and server.auth.tokens_file.
"""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
from certutil import make_certs
from conftest import start_server, tiny_config

from fusion_client import FusionClient

TOKEN = "s3cret-token-for-tests"
PROMPT = "a secret prompt that must not be logged"


@pytest.fixture(scope="module")
def secure(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    certs = make_certs(tmp / "certs")
    tokens = tmp / "tokens"
    tokens.write_text(f"# tokens for the test\n{TOKEN}\n\nanother-token\n")
    config = tiny_config(
        tiny_models,
        server={
            "metrics_port": -1,
            "tls": {
                "cert_file": str(certs.server_cert),
                "key_file": str(certs.server_key),
                "client_ca_file": str(certs.ca),
            },
            "auth": {"tokens_file": str(tokens)},
        },
    )
    mtls = grpc.ssl_channel_credentials(
        certs.read("ca"), certs.read("client_key"), certs.read("client_cert")
    )
    with start_server(config, tiny_models, tmp, credentials=mtls) as server:
        yield SimpleNamespace(
            target=server.target, certs=certs, mtls=mtls, log=server.log, proc=server.proc
        )


def _code(call) -> grpc.StatusCode:
    try:
        result = call()
        if not hasattr(result, "text"):  # a stream: drain it
            list(result)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_health_over_mtls_needs_no_token(secure):
    with FusionClient(secure.target, credentials=secure.mtls, timeout=10) as client:
        assert client.health() == "SERVING"


def test_generate_without_token_is_unauthenticated(secure):
    with FusionClient(secure.target, credentials=secure.mtls, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(PROMPT, max_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "missing or invalid bearer token"
        assert _code(lambda: client.generate_stream(PROMPT, max_tokens=4)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert _code(client.get_ensemble) == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_token_is_unauthenticated(secure):
    for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", TOKEN, "Bearer "):
        metadata = {"authorization": header}
        with FusionClient(
            secure.target, credentials=secure.mtls, metadata=metadata, timeout=30
        ) as client:
            assert _code(lambda c=client: c.generate(PROMPT, max_tokens=4)) == (
                grpc.StatusCode.UNAUTHENTICATED
            ), header
            assert _code(lambda c=client: c.generate_stream(PROMPT, max_tokens=4)) == (
                grpc.StatusCode.UNAUTHENTICATED
            ), header


def test_right_token_generates(secure):
    metadata = {"authorization": f"Bearer {TOKEN}"}
    with FusionClient(secure.target, credentials=secure.mtls, metadata=metadata, timeout=60) as c:
        response = c.generate(PROMPT, max_tokens=4, ignore_eos=True)
        assert response.usage.completion_tokens == 4
        messages = list(c.generate_stream(PROMPT, max_tokens=4, ignore_eos=True))
        assert messages[-1].usage.completion_tokens == 4
        assert "".join(m.text for m in messages) == response.text  # greedy: same text
        assert c.get_ensemble().members
    with FusionClient(
        secure.target,
        credentials=secure.mtls,
        metadata={"authorization": "Bearer another-token"},
        timeout=60,
    ) as c:
        assert c.generate(PROMPT, max_tokens=2).usage.completion_tokens >= 1


def test_client_without_certificate_cannot_connect(secure):
    no_cert = grpc.ssl_channel_credentials(secure.certs.read("ca"))
    metadata = {"authorization": f"Bearer {TOKEN}"}
    with FusionClient(secure.target, credentials=no_cert, metadata=metadata, timeout=10) as c:
        assert _code(c.health) == grpc.StatusCode.UNAVAILABLE
        assert _code(lambda: c.generate(PROMPT, max_tokens=2)) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_connect(secure):
    metadata = {"authorization": f"Bearer {TOKEN}"}
    with FusionClient(secure.target, metadata=metadata, timeout=10) as c:
        assert _code(c.health) == grpc.StatusCode.UNAVAILABLE
        assert _code(lambda: c.generate(PROMPT, max_tokens=2)) == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_cannot_connect(secure, tmp_path):
    other = make_certs(tmp_path / "other", ca_name="another CA")
    creds = grpc.ssl_channel_credentials(
        other.read("ca"), other.read("client_key"), other.read("client_cert")
    )
    with FusionClient(secure.target, credentials=creds, timeout=10) as c:
        assert _code(c.health) == grpc.StatusCode.UNAVAILABLE


def test_cli_with_tls_flags_and_token(secure, capsys, monkeypatch):
    from fusion_client.cli import main

    flags = [
        "--server",
        secure.target,
        "--tls-ca",
        str(secure.certs.ca),
        "--tls-cert",
        str(secure.certs.client_cert),
        "--tls-key",
        str(secure.certs.client_key),
        "--timeout",
        "60",
    ]
    monkeypatch.delenv("FUSION_TOKEN", raising=False)
    assert main(["health", *flags]) == 0
    assert main(["generate", PROMPT, "--max-tokens", "2", *flags]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("FUSION_TOKEN", TOKEN)
    assert main(["generate", PROMPT, "--max-tokens", "2", *flags]) == 0


def test_server_log_has_no_prompt_or_token(secure):
    text = secure.log.read_text(errors="replace")
    assert PROMPT not in text
    assert TOKEN not in text

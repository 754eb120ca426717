"""The committed generated gRPC code matches protos/ (run `make proto` if not)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh():
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_proto_follows_the_contract():
    from fusion_client import fusion_pb2

    service = fusion_pb2.DESCRIPTOR.services_by_name["FusionService"]
    assert fusion_pb2.DESCRIPTOR.package == "fusion.v1"
    assert {m.name for m in service.methods} >= {"Generate", "GenerateStream", "GetEnsemble"}
    req = fusion_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    assert set(req) >= {"request_id", "prompt", "sampling", "fusion", "output"}
    sampling = fusion_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    assert set(sampling) >= {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "ignore_eos",
    }
    assert fusion_pb2.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"

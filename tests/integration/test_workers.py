"""Members as engine workers, on real engines: a `fusion worker` subprocess serving one
member to a `fusion serve` whose other member is local gives exactly the all-local
output; a killed worker gives UNAVAILABLE (server stays up), a restarted one is used
again; `server.member_workers` gives the same output too."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest
from conftest import MAX_MODEL_LEN, TOP_K, start_server, tiny_config
from netutil import free_port

from fusion_client._proto.fusion.v1 import engine_pb2, engine_pb2_grpc

PROMPTS = [
    "def merge(a, b):\n    ",
    "class Stack:\n    def __init__(self):",
    "import os\nfor name in os.listdir(",
    "Héllo wörld — 世界 ",
]
TOKENS = 24


def worker_info(port: int, timeout: float = 5.0) -> engine_pb2.InfoResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return engine_pb2_grpc.EngineWorkerStub(channel).Info(
            engine_pb2.InfoRequest(), timeout=timeout
        )


@contextlib.contextmanager
def run_worker(model, port: int, log_path):
    """`fusion worker` in a subprocess until its Info answers; SIGKILL-able by the test."""
    args = [
        sys.executable,
        "-m",
        "fusion_server",
        "worker",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--top-k",
        str(TOP_K),
        "--engine",
        f"max_model_len={MAX_MODEL_LEN}",
        "--engine",
        f"kv_cache_memory_bytes={128 * 1024**2}",
        "--engine",
        "enforce_eager=true",
    ]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"worker exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                worker_info(port, timeout=2)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    pytest.fail(f"worker not ready:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def live_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are not zombies."""
    pids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def outputs(client) -> list[str]:
    return [client.generate(p, max_tokens=TOKENS, ignore_eos=True).text for p in PROMPTS]


@pytest.fixture(scope="module")
def all_local(server) -> list[str]:
    """The all-local ensemble's greedy outputs (the session server)."""
    with server.client() as client:
        return outputs(client)


def test_local_plus_remote_member_equals_all_local_and_survives_a_restart(
    tiny_models, all_local, tmp_path
):
    port = free_port()
    log = tmp_path / "worker.log"
    config = tiny_config(tiny_models)
    alpha = config["members"][0]
    assert alpha["name"] == "alpha"
    config["members"][0] = {"name": "alpha", "endpoint": f"127.0.0.1:{port}", "weight": 1.0}
    with (
        run_worker(tiny_models["alpha"], port, log) as worker,
        start_server(config, tiny_models, tmp_path) as server,
        server.client() as client,
    ):
        members = {m.name: m for m in client.get_ensemble().members}
        assert set(members) == {"alpha", "beta"}
        assert f"127.0.0.1:{port}" in members["alpha"].model
        assert outputs(client) == all_local

        # Kill the worker while a request streams: that request fails UNAVAILABLE.
        stream = client.generate_stream(PROMPTS[0], max_tokens=400, ignore_eos=True)
        next(iter(stream))
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        with pytest.raises(grpc.RpcError) as failed:
            list(stream)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        # While it is down: UNAVAILABLE and NOT_SERVING, and the server stays up.
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(PROMPTS[1], max_tokens=4)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "alpha" in refused.value.details()
        assert server.proc.poll() is None
        assert wait_health(client, "NOT_SERVING")

        # A restarted worker on the same address is used again, same outputs.
        with run_worker(tiny_models["alpha"], port, log):
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert outputs(client) == all_local
                    break
                except grpc.RpcError as err:  # the router reconnects within ~2 s
                    if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            assert worker_info(port).engine_requests == 0  # every session was closed
            assert wait_health(client, "SERVING")


def wait_health(client, status: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while client.health() != status:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_member_workers_switch_equals_all_local_and_relaunches_a_dead_worker(
    tiny_models, all_local, tmp_path
):
    config = tiny_config(tiny_models)
    config["server"]["member_workers"] = True
    with start_server(config, tiny_models, tmp_path) as server, server.client() as client:
        assert outputs(client) == all_local
        children = subprocess.run(
            ["pgrep", "-P", str(server.proc.pid), "-f", "fusion_server worker"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(children) == 2  # one worker process per member
        argv = [pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children]
        sockets = [pathlib.Path(a[a.index(b"--listen") + 1].decode()[len("unix:") :]) for a in argv]
        assert all(s.is_socket() for s in sockets)
        killed = int(children[0])
        assert len(live_in_group(killed)) >= 2  # the worker and its EngineCore
        os.kill(killed, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as refused:  # until the relaunched one is warm
            for _ in range(20):
                client.generate(PROMPTS[1], max_tokens=4)
                time.sleep(0.2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 300
        while True:
            try:
                assert outputs(client) == all_local
                break
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        assert server.proc.poll() is None
        assert live_in_group(killed) == []  # the dead worker's EngineCore went too
    assert not any(s.parent.exists() for s in sockets)  # shutdown removed the socket dirs

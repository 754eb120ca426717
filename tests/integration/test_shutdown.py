"""SIGTERM while streaming: no new work accepted, in-flight streams finish, clean exit."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import psutil
from conftest import start_server, tiny_config

from fusion_client import fusion_pb2


def test_sigterm_drains_in_flight_streams_then_exits(tiny_models, tmp_path):
    config = tiny_config(tiny_models, server={"grace_seconds": 60})
    with start_server(config, tiny_models, tmp_path) as server:
        engines = [c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)]
        assert engines  # each member's EngineCore (and worker) processes
        first_delta = [0] * 4

        def stream(i: int) -> tuple[str, int, int]:
            with server.client() as c:
                text, last = "", None
                for n, msg in enumerate(
                    c.generate_stream(f"def job_{i}():", max_tokens=120, ignore_eos=True)
                ):
                    if n == 0:
                        first_delta[i] = 1
                    text += msg.text
                    last = msg
                return text, last.finish_reason, last.usage.completion_tokens

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, i) for i in range(4)]
            while sum(first_delta) < 4:
                time.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with server.client() as c:
                # gRPC's stop(grace) closes the listener at once: a new caller sees
                # NOT_SERVING or, more often, a refused connection (UNAVAILABLE).
                try:
                    status = c.health(timeout=5)
                except grpc.RpcError as err:
                    status = err.code().name
                assert status in ("NOT_SERVING", "UNAVAILABLE")
                try:
                    c.generate("def late():", max_tokens=2, timeout=5)
                    raise AssertionError("a new request was accepted while draining")
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
            results = [f.result(timeout=120) for f in futures]
        for _, finish, tokens in results:
            assert finish == fusion_pb2.FINISH_REASON_LENGTH and tokens == 120
        assert server.proc.wait(timeout=90) == 0
        time.sleep(1)
        assert not [
            pid
            for pid in engines
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
        ]

"""Helpers shared by the test suites that start a real server (integration, deploy)."""

from __future__ import annotations

import socket
import time
import urllib.request


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    """Prometheus text exposition at url -> {'name{labels}': value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_serving(proc, client, log, budget: float, started: float | None = None) -> None:
    """Poll `client.health()` until SERVING; fail if `proc` exits or `budget` s pass
    (counted from `started`, a time.monotonic() value; default: now)."""
    import pytest

    started = time.monotonic() if started is None else started
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            if client.health(timeout=5) == "SERVING":
                return
        except Exception:
            pass  # the port opens a moment after the process starts
        if time.monotonic() - started > budget:
            pytest.fail(f"server not SERVING within {budget} s:\n{log.read_text()[-5000:]}")
        time.sleep(0.5)

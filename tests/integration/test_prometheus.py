"""/metrics is valid Prometheus exposition, scraped by a real Prometheus server.

The test set-up installs Debian's `prometheus` package (prometheus + promtool) when
it is missing (CI machines run as root with Debian's repositories reachable).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from netutil import free_port


@pytest.fixture(scope="module")
def prometheus_bin() -> tuple[str, str]:
    if not (shutil.which("promtool") and shutil.which("prometheus")):
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            pytest.fail(f"could not install Debian's prometheus:\n{result.stdout}\n{result.stderr}")
    return shutil.which("prometheus"), shutil.which("promtool")


def test_metrics_pass_promtool(server, client, prometheus_bin):
    client.generate("def f():", max_tokens=4, ignore_eos=True)
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read()
    result = subprocess.run(
        [prometheus_bin[1], "check", "metrics"], input=text, capture_output=True
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    names = {
        line.split()[2] for line in text.decode().splitlines() if line.startswith("# HELP fusion_")
    }
    assert {
        "fusion_requests_total",
        "fusion_running_requests",
        "fusion_request_duration_seconds",
        "fusion_step_fanout_seconds",
        "fusion_fuse_seconds",
        "fusion_generated_tokens_total",
        "fusion_member_agreement_total",
        "fusion_member_engine_requests",
        "fusion_queued_requests",
        "fusion_time_to_first_token_seconds",
        "fusion_inter_token_latency_seconds",
        "fusion_prompt_tokens_total",
        "fusion_policy_requests_total",
        "fusion_member_engine_running_requests",
        "fusion_member_engine_waiting_requests",
        "fusion_member_kv_cache_usage_ratio",
        "fusion_member_step_seconds",
        "fusion_member_up",
        "fusion_member_restarts_total",
    } <= names
    samples = server.metrics()
    for member in server.models:  # every member's engine figures, labelled, side by side
        assert samples[f'fusion_member_up{{member="{member}"}}'] == 1
        assert samples[f'fusion_member_step_seconds_count{{member="{member}"}}'] >= 5
        assert f'fusion_member_kv_cache_usage_ratio{{member="{member}"}}' in samples
    assert samples['fusion_policy_requests_total{policy="mean"}'] >= 1
    assert samples["fusion_time_to_first_token_seconds_count"] >= 1
    assert samples["fusion_inter_token_latency_seconds_count"] >= 3


def _query(port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except OSError:
        return None
    results = body.get("data", {}).get("result", [])
    return float(results[0]["value"][1]) if results else None


def test_real_prometheus_scrapes_and_values_move(server, client, prometheus_bin, tmp_path):
    metrics_port = server.metrics_url.split(":")[2].split("/")[0]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: fusion\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    web_port = free_port()
    proc = subprocess.Popen(
        [
            prometheus_bin[0],
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def wait_for(expr: str, ok, timeout: float = 60.0) -> float:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                value = _query(web_port, expr)
                if value is not None and ok(value):
                    return value
                time.sleep(0.5)
            pytest.fail(f"prometheus: {expr} did not reach the expected value")

        assert wait_for('up{job="fusion"}', lambda v: v == 1) == 1
        before = wait_for("fusion_generated_tokens_total", lambda v: True)
        client.generate("import os\n", max_tokens=12, ignore_eos=True)
        after = wait_for("fusion_generated_tokens_total", lambda v: v >= before + 12)
        assert after >= before + 12
        ok = wait_for('sum(fusion_requests_total{code="OK"})', lambda v: v >= 1)
        assert ok >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""The CPU image's entrypoint, run outside a container, serves the demo ensemble from the
file the cpu-demo overlay mounts: the Dockerfile's build step for the demo members, its
ENV, ENTRYPOINT + CMD with the Deployment's flags, then health, Generate, a metrics
scrape and SIGTERM, as a kubelet and an operator would see them."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml
from deploy_support import (
    DOCKERFILES,
    K8S,
    dockerfile_argv,
    dockerfile_env,
    flag_value,
    one,
    server_container,
)
from netutil import free_port, scrape, wait_serving

from fusion_client import FusionClient

CONFIG_IN_IMAGE = "/etc/fusion/ensemble.yaml"
OVERLAY = K8S / "overlays" / "cpu-demo"


def local_argv(argv: list[str], grpc_port: int, metrics_port: int) -> list[str]:
    """The image's argv with the file the overlay mounts at /etc/fusion and free ports
    (nothing else changes)."""
    out = list(argv)
    out[out.index("--config") + 1] = str(OVERLAY / "ensemble.yaml")
    out[out.index("--port") + 1] = str(grpc_port)
    out[out.index("--metrics-port") + 1] = str(metrics_port)
    return out


@pytest.mark.integration
def test_cpu_image_entrypoint_serves_the_cpu_demo_overlay_config(rendered, tmp_path):
    argv = dockerfile_argv(DOCKERFILES["cpu"])
    objects = rendered["overlays/cpu-demo"]
    container = server_container(objects)
    assert [*container["command"], *container["args"]] == argv  # same command, same flags
    assert flag_value(argv, "--config") == CONFIG_IN_IMAGE

    # The image's environment (its paths replaced by this machine's), the venv's `fusion`.
    bin_dir = str(pathlib.Path(sys.executable).parent)
    env = {**os.environ, **dockerfile_env(DOCKERFILES["cpu"])}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        HOME=os.environ.get("HOME", str(tmp_path)),
        FUSION_CACHE=str(tmp_path / "fusion-cache"),
    )
    # The image's build step for the demo members (RUN fusion demo-models).
    subprocess.run(["fusion", "demo-models", "--tiny"], env=env, check=True, timeout=300)

    grpc_port, metrics_port = free_port(), free_port()
    log = tmp_path / "server.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            local_argv(argv, grpc_port, metrics_port),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # The kubelet's budget for a start: the startup probe's period x failure threshold.
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    try:
        with FusionClient(f"127.0.0.1:{grpc_port}") as client:
            wait_serving(proc, client, log, budget=budget, started=started)
            assert client.health(timeout=5) == "SERVING"

            ensemble = client.get_ensemble(timeout=30)
            assert [m.name for m in ensemble.members] == ["alpha", "beta"]
            assert all(str(tmp_path / "fusion-cache") in m.model for m in ensemble.members)
            reply = client.generate("import os", max_tokens=8, timeout=60)
            assert reply.usage.completion_tokens >= 1

        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert samples['fusion_requests_total{code="OK",rpc="Generate"}'] >= 1
        # The autoscaler's metric is one the server exports.
        hpa = one(rendered["overlays/cpu-demo+components/autoscaling"], "HorizontalPodAutoscaler")
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in samples

        proc.send_signal(signal.SIGTERM)
        grace = yaml.safe_load((OVERLAY / "ensemble.yaml").read_text())["server"]["grace_seconds"]
        pod_grace = objects[[o["kind"] for o in objects].index("Deployment")]["spec"]["template"][
            "spec"
        ]["terminationGracePeriodSeconds"]
        assert grace < pod_grace
        # Stops inside the pod's termination grace period (else the kubelet SIGKILLs it).
        assert proc.wait(timeout=pod_grace) == 0, log.read_text()[-5000:]
        assert "server stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

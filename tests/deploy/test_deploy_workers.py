"""deploy/: the workers overlay — each member its own Deployment + Service, the router
reaching them at `endpoint:` — and the pieces agree: names, ports, probes, selectors,
the worker's argv (parsed by the real `fusion worker` parser), the network policy."""

from __future__ import annotations

import pytest
import yaml
from deploy_support import K8S, find, one

from fusion_server.cli import build_parser
from fusion_server.config import EnsembleConfig

OVERLAY = "overlays/workers-cpu-demo"


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and In-expressions) matches labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


@pytest.fixture
def objects(rendered):
    return rendered[OVERLAY]


def test_every_member_is_a_worker_deployment_and_service(objects):
    config_map = next(o for o in find(objects, "ConfigMap") if "ensemble.yaml" in o["data"])
    text = config_map["data"]["ensemble.yaml"]
    assert text == (K8S / OVERLAY / "ensemble.yaml").read_text()
    config = EnsembleConfig.from_dict(yaml.safe_load(text))
    router_pod = one(objects, "Deployment", "fusion-serve")["spec"]["template"]
    parser = build_parser()
    for member in config.members:
        assert member.model is None, member.name
        host, port = member.endpoint.rsplit(":", 1)
        service = one(objects, "Service", host)
        deployment = one(objects, "Deployment", f"fusion-worker-{member.name}")
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert labels["fusion.dev/member"] == member.name
        assert _selects({"matchLabels": service["spec"]["selector"]}, labels)
        assert _selects(deployment["spec"]["selector"], labels)
        # no other member's or the router's pods behind this Service
        for other in find(objects, "Deployment"):
            if other is not deployment:
                assert not _selects(
                    {"matchLabels": service["spec"]["selector"]},
                    other["spec"]["template"]["metadata"]["labels"],
                )
        (svc_port,) = service["spec"]["ports"]
        assert svc_port["port"] == int(port) and svc_port["appProtocol"] == "kubernetes.io/h2c"
        (container,) = pod["spec"]["containers"]
        args = parser.parse_args(container["args"])
        assert args.command == "worker" and args.model == f"demo:{member.name}"
        assert container["ports"] == [
            {"name": "grpc", "containerPort": args.port, "protocol": "TCP"}
        ]
        assert svc_port["targetPort"] == "grpc"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == args.port, probe
        policy = one(objects, "NetworkPolicy", f"fusion-worker-{member.name}")
        assert _selects(policy["spec"]["podSelector"], labels)
        (rule,) = policy["spec"]["ingress"]
        assert [p["port"] for p in rule["ports"]] == ["grpc"]
        assert any(
            _selects(f["podSelector"], router_pod["metadata"]["labels"]) for f in rule["from"]
        )
        assert not any(_selects(f["podSelector"], labels) for f in rule["from"])


def test_router_pod_runs_no_engine(objects):
    container = one(objects, "Deployment", "fusion-serve")["spec"]["template"]["spec"][
        "containers"
    ][0]
    worker = one(objects, "Deployment", "fusion-worker-alpha")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["resources"]["limits"]["memory"] != worker["resources"]["limits"]["memory"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]

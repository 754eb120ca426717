"""deploy/: every overlay renders, every object validates against Kubernetes schemas, the
security linters (checkov, hadolint) find nothing unjustified, and the pieces agree with
each other and with the server (ports, probes, selectors, entrypoint, ensemble config)."""

from __future__ import annotations

import copy
import json
import pathlib
import re
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    DOCKER,
    DOCKERFILES,
    K8S,
    K8S_VERSIONS,
    OVERLAYS,
    REPO,
    dockerfile_argv,
    dockerfile_env,
    dockerfile_instructions,
    dockerfile_stages,
    ensure_checkov,
    find,
    flag_value,
    hadolint_exe,
    one,
    run_checkov,
    server_container,
)

from fusion_server.config import EnsembleConfig

SERVICEMONITOR_SCHEMA = json.loads(
    (pathlib.Path(__file__).parent / "servicemonitor.schema.json").read_text()
)
CLUSTER_SCOPED = {"Namespace"}
OVERLAY_NAMES = [p.name for p in OVERLAYS]


def overlay_objects(rendered, name: str) -> list[dict]:
    return rendered[f"overlays/{name}"]


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "fusion-serve")["spec"]["template"]["spec"]


def ensemble_of(objects: list[dict]) -> tuple[str, dict]:
    """The ensemble YAML the Deployment mounts at /etc/fusion (text and parsed)."""
    spec = pod_spec(objects)
    mount = next(m for m in server_container(objects)["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/fusion" and mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == "config")
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    text = config_map["data"]["ensemble.yaml"]
    return text, yaml.safe_load(text)


# ---- rendering and schemas ----


def test_there_are_the_two_overlays():
    assert {"gpu", "cpu-demo"} <= set(OVERLAY_NAMES)


def test_every_target_renders(rendered):
    for key, objects in rendered.items():
        assert objects, key
        kinds = {o["kind"] for o in objects}
        if key.startswith("overlays/"):
            assert {
                "Namespace",
                "ServiceAccount",
                "ConfigMap",
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "ServiceMonitor",
                "NetworkPolicy",
            } <= kinds, key
        if "components/autoscaling" in key:
            assert "HorizontalPodAutoscaler" in kinds, key


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_kubernetes_schemas(rendered, version):
    version = kubernetes_validate.latest_version() if version == "latest" else version
    checked = 0
    for key, objects in rendered.items():
        for obj in objects:
            where = f"{key}: {obj['kind']}/{obj['metadata']['name']}"
            if obj["kind"] == "ServiceMonitor":  # a CRD: its own (subset) schema
                jsonschema.validate(obj, SERVICEMONITOR_SCHEMA)
            else:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    pytest.fail(f"{where}: {err}")
            checked += 1
    assert checked >= 20


def test_the_validators_reject_an_unknown_field(rendered):
    deployment = copy.deepcopy(one(overlay_objects(rendered, "gpu"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), True)
    monitor = copy.deepcopy(one(overlay_objects(rendered, "gpu"), "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICEMONITOR_SCHEMA)


def test_every_namespaced_object_has_a_namespace(rendered):
    for key, objects in rendered.items():
        namespaces = {o["metadata"]["name"] for o in find(objects, "Namespace")}
        for obj in objects:
            if obj["kind"] in CLUSTER_SCOPED:
                continue
            namespace = obj["metadata"].get("namespace")
            assert namespace and namespace != "default", f"{key}: {obj['kind']}"
            if namespaces:
                assert namespace in namespaces, f"{key}: {obj['kind']}"


# ---- security linters ----


def test_checkov_finds_nothing_unjustified(rendered, tmp_path):
    checkov = ensure_checkov()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for key, objects in rendered.items():
        name = re.sub(r"[^A-Za-z0-9]+", "_", key) + ".yaml"
        (manifests / name).write_text(yaml.safe_dump_all(objects, sort_keys=False))
    reports = run_checkov(checkov, "kubernetes", manifests)
    reports += run_checkov(checkov, "dockerfile", DOCKER)
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, list(by_type)
    failed, skipped = [], []
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["check_type"]
        assert report["summary"]["passed"] > 0, report["check_type"]
        failed += [
            f"{c['check_id']} {c['resource']} ({c['file_path']})"
            for c in report["results"]["failed_checks"]
        ]
        skipped += report["results"]["skipped_checks"]
    assert not failed, "checkov findings:\n" + "\n".join(failed)
    for check in skipped:  # every suppression in the manifests says why
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason) > 30, f"{check['check_id']} {check['resource']}: {reason!r}"
    # The justified ones, and only those (a new suppression is a reviewed change).
    assert sorted({c["check_id"] for c in skipped}) == ["CKV_K8S_43", "CKV_K8S_8", "CKV_K8S_9"]


def test_hadolint_finds_nothing():
    for path in DOCKERFILES.values():
        done = subprocess.run(
            [hadolint_exe(), "--no-color", str(path)], capture_output=True, text=True
        )
        assert done.returncode == 0, f"{path.name}:\n{done.stdout}{done.stderr}"
    # Each ignore names a rule and sits under a comment that justifies it.
    for path in DOCKERFILES.values():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert re.search(r"ignore=DL\d{4}", line), line
                assert lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, line


def test_pods_meet_the_restricted_pod_security_standard(rendered):
    for key, objects in rendered.items():
        for obj in objects:
            if obj["kind"] == "Deployment":
                spec = obj["spec"]["template"]["spec"]
            elif obj["kind"] == "Pod":
                spec = obj["spec"]
            else:
                continue
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] >= 10000, key
            assert pod["seccompProfile"]["type"] == "RuntimeDefault", key
            assert spec["automountServiceAccountToken"] is False, key
            assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), key
            assert all("hostPath" not in v for v in spec.get("volumes", [])), key
            for container in spec["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, key
                assert sc["readOnlyRootFilesystem"] is True, key
                assert sc["capabilities"]["drop"] == ["ALL"], key
                assert not sc.get("capabilities", {}).get("add"), key
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]), key
                assert {"cpu", "memory"} <= set(resources["limits"]), key
        for namespace in find(objects, "Namespace"):
            labels = namespace["metadata"]["labels"]
            assert labels["pod-security.kubernetes.io/enforce"] == "restricted", key


# ---- the pieces agree ----


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_deployment_runs_the_image_entrypoint(rendered, overlay):
    container = server_container(overlay_objects(rendered, overlay))
    argv = [*container["command"], *container["args"]]
    for dockerfile in DOCKERFILES.values():
        assert dockerfile_argv(dockerfile) == argv, dockerfile.name
    assert argv[:2] == ["fusion", "serve"]
    assert flag_value(argv, "--config") == "/etc/fusion/ensemble.yaml"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_ports_probes_and_selectors_line_up(rendered, overlay):
    objects = overlay_objects(rendered, overlay)
    deployment = one(objects, "Deployment", "fusion-serve")
    container = server_container(objects)
    argv = [*container["command"], *container["args"]]
    grpc_port, metrics_port = (
        int(flag_value(argv, "--port")),
        int(flag_value(argv, "--metrics-port")),
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}

    # Native gRPC probes on the health service; a long startup probe.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
        assert "service" not in container[probe]["grpc"], probe  # "" = the whole server
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300

    # Service: the gRPC port as cleartext HTTP/2, and the metrics port.
    service = one(objects, "Service", "fusion-serve")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert by_name["grpc"]["targetPort"] == "grpc" and by_name["metrics"]["targetPort"] == "metrics"

    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        obj = one(objects, kind, "fusion-serve")
        key = "podSelector" if kind == "NetworkPolicy" else "selector"
        assert obj["spec"][key]["matchLabels"].items() <= pod_labels.items(), kind
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1  # a drain never blocks, one replica at a time

    # ServiceMonitor: selects the Service, scrapes its metrics port at /metrics.
    monitor = one(objects, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    policy_ports = {
        p["port"]
        for r in one(objects, "NetworkPolicy", "fusion-serve")["spec"]["ingress"]
        for p in r["ports"]
    }
    assert policy_ports == {"grpc", "metrics"}


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_the_mounted_ensemble_is_a_valid_config(rendered, overlay):
    objects = overlay_objects(rendered, overlay)
    text, data = ensemble_of(objects)
    config = EnsembleConfig.from_dict(data)  # checks engine keys against vLLM's own
    assert config.server.host == "0.0.0.0"  # reachable from the Service
    container = server_container(objects)
    argv = [*container["command"], *container["args"]]
    assert config.server.port == int(flag_value(argv, "--port"))
    assert config.server.metrics_port == int(flag_value(argv, "--metrics-port"))
    spec = pod_spec(objects)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGTERM -> in-flight requests finish (grace_seconds) -> engines stop, inside the
    # pod's termination grace period, with room to spare for the engines' shutdown.
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + config.server.grace_seconds + 20
    # The file in the overlay is the file mounted, byte for byte.
    assert text == (K8S / "overlays" / overlay / "ensemble.yaml").read_text()


def test_scratch_volumes_for_a_read_only_root(rendered):
    for overlay in OVERLAY_NAMES:
        objects = overlay_objects(rendered, overlay)
        mounts = {m["mountPath"]: m["name"] for m in server_container(objects)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
        for path in ("/home/fusion", "/tmp", "/dev/shm"):
            assert "emptyDir" in volumes[mounts[path]], (overlay, path)
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        env = dockerfile_env(DOCKERFILES["gpu" if overlay == "gpu" else "cpu"])
        assert env["HOME"] == "/home/fusion"


def test_gpu_overlay_shares_one_gpu_among_the_members(rendered):
    objects = overlay_objects(rendered, "gpu")
    container = server_container(objects)
    spec = pod_spec(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"] == "8Gi"
    _, data = ensemble_of(objects)
    fractions = [m["engine"]["gpu_memory_utilization"] for m in data["members"]]
    assert len(fractions) >= 2 and all(0 < f < 1 for f in fractions) and sum(fractions) < 1
    # Models: the PVC, mounted read-only at /models; every member's model lives there.
    pvc = one(objects, "PersistentVolumeClaim", "fusion-models")
    volume = next(v for v in spec["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True
    assert all(m["model"].startswith("/models/") for m in data["members"])
    assert one(objects, "Deployment")["spec"]["progressDeadlineSeconds"] >= 1800


def test_cpu_demo_overlay_serves_the_demo_ensemble_without_a_gpu(rendered):
    objects = overlay_objects(rendered, "cpu-demo")
    container = server_container(objects)
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container["resources"][section]
    assert not find(objects, "PersistentVolumeClaim")
    assert container["image"].endswith("-cpu")
    _, data = ensemble_of(objects)
    assert [m["model"] for m in data["members"]] == ["demo:alpha", "demo:beta"]
    # The CPU image carries the same file as its default config.
    copies = [a for k, a in dockerfile_instructions(DOCKERFILES["cpu"]) if k == "COPY"]
    assert "deploy/k8s/overlays/cpu-demo/ensemble.yaml /etc/fusion/ensemble.yaml" in copies


def test_autoscaler_owns_the_replica_count(rendered):
    for overlay in OVERLAY_NAMES:
        objects = rendered[f"overlays/{overlay}+components/autoscaling"]
        hpa = one(objects, "HorizontalPodAutoscaler", "fusion-serve")
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", "fusion-serve")
        assert "replicas" not in one(objects, "Deployment", "fusion-serve")["spec"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"].startswith("fusion_")
        _, data = ensemble_of(objects)
        limit = data["limits"]["max_concurrent_requests"]
        assert int(metric["pods"]["target"]["averageValue"]) < limit  # before refusals
        # Without the component, the Deployment keeps its replica count.
        assert (
            one(overlay_objects(rendered, overlay), "Deployment", "fusion-serve")["spec"][
                "replicas"
            ]
            >= 1
        )


def test_model_loader_mounts_the_model_volume_read_write(rendered):
    objects = rendered["tools/model-loader"]
    pod = one(objects, "Pod")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "models")
    gpu_pvc = one(overlay_objects(rendered, "gpu"), "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == gpu_pvc["metadata"]["name"]
    assert pod["metadata"]["namespace"] == gpu_pvc["metadata"]["namespace"]
    assert pod["spec"]["activeDeadlineSeconds"] > 0


# ---- the Dockerfiles ----


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_and_non_root(flavour):
    path = DOCKERFILES[flavour]
    stages = dockerfile_stages(path)
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0][1].split()[0]
        assert ":" in image and not image.endswith(":latest"), image
    final = stages[-1]
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 10000
    assert any(k == "COPY" and a.startswith("--from=build") for k, a in final)
    assert {"50051", "9400"} <= set(" ".join(a for k, a in final if k == "EXPOSE").split())
    env = dockerfile_env(path)
    assert env["HF_HUB_OFFLINE"] == "1"
    # A Dockerfile-specific ignore file keeps the context to what the image installs.
    ignore = path.with_name(path.name + ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1 :], "allow-list after '*'"
    for kind, args in dockerfile_instructions(path):
        if kind == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), source
                assert f"!{source}" in ignore, source


def test_cpu_dockerfile_installs_like_the_makefile():
    run_lines = " ".join(a for k, a in dockerfile_instructions(DOCKERFILES["cpu"]) if k == "RUN")
    assert '"torch==2.13.0+cpu" --index-url "${TORCH_INDEX}"' in run_lines
    assert 'pip install ".[cpu]"' in run_lines
    assert "pip uninstall -y torchvision torchaudio torchcodec" in run_lines
    assert "fusion demo-models" in run_lines  # the demo members, baked in
    assert dockerfile_env(DOCKERFILES["cpu"])["FUSION_CACHE"] == "/opt/fusion/demo"
    makefile = (REPO / "Makefile").read_text()
    assert "uninstall -q -y torchvision torchaudio torchcodec" in makefile
    assert 'pip install ".[gpu]"' in " ".join(
        a for k, a in dockerfile_instructions(DOCKERFILES["gpu"]) if k == "RUN"
    )
    assert pathlib.Path(DOCKER / "Dockerfile.gpu").read_text().count("FROM nvidia/cuda:") == 2

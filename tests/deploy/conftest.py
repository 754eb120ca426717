"""Deploy-test fixtures: kubectl (installed from Debian if missing), rendered overlays."""

from __future__ import annotations

import pathlib

import pytest
from deploy_support import (
    COMPONENTS,
    K8S,
    OVERLAYS,
    TOOLS,
    ToolError,
    ensure_kubectl,
    kustomize_version,
    render,
    render_with_components,
)


@pytest.fixture(scope="session")
def kubectl() -> str:
    try:
        exe = ensure_kubectl()
    except ToolError as err:
        pytest.fail(str(err))
    version = kustomize_version(exe)
    major = int(version.lstrip("v").split(".")[0] or 0) if version else 0
    if major < 5:
        pytest.fail(
            f"{exe}: embedded kustomize {version or '(unknown)'}; these manifests need v5+ "
            "(kubectl 1.27 or newer)"
        )
    return exe


@pytest.fixture(scope="session")
def rendered(kubectl, tmp_path_factory) -> dict[str, list[dict]]:
    """Every target an operator applies: each overlay, each overlay with each optional
    component, and each tool, keyed by its path under deploy/k8s (`+` joins components)."""
    targets: dict[str, list[dict]] = {}
    work = tmp_path_factory.mktemp("kustomize")
    for overlay in OVERLAYS:
        key = str(overlay.relative_to(K8S))
        targets[key] = render(kubectl, overlay)
        for component in COMPONENTS:
            if component.name == "model-volume":
                continue  # not optional: the gpu overlay has it, cpu-demo needs none
            combo = f"{key}+{component.relative_to(K8S)}"
            targets[combo] = render_with_components(
                kubectl, overlay, [component], work / combo.replace("/", "_")
            )
    for tool in TOOLS:
        targets[str(tool.relative_to(K8S))] = render(kubectl, tool)
    return targets


def pytest_collection_modifyitems(items):
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.deploy)

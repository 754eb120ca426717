"""`model: demo:NAME` in a config file names a built-in demo member (no vLLM, no generation)."""

from __future__ import annotations

import pathlib

import pytest

from fusion_server import demo
from fusion_server.config import ConfigError, EnsembleConfig


@pytest.fixture
def fake_demo(monkeypatch, tmp_path):
    calls = []

    def ensure_demo_models(root=None, specs=demo.DEMO_MEMBERS):
        calls.append(root)
        return {spec.name: tmp_path / "demo" / spec.name for spec in specs}

    monkeypatch.setattr(demo, "ensure_demo_models", ensure_demo_models)
    return calls


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "ensemble.yaml"
    path.write_text(text)
    return path


def test_demo_members_resolve_to_the_generated_dirs(tmp_path, fake_demo):
    path = write(
        tmp_path,
        "members:\n"
        "  - {name: a, model: 'demo:alpha', weight: 2}\n"
        "  - {name: b, model: 'demo:beta'}\n"
        "  - {name: c, model: /models/other}\n",
    )
    config = EnsembleConfig.load(path)
    assert [m.model for m in config.members] == [
        str(tmp_path / "demo" / "alpha"),
        str(tmp_path / "demo" / "beta"),
        "/models/other",
    ]
    assert config.members[0].weight == 2
    assert len(fake_demo) == 1  # generated (or found) once for all demo members


def test_no_demo_member_generates_nothing(tmp_path, fake_demo):
    EnsembleConfig.load(write(tmp_path, "members:\n  - {name: a, model: /models/a}\n"))
    assert fake_demo == []


def test_unknown_demo_member_names_the_field_and_the_known_ones(tmp_path, fake_demo):
    path = write(
        tmp_path,
        "members:\n  - {name: a, model: 'demo:alpha'}\n  - {name: g, model: 'demo:gamma'}\n",
    )
    with pytest.raises(ConfigError) as err:
        EnsembleConfig.load(path)
    assert err.value.field == "members[1].model"
    assert "demo:gamma" in str(err.value) and "alpha, beta" in str(err.value)
    assert fake_demo == []  # refused before generating anything


def test_trained_demo_members_resolve_and_train_only_those_named(tmp_path, fake_demo, monkeypatch):
    trained = []

    def ensure_trained_models(names=None, root=None, specs=None, steps=None):
        trained.append(names)
        return {n: tmp_path / "trained" / n for n in names}

    monkeypatch.setattr(demo, "ensure_trained_models", ensure_trained_models)
    path = write(
        tmp_path,
        "members:\n"
        "  - {name: a, model: 'demo:trained-alpha'}\n"
        "  - {name: g, model: 'demo:trained-gamma'}\n",
    )
    config = EnsembleConfig.load(path)
    assert [m.model for m in config.members] == [
        str(tmp_path / "trained" / "alpha"),
        str(tmp_path / "trained" / "gamma"),
    ]
    assert trained == [("alpha", "gamma")] and fake_demo == []  # no tiny members made


def test_the_default_demo_ensemble_is_the_trained_pair(tmp_path, monkeypatch):
    from fusion_server.config import demo_config

    def ensure_trained_models(names=None, root=None, specs=None, steps=None):
        return {n: tmp_path / n for n in names}

    monkeypatch.setattr(demo, "ensure_trained_models", ensure_trained_models)
    config = demo_config()
    assert [(m.name, m.model) for m in config.members] == [
        ("alpha", str(tmp_path / "alpha")),
        ("beta", str(tmp_path / "beta")),
    ]

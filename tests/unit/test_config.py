"""Config validation: every error names the field."""

from __future__ import annotations

import pytest
import yaml

from fusion_server.config import ConfigError, EnsembleConfig


def base() -> dict:
    return {
        "members": [
            {"name": "alpha", "model": "/m/a", "weight": 1.0, "engine": {}},
            {"name": "beta", "model": "/m/b"},
        ],
        "fusion": {"policy": "mean", "top_k": 20},
        "server": {"port": 50051, "metrics_port": 9400},
    }


def test_minimal_config_loads_with_defaults():
    cfg = EnsembleConfig.from_dict(base())
    assert [m.name for m in cfg.members] == ["alpha", "beta"]
    assert cfg.members[1].weight == 1.0
    assert cfg.fusion.top_k == 20 and cfg.limits.max_tokens >= cfg.limits.default_max_tokens
    assert (cfg.fusion.eos, cfg.fusion.alignment) == ("fused", "auto")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("members"), "members"),
        (lambda d: d.update(members=[]), "members"),
        (lambda d: d["members"][1].update(weight=-1), "members[1].weight"),
        (lambda d: d["members"][1].update(weight="heavy"), "members[1].weight"),
        (lambda d: d["members"][0].pop("model"), "members[0].model"),
        (lambda d: d["members"][1].update(name="alpha"), "members[1].name"),
        (lambda d: d["members"][0].update(colour="red"), "members[0].colour"),
        (lambda d: d["members"][0].update(engine=[1]), "members[0].engine"),
        (lambda d: d["members"][0].update(engine={"model": "x"}), "members[0].engine.model"),
        (lambda d: [m.update(weight=0) for m in d["members"]], "members[].weight"),
        (lambda d: d["fusion"].update(top_k=0), "fusion.top_k"),
        (lambda d: d["fusion"].update(top_k=1000), "fusion.top_k"),
        (lambda d: d["fusion"].update(policy=""), "fusion.policy"),
        (lambda d: d["fusion"].update(eos="first"), "fusion.eos"),
        (lambda d: d["fusion"].update(alignment="tokens"), "fusion.alignment"),
        (lambda d: d["server"].update(port=70000), "server.port"),
        (lambda d: d["server"].update(metrics_port=-5), "server.metrics_port"),
        (lambda d: d.update(limits={"max_tokens": 0}), "limits.max_tokens"),
        (
            lambda d: d.update(limits={"max_tokens": 8, "default_max_tokens": 16}),
            "limits.default_max_tokens",
        ),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.update(fusion="mean"), "fusion"),
    ],
)
def test_errors_name_the_field(mutate, field):
    data = base()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        EnsembleConfig.from_dict(data)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_load_resolves_relative_model_paths_and_reports_bad_files(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    data = base()
    data["members"][0]["model"] = "models/a"
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = EnsembleConfig.load(path)
    assert cfg.members[0].model == str((tmp_path / "models" / "a").resolve())
    with pytest.raises(ConfigError, match="no such file"):
        EnsembleConfig.load(tmp_path / "missing.yaml")
    path.write_text("members: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        EnsembleConfig.load(path)


def test_engine_defaults_are_overridden_by_member_settings():
    data = base()
    data["members"][0]["engine"] = {"max_model_len": 128}
    cfg = EnsembleConfig.from_dict(data).with_engine_defaults(
        {"max_model_len": 2048, "dtype": "float32"}
    )
    assert cfg.members[0].engine == {"max_model_len": 128, "dtype": "float32"}
    assert cfg.members[1].engine == {"max_model_len": 2048, "dtype": "float32"}

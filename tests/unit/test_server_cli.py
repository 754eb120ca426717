"""The server CLI says which extra to install when the server's modules are missing."""

from __future__ import annotations

import importlib.util

from fusion_server import cli


def test_missing_server_extra_names_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fusion-serve[cpu]'" in err and "vllm" in err


def test_config_error_exits_2_naming_the_field(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "missing_server_module", lambda: None)
    bad = tmp_path / "e.yaml"
    bad.write_text("members:\n  - name: a\n    model: /x\n    weight: -2\n")
    assert cli.main(["serve", "--config", str(bad)]) == 2
    assert "members[0].weight" in capsys.readouterr().err

"""Config and CLI for engine workers: `endpoint:` members, server.member_workers,
`fusion worker` argument errors; every error names the field."""

from __future__ import annotations

import pytest

from fusion_server import cli
from fusion_server.config import ConfigError, EnsembleConfig


def remote_config(**member) -> dict:
    return {
        "members": [
            {"name": "alpha", "model": "/m/a"},
            {"name": "beta", "endpoint": "worker-beta:50061", **member},
        ]
    }


def test_endpoint_member_loads_and_gets_no_engine_defaults():
    cfg = EnsembleConfig.from_dict(remote_config()).with_engine_defaults({"dtype": "float32"})
    assert cfg.members[1].endpoint == "worker-beta:50061" and cfg.members[1].model is None
    assert cfg.members[1].engine == {}
    assert cfg.members[0].engine == {"dtype": "float32"}
    assert cfg.server.member_workers is False


@pytest.mark.parametrize(
    "endpoint", ["worker-beta:50061", "10.0.0.7:1", "[::1]:50061", "unix:/run/beta.sock"]
)
def test_endpoint_forms(endpoint):
    EnsembleConfig.from_dict(remote_config(endpoint=endpoint))


@pytest.mark.parametrize(
    ("member", "field"),
    [
        ({"model": "/m/b"}, "members[1].model"),  # both model and endpoint
        ({"endpoint": None}, "members[1].model"),  # neither
        ({"endpoint": "worker-beta"}, "members[1].endpoint"),
        ({"endpoint": "worker-beta:0"}, "members[1].endpoint"),
        ({"endpoint": "worker-beta:http"}, "members[1].endpoint"),
        ({"endpoint": ":50061"}, "members[1].endpoint"),
        ({"endpoint": 50061}, "members[1].endpoint"),
        ({"engine": {"max_model_len": 64}}, "members[1].engine"),
    ],
)
def test_endpoint_errors_name_the_field(member, field):
    with pytest.raises(ConfigError) as err:
        EnsembleConfig.from_dict(remote_config(**member))
    assert err.value.field == field, str(err.value)


def test_member_workers_must_be_a_bool():
    data = remote_config()
    data["server"] = {"member_workers": "yes"}
    with pytest.raises(ConfigError) as err:
        EnsembleConfig.from_dict(data)
    assert err.value.field == "server.member_workers"


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--engine", "max_model_len"], "--engine"),
        (["--engine-json", "{not json"], "--engine-json"),
        (["--top-k", "0"], "--top-k"),
    ],
)
def test_worker_cli_errors_exit_2_naming_the_flag(argv, field, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "missing_server_module", lambda: None)
    assert cli.main(["worker", "--model", str(tmp_path), *argv]) == 2
    assert field in capsys.readouterr().err


def test_worker_cli_refuses_a_missing_model_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "missing_server_module", lambda: None)
    monkeypatch.setattr(cli, "_on_cpu", lambda: False)
    assert cli.main(["worker", "--model", str(tmp_path / "nope")]) == 2
    assert "--model" in capsys.readouterr().err


def make_tokenizer(path, words: list[str]) -> str:
    """A tiny word-level tokenizer saved the way Hugging Face model directories hold one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return str(path)


def test_a_workers_tokenizer_files_load_as_the_same_vocabulary(tmp_path):
    from fusion_server.engines.worker import tokenizer_files
    from fusion_server.router.ensemble import Ensemble, load_vocab

    source = make_tokenizer(tmp_path / "model", ["[UNK]", "def", "return", "x"])
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights never travel")
    files = tokenizer_files(source)
    assert "tokenizer.json" in {f.name for f in files}
    assert "model.safetensors" not in {f.name for f in files}
    fetched = tmp_path / "fetched"  # what RemoteMember.start writes from Info
    fetched.mkdir()
    for f in files:
        (fetched / f.name).write_bytes(f.content)
    assert load_vocab(str(fetched)).fingerprint == load_vocab(source).fingerprint

    other = make_tokenizer(tmp_path / "other", ["[UNK]", "def", "yield", "x"])
    config = EnsembleConfig.from_dict(remote_config())
    same = Ensemble.load_vocabs(config, [source, str(fetched)])  # same vocabulary: shared ids
    assert same[0].fingerprint == same[1].fingerprint
    mixed = Ensemble.load_vocabs(config, [source, other])  # another one: byte alignment
    assert mixed[0].fingerprint != mixed[1].fingerprint
    with pytest.raises(ConfigError) as err:
        Ensemble.load_vocabs(config, [source, str(tmp_path / "empty")])
    assert err.value.field == "members[1].endpoint"

"""The demo training code, a few steps only (the real runs take minutes)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fusion_server import demo, demo_train
from fusion_server.vocab import byte_table, fingerprint, special_ids, tokenizer_kind


def test_held_out_modules_are_never_training_files():
    root = demo_train.stdlib_root()
    held = {root / m for m in demo_train.HELD_OUT_MODULES}
    assert held & set(demo_train.training_files()) == set()
    assert not set(demo.CORPUS_MODULES) & set(demo_train.HELD_OUT_MODULES)  # tokenizer corpus
    halves = [set(demo_train.training_files((i, 2), seed=1234)) for i in range(2)]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(demo_train.training_files())


def test_a_few_steps_train_and_save_a_loadable_member(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gamma = next(s for s in demo_train.TRAINED_MEMBERS if s.name == "gamma")
    spec = dataclasses.replace(gamma, batch_size=2, seq_len=32)
    paths = demo.ensure_trained_models(("gamma",), root=tmp_path, specs=(spec,), steps=3)
    path = paths["gamma"]
    summary = json.loads((path / "train.json").read_text())
    assert summary["steps"] == 3 and summary["train_loss"] > 0
    assert summary["held_out"] == list(demo_train.HELD_OUT_MODULES)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.num_hidden_layers == 6
    assert model.config.hidden_size // model.config.num_attention_heads in (32, 64)
    tok = AutoTokenizer.from_pretrained(path)
    assert tokenizer_kind(tok) == "sentencepiece" and len(tok) == 3072
    text = "def f(x):\n    return x ** 2  # é ✓\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(byte_table(tok)[i] for i in ids) == text.encode()
    # cached: a second call trains nothing and returns the same directory
    assert demo.ensure_trained_models(("gamma",), root=tmp_path, specs=(spec,), steps=3) == paths


def test_gamma_has_its_own_vocabulary(tmp_path):
    pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    demo.train_tokenizer(tmp_path / "shared")
    demo_train.train_sentencepiece_tokenizer(tmp_path / "sp", max_bytes=200_000)
    prints = set()
    for name in ("shared", "sp"):
        tok = AutoTokenizer.from_pretrained(tmp_path / name)
        prints.add(fingerprint(byte_table(tok), special_ids(tok)))
    assert len(prints) == 2

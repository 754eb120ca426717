"""Byte tables of small tokenizers trained offline: byte-level BPE and SentencePiece-style."""

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fusion_server.vocab import byte_table, fingerprint, special_ids, tokenizer_kind

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "café",
    "naïve",
    "héllo",
    "world",
    "fusion",
    "token",
]
SAMPLES = [
    "héllo 世界 🙂",
    "the quick brown fox",
    "naïve café 🙂🙂 jumps",
    "tabs\tand\nnewlines",
    "über 日本語 ok",
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(300)]


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf.add_tokens(["<think>"])
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return hf


def _sentencepiece(prepend_scheme: str) -> PreTrainedTokenizerFast:
    """Llama-2-like: BPE with byte fallback, ``▁`` Metaspace, <0xNN> in the base vocab."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    # rebuild the model so that <0xNN> byte tokens are plain vocab entries, as in Llama-2
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    vocab = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    vocab += [t for t in trained if t not in vocab]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(vocab)}
    spec["model"]["byte_fallback"] = True
    spec["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def byte_level():
    return _byte_level()


@pytest.fixture(scope="module")
def spiece():
    return _sentencepiece("never")


def _join(table: list[bytes], ids: list[int]) -> bytes:
    return b"".join(table[i] for i in ids)


def test_kinds(byte_level, spiece):
    assert tokenizer_kind(byte_level) == "byte-level-bpe"
    assert tokenizer_kind(spiece) == "sentencepiece"
    word = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tokenizer_kind(PreTrainedTokenizerFast(tokenizer_object=word)) == "other"


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_round_trip(byte_level, text):
    table = byte_table(byte_level)
    ids = byte_level.encode(text, add_special_tokens=False)
    assert _join(table, ids) == text.encode()


@pytest.mark.parametrize("text", SAMPLES)
def test_sentencepiece_round_trip(spiece, text):
    table = byte_table(spiece)
    ids = spiece.encode(text, add_special_tokens=False)
    assert _join(table, ids) == text.encode()


def test_sentencepiece_uses_byte_fallback(spiece):
    ids = spiece.encode("🙂", add_special_tokens=False)
    assert spiece.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert _join(byte_table(spiece), ids) == "🙂".encode()


def test_sentencepiece_dummy_prefix_is_a_space():
    tok = _sentencepiece("first")
    ids = tok.encode("héllo 世界 🙂", add_special_tokens=False)
    assert _join(byte_table(tok), ids) == " héllo 世界 🙂".encode()


def test_byte_level_covers_all_bytes(byte_level):
    singles = {entry for entry in byte_table(byte_level) if len(entry) == 1}
    assert singles == {bytes([b]) for b in range(256)}


def test_special_and_added_tokens(byte_level, spiece):
    table = byte_table(byte_level)
    ids = special_ids(byte_level)
    assert {byte_level.eos_token_id, byte_level.convert_tokens_to_ids("<|im_start|>")} <= ids
    assert all(table[i] == b"" for i in ids)
    think = byte_level.convert_tokens_to_ids("<think>")
    assert think not in ids and table[think] == b"<think>"
    encoded = byte_level.encode("<think>hi<|im_start|>x", add_special_tokens=False)
    assert _join(table, encoded) == b"<think>hix"

    sp_table = byte_table(spiece)
    assert special_ids(spiece) == {0, 1, 2}
    assert sp_table[:3] == [b"", b"", b""]
    assert sp_table[3 + 0x0A] == b"\n"


def test_table_size(byte_level):
    assert len(byte_table(byte_level)) == len(byte_level)
    padded = byte_table(byte_level, vocab_size=len(byte_level) + 7)
    assert len(padded) == len(byte_level) + 7 and padded[-7:] == [b""] * 7


def test_fingerprint(byte_level, spiece):
    table = byte_table(byte_level)
    specials = special_ids(byte_level)
    again = _byte_level()
    assert fingerprint(table, specials) == fingerprint(byte_table(again), special_ids(again))
    assert len(fingerprint(table, specials)) == 64
    changed = list(table)
    changed[50] += b"x"
    assert fingerprint(changed, specials) != fingerprint(table, specials)
    assert fingerprint(table, specials | {5}) != fingerprint(table, specials)
    assert fingerprint(byte_table(spiece), special_ids(spiece)) != fingerprint(table, specials)


@pytest.fixture(scope="module")
def unigram():
    from fusion_server.tinyvocab import train_unigram

    return train_unigram(None, 200, "\n".join(_corpus()))


@pytest.mark.parametrize("text", SAMPLES)
def test_unigram_with_byte_fallback_round_trip(unigram, text):
    table = byte_table(unigram)
    ids = unigram.encode(text, add_special_tokens=False)
    assert tokenizer_kind(unigram) == "sentencepiece"
    assert _join(table, ids) == b" " + text.encode()  # "always" dummy prefix: a real space
    assert all(table[i] == b"" for i in special_ids(unigram))


def test_member_vocab_eos_from_generation_config(tmp_path, spiece):
    from fusion_server.vocab import load_member_vocab

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    vocab = load_member_vocab(spiece, str(tmp_path))
    assert vocab.eos_ids == {spiece.eos_token_id, 2, 7}
    assert vocab.fingerprint == fingerprint(byte_table(spiece), special_ids(spiece))
    assert load_member_vocab(spiece, str(tmp_path / "missing")).eos_ids == {spiece.eos_token_id}
    vocab.pad_to(len(vocab.table) + 3)
    assert vocab.table[-3:] == [b""] * 3

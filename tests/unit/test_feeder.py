"""Per-member continuation encoding (feeder): exact bytes, held partial characters,
no dummy prefix or BOS, special-token text as text, invalid bytes as byte tokens."""

from __future__ import annotations

import random

import pytest
from test_vocab import _byte_level, _corpus

from fusion_server.feeder import ContinuationEncoder, Feeder, incomplete_tail
from fusion_server.tinyvocab import train_sentencepiece_bpe, train_unigram
from fusion_server.vocab import byte_table, special_ids

TEXTS = [
    "the quick brown fox",
    " leading space and  double  spaces ",
    "naïve café über",
    "日本語のテキスト 世界",
    "emoji 🙂🎉 and 👩‍💻 joined",
    "tabs\tand\nnewlines\n",
    "</s> <s> <unk> <|endoftext|> typed as text",
]


def _legacy_llama():
    """Older Llama-2 tokenizer.json layout: a Prepend("▁") normalizer, no Metaspace."""
    from tokenizers import normalizers

    tok = train_sentencepiece_bpe(None, vocab_size=400, text="\n".join(_corpus()))
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = None
    return tok


TOKENIZERS = {
    "byte-level": _byte_level,
    "spm-first": lambda: train_sentencepiece_bpe(None, 400, "\n".join(_corpus())),
    "unigram-always": lambda: train_unigram(None, 200, "\n".join(_corpus())),
    "legacy-prepend": _legacy_llama,
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def encoder(request):
    tok = TOKENIZERS[request.param]()
    table = byte_table(tok)
    return ContinuationEncoder(request.param, tok, table, special_ids(tok))


def _spell(encoder, ids) -> bytes:
    return b"".join(encoder.table[i] for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_spells_exactly_the_bytes(encoder, text):
    data = text.encode()
    assert _spell(encoder, encoder.encode(data)) == data
    assert _spell(encoder, encoder.encode(b"world")) == b"world"  # no dummy prefix


def test_no_special_ids_from_text(encoder):
    ids = encoder.encode(b"</s><s><unk><|endoftext|>")
    specials = {i for i, entry in enumerate(encoder.table) if entry == b""}
    assert not specials & set(ids)


def test_invalid_utf8_becomes_byte_tokens(encoder):
    data = b"ok \xff\xfe \x80 done \xe4"
    assert _spell(encoder, encoder.encode(data)) == data


@pytest.mark.parametrize("seed", range(4))
def test_feeder_chunks_hold_partial_characters(encoder, seed):
    rng = random.Random(seed)
    data = " ".join(TEXTS).encode()
    feeder = Feeder(encoder)
    sent = b""
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 5)
        chunk = data[pos : pos + step]
        pos += step
        sent += _spell(encoder, feeder.push(chunk))
        assert sent + feeder.held == data[:pos]
        # what was sent is whole characters; only an unfinished one is held
        sent.decode("utf-8")
        assert len(feeder.held) == incomplete_tail(data[:pos])


def test_take_feeds_the_proposed_token_and_clears_what_was_held(encoder):
    feeder = Feeder(encoder)
    assert feeder.push("世".encode()[:2]) == []
    assert feeder.held == "世".encode()[:2]
    assert feeder.take(42) == [42]
    assert feeder.held == b""


@pytest.mark.parametrize(
    ("data", "tail"),
    [
        (b"", 0),
        (b"abc", 0),
        ("é".encode(), 0),
        ("é".encode()[:1], 1),
        (b"x" + "世".encode()[:2], 2),
        ("🙂".encode()[:3], 3),
        ("🙂".encode(), 0),
        (b"\x80\x80", 0),  # stray continuation bytes: never completes, not held
        (b"\xff", 0),
    ],
)
def test_incomplete_tail(data, tail):
    assert incomplete_tail(data) == tail


def test_slow_tokenizer_is_refused_by_name():
    class Slow:
        pass

    with pytest.raises(ValueError, match="member 'x': byte alignment needs a fast tokenizer"):
        ContinuationEncoder("x", Slow(), [b""], set())

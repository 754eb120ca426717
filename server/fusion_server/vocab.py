"""Per-tokenizer byte tables: token id -> the exact bytes the token stands for.

Contract: built once per member tokenizer, at start-up; the router works on these
tables only (it never calls the tokenizer's decoder on the hot path). Two members
share a vocabulary iff their fingerprints are equal.

- byte-level BPE (GPT-2, Llama-3, Qwen): each character of a token is one byte via
  the GPT-2 ``bytes_to_unicode`` alphabet (``Ġ`` = space, ``Ċ`` = newline, ...); a
  token with a character outside that alphabet stands for its own UTF-8 bytes (what
  the ``ByteLevel`` decoder does).
- SentencePiece style (Llama-2, Mistral, Gemma): ``▁`` is a space and ``<0xNN>``
  byte-fallback tokens are the single byte NN. The dummy-prefix space that
  SentencePiece adds when it encodes text from its very beginning is an encode-time
  artefact and is not undone here: in a continuation ``▁`` is a real space.
- non-special added tokens stand for their literal text; special tokens (and ids with
  no token) produce no text: ``b""``.
- anything else ("other", e.g. WordPiece) is best effort via
  ``convert_tokens_to_string`` per token.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import struct
from dataclasses import dataclass, field
from functools import cache
from typing import Any

SPIECE_SPACE = "\u2581"  # ▁
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    inverse = {chr(b): b for b in printable}
    shifted = sorted(set(range(256)) - set(printable))
    for n, b in enumerate(shifted):
        inverse[chr(256 + n)] = b
    return inverse


def _component_types(node: Any) -> set[str]:
    """Types of a tokenizers pipeline component, looking inside Sequence nodes."""
    if not isinstance(node, dict):
        return set()
    types = {node.get("type", "")}
    for child in (*node.get("decoders", ()), *node.get("pretokenizers", ())):
        types |= _component_types(child)
    return types


def tokenizer_kind(tokenizer) -> str:
    """One of "byte-level-bpe", "sentencepiece", "other"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        decoder, pre = spec.get("decoder"), spec.get("pre_tokenizer")
        types = _component_types(decoder) | _component_types(pre)
        if "ByteLevel" in types:
            return "byte-level-bpe"
        if types & {"Metaspace", "ByteFallback"} or SPIECE_SPACE in json.dumps(
            decoder, ensure_ascii=False
        ):
            return "sentencepiece"
        return "other"
    if getattr(tokenizer, "sp_model", None) is not None:
        return "sentencepiece"
    return "other"


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token (named specials and added tokens marked special)."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    ids |= {int(i) for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return ids


def _byte_level(token: str) -> bytes:
    inverse = _unicode_to_byte()
    try:
        return bytes(inverse[ch] for ch in token)
    except KeyError:
        return token.encode("utf-8")


def _sentencepiece(token: str) -> bytes:
    match = _BYTE_TOKEN.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace(SPIECE_SPACE, " ").encode("utf-8")


def byte_table(tokenizer, vocab_size: int | None = None) -> list[bytes]:
    """id -> bytes for every id below max(len(tokenizer), vocab_size).

    ``vocab_size`` lets the table cover a model's padded embedding rows (ids with no
    token map to b"").
    """
    kind = tokenizer_kind(tokenizer)
    specials = special_ids(tokenizer)
    added = {int(i): tok.content for i, tok in tokenizer.added_tokens_decoder.items()}
    id_to_token = {int(i): tok for tok, i in tokenizer.get_vocab().items()}
    top_id = max([*id_to_token, *added], default=-1)
    size = max(len(tokenizer), vocab_size or 0, top_id + 1)
    to_bytes = {"byte-level-bpe": _byte_level, "sentencepiece": _sentencepiece}.get(kind)

    table = [b""] * size
    for i, token in id_to_token.items():
        if i in specials or i in added or not token:
            continue
        if to_bytes is not None:
            table[i] = to_bytes(token)
        else:
            table[i] = tokenizer.convert_tokens_to_string([token]).encode("utf-8")
    for i, content in added.items():
        if i not in specials:
            table[i] = content.encode("utf-8")
    return table


def fingerprint(table: list[bytes], special_ids: set[int] | frozenset[int]) -> str:
    """sha256 hex of a byte table and its special ids; equal tables -> equal prints."""
    h = hashlib.sha256(b"fusion-serve/vocab/v1\0")
    h.update(struct.pack("<Q", len(table)))
    for entry in table:
        h.update(struct.pack("<I", len(entry)))
        h.update(entry)
    ids = sorted(int(i) for i in special_ids)
    h.update(struct.pack("<Q", len(ids)))
    h.update(struct.pack(f"<{len(ids)}q", *ids))
    return h.hexdigest()


@dataclass
class MemberVocab:
    """One member's tokenizer as the router needs it."""

    tokenizer: Any
    """The Hugging Face tokenizer (prompts, continuation encoding)."""
    table: list[bytes]
    """id -> bytes, padded to the model's embedding rows once the engine is up."""
    specials: frozenset[int]
    """Special ids (they spell b"")."""
    eos_ids: frozenset[int]
    """Ids that end generation: the tokenizer's EOS and the model's generation_config ones."""
    kind: str
    """tokenizer_kind()."""
    fingerprint: str
    """fingerprint() of the unpadded table and the special ids."""
    special_names: dict[int, str] = field(default_factory=dict)
    """Special id -> its token text ("<s>"): members share a special candidate by name."""
    encoder: Any = None
    """Continuation encoder (``feeder.ContinuationEncoder``); None: built from ``tokenizer``."""

    def pad_to(self, vocab_size: int) -> None:
        if len(self.table) < vocab_size:
            self.table = self.table + [b""] * (vocab_size - len(self.table))


def eos_ids(tokenizer, model_dir: str | None = None) -> frozenset[int]:
    """The tokenizer's EOS id plus generation_config.json's ``eos_token_id`` (int or list)
    when ``model_dir`` is a local directory that has one (what vLLM stops on)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    if model_dir is not None:
        path = pathlib.Path(model_dir) / "generation_config.json"
        try:
            extra = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            extra = None
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, list):
            ids.update(int(i) for i in extra if isinstance(i, int))
    return frozenset(ids)


def load_member_vocab(tokenizer, model_dir: str | None = None) -> MemberVocab:
    table = byte_table(tokenizer)
    specials = frozenset(special_ids(tokenizer))
    names = tokenizer.convert_ids_to_tokens(sorted(specials))
    return MemberVocab(
        tokenizer=tokenizer,
        table=table,
        specials=specials,
        eos_ids=eos_ids(tokenizer, model_dir),
        kind=tokenizer_kind(tokenizer),
        fingerprint=fingerprint(table, specials),
        special_names={i: n for i, n in zip(sorted(specials), names, strict=True) if n},
    )

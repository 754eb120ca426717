"""Per-member incremental encoding of the chosen text: bytes in, that member's ids out.

Contract: under byte alignment every member keeps its own tokenization of the text
generated so far. After each step the router hands each member's ``Feeder`` either
the exact token that member proposed for the chosen candidate (``take``: the member
is fed that very id, never a re-encoding of it) or the chosen bytes (``push``: the
member's own encoding of them, zero or more ids, sent in one chunk).

- Boundary rule: a feeder holds back only an incomplete UTF-8 tail (at most 3
  bytes: a character split across candidates) until it completes; everything else is
  encoded at once. ``held`` is what the member has not been sent yet, so the
  member's last top-k speaks about text that starts with ``held``.
- Encoding is a continuation, not a fresh text: no BOS/EOS, no SentencePiece dummy
  prefix (``Metaspace`` prepend schemes and ``Prepend`` normalizers are turned off),
  no GPT-2 ``add_prefix_space``, and special-token text (``</s>`` typed as text) is
  encoded as text, never as the special id.
- Bytes that can never become valid UTF-8 are sent as the member's single-byte
  tokens (``<0xNN>`` byte fallback, the byte-level alphabet); a tokenizer with no such
  token for a byte drops it (logged once).
- Every encoding is checked against the member's byte table; one that does not spell
  the bytes exactly (a Unigram model matching ``</s>`` typed as text as its piece) is
  redone one character at a time, single-byte tokens where a character still fails.
  A lossy tokenizer (normalizers, ``<unk>``, no byte tokens) may still not spell some
  text: its best encoding is sent and the mismatch logged once per member (the output
  text is still exactly the chosen bytes; only that member's context differs).
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def incomplete_tail(data: bytes) -> int:
    """Length (0..3) of a trailing UTF-8 sequence that is well-formed so far but unfinished."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: look further back for the lead
            continue
        if 0xC2 <= b <= 0xF4:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return back if back < need else 0
        return 0
    return 0


def _escaped(ch: str) -> bool:
    """A byte that is not valid UTF-8, as decoded with errors="surrogateescape"."""
    return "\udc80" <= ch <= "\udcff"


def _continuation_spec(node):
    """A tokenizer.json component with every text-start artefact switched off."""
    if isinstance(node, list):
        return [c for c in (_continuation_spec(x) for x in node) if c is not None]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Prepend":  # legacy Llama normalizer: "▁" before the text
        return None
    node = {k: _continuation_spec(v) for k, v in node.items()}
    if kind == "Metaspace":
        node["prepend_scheme"] = "never"
        node.pop("add_prefix_space", None)
    if kind == "ByteLevel" and "add_prefix_space" in node:
        node["add_prefix_space"] = False
    if kind == "Sequence":
        for key in ("normalizers", "pretokenizers"):
            if key in node and not node[key]:
                return None
    return node


class ContinuationEncoder:
    """Encodes bytes that continue a text, in one member's vocabulary."""

    def __init__(self, name: str, tokenizer, table: list[bytes], specials: set[int]):
        from tokenizers import Tokenizer

        self.name = name
        self.table = table
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"member {name!r}: byte alignment needs a fast tokenizer (a tokenizer.json), "
                f"got {type(tokenizer).__name__}"
            )
        spec = json.loads(backend.to_str())
        for key in ("normalizer", "pre_tokenizer"):
            spec[key] = _continuation_spec(spec.get(key))
        spec["post_processor"] = None
        self._tok = Tokenizer.from_str(json.dumps(spec))
        self._tok.encode_special_tokens = True
        self.byte_ids: list[int | None] = [None] * 256
        for i, entry in enumerate(table):
            if len(entry) == 1 and i not in specials and self.byte_ids[entry[0]] is None:
                self.byte_ids[entry[0]] = i
        self._warned = False

    def encode(self, data: bytes) -> list[int]:
        """ids whose bytes are ``data`` (see the module contract for lossy tokenizers)."""
        if not data:
            return []
        try:
            ids = self._text(data.decode("utf-8"))
        except UnicodeDecodeError:
            ids = self._mixed(data)
        if self._spell(ids) != data:  # e.g. a Unigram model matching "</s>" as a piece
            ids = self._by_char(data)
            if not self._warned and self._spell(ids) != data:
                self._warned = True
                log.warning("member %s cannot spell %r exactly (lossy tokenizer)", self.name, data)
        return ids

    def _spell(self, ids: list[int]) -> bytes:
        return b"".join(self.table[i] for i in ids)

    def _by_char(self, data: bytes) -> list[int]:
        """Slow exact path: one character at a time, single-byte tokens where that fails."""
        ids: list[int] = []
        for ch in data.decode("utf-8", errors="surrogateescape"):
            raw = ch.encode("utf-8", errors="surrogateescape")
            piece = [] if _escaped(ch) else self._text(ch)
            if self._spell(piece) != raw:
                piece = [self.byte_ids[b] for b in raw if self.byte_ids[b] is not None]
            ids += piece
        return ids

    def _text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _mixed(self, data: bytes) -> list[int]:
        """Valid runs as text, invalid bytes as single-byte tokens."""
        ids: list[int] = []
        run: list[str] = []
        for ch in data.decode("utf-8", errors="surrogateescape"):
            if _escaped(ch):
                if run:
                    ids += self._text("".join(run))
                    run = []
                byte_id = self.byte_ids[ord(ch) - 0xDC00]
                if byte_id is not None:
                    ids.append(byte_id)
            else:
                run.append(ch)
        if run:
            ids += self._text("".join(run))
        return ids


class Feeder:
    """One member's view of one request's output: bytes not sent yet, and the encoder."""

    __slots__ = ("encoder", "held")

    def __init__(self, encoder: ContinuationEncoder):
        self.encoder = encoder
        self.held = b""

    def push(self, data: bytes) -> list[int]:
        """The member's encoding of ``data`` after what it holds; holds a partial char."""
        buf = self.held + data
        cut = len(buf) - incomplete_tail(buf)
        self.held = buf[cut:]
        return self.encoder.encode(buf[:cut])

    def take(self, token_id: int) -> list[int]:
        """The member proposed this token (its bytes are ``held`` + the chosen bytes)."""
        self.held = b""
        return [token_id]

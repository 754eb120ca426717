"""Training data for distillation: read, validate, hash, tokenize, pack.

Contract: `load_documents(path)` accepts a UTF-8 text file (one document), a JSONL file (one object per line with "text", or "prompt" +
"completion" which are joined), or a directory (every *.txt / *.py / *.md / *.jsonl
file in it, sorted). Errors are `DistillError`s naming the file and the problem; no
input produces an empty dataset silently. `pack` turns token ids into fixed-length
training rows (BOS at each document start, no padding: the last partial row is
dropped unless it is the only one).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import dataclass

TEXT_SUFFIXES = (".txt", ".py", ".md")


class DistillError(RuntimeError):
    """A distillation input or run problem, reported to the user as is (exit 2)."""


@dataclass
class Dataset:
    documents: list[str]
    sha256: str
    """Hash of the documents (content, not paths)."""
    source: str


def _read_jsonl(path: pathlib.Path) -> list[str]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DistillError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise DistillError(f"{path}:{n}: expected an object")
        if isinstance(obj.get("text"), str):
            docs.append(obj["text"])
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            docs.append(obj["prompt"] + obj["completion"])
        else:
            raise DistillError(f'{path}:{n}: needs "text", or "prompt" and "completion" strings')
    return docs


def _read_file(path: pathlib.Path) -> list[str]:
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise DistillError(f"{path}: not UTF-8 text") from None


def load_documents(path: str | pathlib.Path) -> Dataset:
    """Read training documents from a file or directory (see module docstring)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DistillError(f"--data: {path} does not exist")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl")
        )
        if not files:
            raise DistillError(f"--data: {path} has no .txt, .py, .md or .jsonl files")
    else:
        files = [path]
    docs = [d for f in files for d in _read_file(f) if d.strip()]
    if not docs:
        raise DistillError(f"--data: {path} holds no text (empty data)")
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return Dataset(documents=docs, sha256=h.hexdigest(), source=str(path))


def pack(token_docs: list[list[int]], row_len: int) -> list[list[int]]:
    """Concatenate documents (each already starting with BOS) into rows of row_len ids."""
    if row_len < 2:
        raise DistillError("--seq-len must be at least 1")
    stream = [t for doc in token_docs for t in doc]
    rows = [stream[i : i + row_len] for i in range(0, len(stream) - row_len + 1, row_len)]
    if not rows and len(stream) >= 2:
        rows = [stream]
    if not rows:
        raise DistillError("--data: too little text to train on (fewer than 2 tokens)")
    return rows

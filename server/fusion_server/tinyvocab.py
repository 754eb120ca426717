"""Tiny members whose tokenizers differ: the test bed of cross-vocabulary fusion.

Contract: ``ensure_mixed_models()`` returns {member name: model dir} for three tiny
random Llama members (built like the demo members, ``demo.build_tiny_model``), each
with its own tokenizer trained offline in seconds on the demo corpus:

- ``bpe``: byte-level BPE, 2048 ids (GPT-2 / Llama-3 / Qwen style; the demo tokenizer);
- ``spm``: SentencePiece-style BPE, 1024 ids (Llama-2 / Mistral style): ``▁`` for
  spaces with a dummy prefix on the first word, ``<0xNN>`` byte-fallback pieces,
  ``<unk>``/``<s>``/``</s>`` and a ``<s>`` prepended to every prompt;
- ``uni``: SentencePiece-style Unigram, 640 pieces + 256 byte pieces (T5 / Gemma
  style): a dummy prefix before every encoded text, ``<pad>``/``</s>``/``<unk>``,
  no BOS.

Models are cached like the demo ones ($FUSION_CACHE), written to a temporary
directory renamed into place. Deterministic for a given Python version.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import tempfile

from .demo import DEMO_VERSION, TinyModelSpec, build_tiny_model, cache_root, corpus_text
from .demo import train_tokenizer as train_byte_level_bpe

MIXED_VERSION = f"mixed-v1-{DEMO_VERSION}"
SPM_SPECIALS = ("<unk>", "<s>", "</s>")
UNI_SPECIALS = ("<pad>", "</s>", "<unk>")
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))

MIXED_MEMBERS = (
    (TinyModelSpec("bpe", seed=11), "byte-level-bpe", 2048),
    (TinyModelSpec("spm", seed=12, num_layers=3), "sentencepiece-bpe", 1024),
    (TinyModelSpec("uni", seed=13, hidden_size=96, num_heads=3, num_kv_heads=1), "unigram", 640),
)


def _chunks(text: str, size: int = 4096):
    return (text[i : i + size] for i in range(0, len(text), size))


def train_sentencepiece_bpe(
    out_dir: pathlib.Path | None, vocab_size: int = 1024, text: str | None = None
):
    """Llama-2-like: BPE over ``▁`` pieces, byte fallback, ``<s>`` before every prompt.

    Saved to ``out_dir``; returned as a transformers tokenizer (``text``: the corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    room = vocab_size - len(SPM_SPECIALS) - len(BYTE_PIECES)
    trainer = trainers.BpeTrainer(
        vocab_size=room, special_tokens=["<unk>"], limit_alphabet=200, show_progress=False
    )
    tok.train_from_iterator(_chunks(text or corpus_text()), trainer)
    # Rebuild the vocabulary in Llama-2's layout: specials, the 256 byte pieces, the rest.
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    vocab = [*SPM_SPECIALS, *BYTE_PIECES]
    vocab += [t for t in trained if t not in set(vocab)]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(vocab)}
    spec["model"]["byte_fallback"] = True
    spec["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(list(SPM_SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return _save(tok, out_dir, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def train_unigram(out_dir: pathlib.Path | None, vocab_size: int = 640, text: str | None = None):
    """T5/Gemma-like: Unigram over ``▁`` pieces with a dummy prefix always, byte fallback.

    Saved to ``out_dir``; returned as a transformers tokenizer (``text``: the corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(UNI_SPECIALS),
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(text or corpus_text(400_000)), trainer)
    spec = json.loads(tok.to_str())
    pieces = spec["model"]["vocab"]  # [[piece, score], ...]
    floor = min(score for _, score in pieces) - 10.0
    known = {p for p, _ in pieces}
    pieces += [[b, floor] for b in BYTE_PIECES if b not in known]
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Metaspace(replacement="▁", prepend_scheme="always"),
        ]
    )
    return _save(tok, out_dir, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


def _save(tok, out_dir: pathlib.Path | None, **special):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.model_max_length = 2048
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


TRAINERS = {
    "byte-level-bpe": train_byte_level_bpe,
    "sentencepiece-bpe": train_sentencepiece_bpe,
    "unigram": train_unigram,
}


def ensure_mixed_models(root: pathlib.Path | None = None) -> dict[str, pathlib.Path]:
    """{member name: model dir} of the three mixed-vocabulary members, built once."""
    root = (root or cache_root()) / MIXED_VERSION
    recipe = [[spec.__dict__, kind, size] for spec, kind, size in MIXED_MEMBERS]
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = root / key
    paths = {spec.name: target / spec.name for spec, _, _ in MIXED_MEMBERS}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        print(f"fusion: generating the mixed-vocabulary members in {target} (one time)")
        for spec, kind, size in MIXED_MEMBERS:
            tokenizer_dir = staging / f"_{spec.name}_tokenizer"
            TRAINERS[kind](tokenizer_dir, vocab_size=size)
            build_tiny_model(spec, tokenizer_dir, staging / spec.name)
            shutil.rmtree(tokenizer_dir)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return paths

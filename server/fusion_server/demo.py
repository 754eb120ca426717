"""The built-in demo ensemble: tiny members generated offline, cached on first use.

Two Llama-style causal LMs share one byte-level BPE tokenizer trained on a fixed
list of the Python standard library's own modules (every machine has them). Their
weights are random, drawn with a large scale (N(0, 0.35^2)) so that their logits are
peaked and greedy decoding is stable between vLLM and `transformers`. They know
nothing; they exist so that `make serve` and the tests run anywhere in seconds.

Everything is deterministic for a given Python version: same seeds, same corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass

DEMO_VERSION = "tiny-v1"
# Standard-library modules the tokenizer is trained on (present in every CPython).
CORPUS_MODULES = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "functools.py",
    "inspect.py",
    "json/encoder.py",
    "pathlib.py",
    "string.py",
    "textwrap.py",
    "typing.py",
)
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seed of one tiny demo member."""

    name: str
    seed: int
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim 32: vLLM's CPU attention accepts it
    num_kv_heads: int = 2
    intermediate_size: int = 256
    init_std: float = 0.35


DEMO_MEMBERS = (
    TinyModelSpec("alpha", seed=1),
    TinyModelSpec("beta", seed=2, num_layers=3),
)


def cache_root() -> pathlib.Path:
    """Where generated demo models live: $FUSION_CACHE or ~/.cache/fusion-serve."""
    env = os.environ.get("FUSION_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "fusion-serve"


def corpus_text(max_bytes: int = 1_500_000) -> str:
    """The tokenizer's training text: the fixed stdlib modules, concatenated."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for rel in CORPUS_MODULES:
        path = stdlib / rel
        if path.exists():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)[:max_bytes]


def train_tokenizer(out_dir: pathlib.Path, vocab_size: int = 2048) -> None:
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus_text()
    tok.train_from_iterator((text[i : i + 4096] for i in range(0, len(text), 4096)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.model_max_length = 2048
    fast.save_pretrained(out_dir)


def build_tiny_model(
    spec: TinyModelSpec, tokenizer_dir: pathlib.Path, out_dir: pathlib.Path
) -> None:
    """Write one tiny Llama member (config, safetensors weights, tokenizer) to out_dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, spec.init_std)
            elif "norm" in name:
                param.fill_(1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_demo_models(
    root: pathlib.Path | None = None, specs: tuple[TinyModelSpec, ...] = DEMO_MEMBERS
) -> dict[str, pathlib.Path]:
    """Return {member name: model dir}, generating the models once if not cached.

    Writes go to a temporary directory renamed into place, so an interrupted run
    never leaves a half-written model behind.
    """
    root = (root or cache_root()) / DEMO_VERSION
    key = hashlib.sha256(json.dumps([s.__dict__ for s in specs], sort_keys=True).encode())
    target = root / key.hexdigest()[:12]
    paths = {s.name: target / s.name for s in specs}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        print(f"fusion: generating the tiny demo ensemble in {target} (one time, seconds)")
        train_tokenizer(staging / "_tokenizer")
        for spec in specs:
            build_tiny_model(spec, staging / "_tokenizer", staging / spec.name)
        shutil.rmtree(staging / "_tokenizer")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return paths

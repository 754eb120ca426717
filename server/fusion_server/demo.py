"""The built-in demo ensembles, made offline and cached on first use.

- **trained** (what `make serve` serves): small causal LMs trained on the Python
  standard library's own source (``demo_train``), minutes each on 2 CPU cores, once.
  alpha and beta share the byte-level BPE tokenizer below; gamma has its own.
- **tiny** (tests, `demo:tiny-alpha`): two Llama-style members sharing one byte-level
  BPE tokenizer trained on a fixed list of stdlib modules, with random weights drawn
  with a large scale (N(0, 0.35^2)) so that their logits are peaked and greedy decoding
  is stable between vLLM and `transformers`. They know nothing; they exist so that the
  tests run anywhere in seconds.

Everything is deterministic for a given Python (and torch) version: same seeds, same
corpus. Writes go to a temporary directory renamed into place.
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
TRAINED_VERSION = "trained-v2"
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
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .demo_train import model_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = model_config(spec, tokenizer)
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
    target = root / _digest([s.__dict__ for s in specs])
    paths = {s.name: target / s.name for s in specs}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths

    def build(staging: pathlib.Path) -> None:
        print(f"fusion: generating the tiny demo ensemble in {target} (one time, seconds)")
        train_tokenizer(staging / "_tokenizer")
        for spec in specs:
            build_tiny_model(spec, staging / "_tokenizer", staging / spec.name)
        shutil.rmtree(staging / "_tokenizer")

    _staged(target, build)
    return paths


def _staged(target: pathlib.Path, build) -> None:
    """Run build(staging_dir), then rename the staging dir to target (atomic on one fs)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        build(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _digest(obj) -> str:
    """Short stable hash of a JSON-able object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_trained_models(
    names: tuple[str, ...] | None = None,
    root: pathlib.Path | None = None,
    specs=None,
    steps: int | None = None,
) -> dict[str, pathlib.Path]:
    """Return {member name: model dir} of the trained demo members (default: all),
    training each once (minutes, with a progress bar) if it is not cached.

    steps: train this many steps instead of each spec's (tests of the training code).
    """
    from . import demo_train

    specs = specs or demo_train.TRAINED_MEMBERS
    wanted = [s for s in specs if names is None or s.name in names]
    base = (root or cache_root()) / TRAINED_VERSION
    paths = {}
    for spec in wanted:
        key = _digest([spec.__dict__, steps, CORPUS_MODULES, demo_train.HELD_OUT_MODULES])
        target = base / f"{spec.name}-{key}"
        paths[spec.name] = target
        if (target / "config.json").exists():
            continue
        print(f"fusion: training demo member {spec.name} into {target} (one time, minutes)")

        def build(staging: pathlib.Path, spec=spec) -> None:
            if spec.tokenizer == "shared":
                train_tokenizer(staging / "_tokenizer")
            else:
                demo_train.train_sentencepiece_tokenizer(staging / "_tokenizer")
            summary = demo_train.train_member(spec, staging / "_tokenizer", staging, steps)
            shutil.rmtree(staging / "_tokenizer")
            summary["spec"] = spec.__dict__
            summary["held_out"] = list(demo_train.HELD_OUT_MODULES)
            (staging / "train.json").write_text(json.dumps(summary, indent=2, default=str))
            print(
                f"fusion: {spec.name}: {summary['steps']} steps in {summary['seconds']} s, "
                f"train loss {summary['train_loss']} nats/token"
            )

        _staged(target, build)
    return paths

"""Training of the demo members: small causal LMs that have learned Python source.

Contract: deterministic (fixed seeds, a fixed number of steps, sorted file lists) for
a given Python, torch and stdlib. The corpus is the running interpreter's own
standard library (every machine has it offline); the modules in ``HELD_OUT_MODULES``
are never used for training (neither weights nor tokenizers) and are what
`fusion eval` measures on. Each member trains on its own shard of the training files
(``TrainSpec.shard``), so members of similar strength learn different things, which
is where fusion gains come from. torch and tokenizers are imported lazily.
"""

from __future__ import annotations

import math
import pathlib
import random
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass

HELD_OUT_MODULES = (
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "fractions.py",
    "graphlib.py",
    "heapq.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
)
"""Standard-library modules held out from all training: the evaluation text."""
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "turtledemo",
        "ensurepip",
        "tkinter",
        "pydoc_data",
        "__pycache__",
        # Character-map tables (1.4 MB of hex literals): easy to learn, unlike the
        # held-out text, and they crowd out real code in a small budget.
        "encodings",
    }
)


@dataclass(frozen=True)
class TrainSpec:
    """Architecture, data shard and optimisation of one trained demo member."""

    name: str
    seed: int
    tokenizer: str = "shared"
    """'shared' (the byte-level BPE of the tiny members) or 'sentencepiece'."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    """head_dim = hidden_size / num_heads must be 32 or 64 (vLLM CPU attention)."""
    num_kv_heads: int = 1
    intermediate_size: int = 384
    shard: tuple[int, int] = (0, 1)
    """(index, count): train on files i with i % count == index of the shuffled list."""
    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 20


TRAINED_MEMBERS = (
    TrainSpec("alpha", seed=11, shard=(0, 2)),
    TrainSpec(
        "beta",
        seed=22,
        shard=(1, 2),
        hidden_size=192,
        num_layers=3,
        num_heads=3,
        num_kv_heads=3,
    ),
    TrainSpec(
        "gamma",
        seed=33,
        tokenizer="sentencepiece",
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=320,
    ),
)
"""The trained demo ensemble: alpha and beta share the byte-level BPE tokenizer and
learn from disjoint halves of the training files; gamma has its own SentencePiece-style
tokenizer, a deeper and narrower body (6 layers, head_dim 32) and learns from all
of them. (A Qwen2 body was tried: transformers 5 then loads any tokenizer beside a
`qwen2` config as its byte-level Qwen2Tokenizer, which breaks a SentencePiece one.)"""


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def held_out_texts() -> dict[str, str]:
    """{module: source} of the held-out modules present in this Python."""
    root = stdlib_root()
    out = {}
    for rel in HELD_OUT_MODULES:
        path = root / rel
        if path.exists():
            out[rel] = path.read_text(encoding="utf-8", errors="replace")
    return out


def training_files(shard: tuple[int, int] = (0, 1), seed: int = 0) -> list[pathlib.Path]:
    """Stdlib .py files minus tests, tools and the held-out modules; one shard of them."""
    root = stdlib_root()
    held = {root / rel for rel in HELD_OUT_MODULES}
    files = sorted(
        p
        for p in root.rglob("*.py")
        if p not in held and not (set(p.relative_to(root).parts[:-1]) & _SKIP_DIRS)
    )
    random.Random(seed).shuffle(files)
    index, count = shard
    return [p for i, p in enumerate(files) if i % count == index]


def corpus_ids(tokenizer, files: list[pathlib.Path], eos_id: int) -> list[int]:
    """Token ids of the files, one after another, each ended by EOS."""
    ids: list[int] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos_id)
    return ids


def random_windows(ids, batch_size: int, length: int, seed: int) -> Iterator:
    """Batches of `batch_size` windows of `length` ids at seeded random offsets.

    Windows from all over the shard in every batch: consecutive windows of one file
    make correlated batches, which train a small model far worse per step.
    """
    import torch

    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - length, (batch_size,), generator=gen)
        yield torch.stack([data[i : i + length] for i in starts.tolist()])


class Progress:
    """tqdm when it is installed, else one line rewritten in place on stderr."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.t0 = total, desc, 0, time.monotonic()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, postfix: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)
            return
        width = 30
        done = int(width * self.n / self.total)
        elapsed = time.monotonic() - self.t0
        sys.stderr.write(
            f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
            f"{elapsed:.0f}s {postfix}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


def model_config(spec, tokenizer):
    """The transformers LlamaConfig (float32) of a TrainSpec or demo.TinyModelSpec."""
    from transformers import LlamaConfig

    return LlamaConfig(
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


def train_member(
    spec: TrainSpec, tokenizer_dir: pathlib.Path, out_dir: pathlib.Path, steps: int | None = None
) -> dict:
    """Train one member from scratch and save it (config, safetensors, tokenizer).

    Returns a summary: steps, seconds, tokens seen, final training loss (nats/token).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = spec.steps if steps is None else steps
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer), dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        progress = (step - spec.warmup) / max(1, steps - spec.warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    ids = corpus_ids(tokenizer, training_files(spec.shard, seed=1234), tokenizer.eos_token_id)
    batches = random_windows(ids, spec.batch_size, spec.seq_len + 1, spec.seed)
    progress = Progress(steps, f"train {spec.name}")
    t0 = time.monotonic()
    loss_avg = None
    for step in range(steps):
        batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
        progress.update(f"loss {loss_avg:.3f}")
    progress.close()
    seconds = time.monotonic() - t0
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "steps": steps,
        "seconds": round(seconds, 1),
        "tokens": steps * spec.batch_size * spec.seq_len,
        "train_loss": round(loss_avg or 0.0, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


SPIECE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def train_sentencepiece_tokenizer(
    out_dir: pathlib.Path, vocab_size: int = 3072, max_bytes: int = 3_000_000
) -> None:
    """A SentencePiece-style BPE (Llama-2 layout) trained on the training files.

    ``▁`` stands for a space (Metaspace, no dummy prefix, so a text's tokens are the
    concatenation of its pieces' tokens), unknown bytes fall back to the 256
    ``<0xNN>`` tokens that sit in the base vocabulary right after the specials.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = training_files(seed=1234)
    texts, size = [], 0
    for path in files:
        if size >= max_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
    n_base = len(SPIECE_SPECIALS) + 256
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="never", split=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256,
        special_tokens=list(SPIECE_SPECIALS),
        show_progress=False,
        limit_alphabet=200,
    )
    lines = (line for text in texts for line in text.splitlines(keepends=True))
    tok.train_from_iterator(lines, trainer)
    # Rebuild with the <0xNN> byte tokens as plain vocabulary entries, as in Llama-2.
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    vocab = [*SPIECE_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    vocab += [t for t in trained if t not in vocab][: vocab_size - n_base]
    known = set(vocab)
    spec["model"]["vocab"] = {t: i for i, t in enumerate(vocab)}
    spec["model"]["merges"] = [
        m
        for m in spec["model"]["merges"]
        if "".join(m if isinstance(m, list) else m.split(" ")) in known
    ]
    spec["model"]["byte_fallback"] = True
    spec["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.model_max_length = 2048
    fast.save_pretrained(out_dir)

"""Distillation exporter: collapse a fused ensemble into one servable student model.

`fusion distill` (cli.py) -> `run.distill(DistillSettings)`. Modules: `data` (read and
tokenize the training text), `teacher` (the fused top-k distribution at every position,
cached in resumable shards), `train` (CE + KL training loop with atomic checkpoints),
`export` (a plain Hugging Face directory + metadata, written atomically).
"""

from .data import DistillError

__all__ = ["DistillError"]

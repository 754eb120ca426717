"""`fusion eval`'s task construction and table (no server)."""

from __future__ import annotations

import argparse
import random

from fusion_server import eval as fusion_eval
from fusion_server.demo_train import held_out_texts

TEXTS = {
    "a.py": "import os\n\n\ndef f(x):\n    return x + 1\n\n\nclass C:\n    pass\n",
    "b.py": "".join(f"x{i} = {i}\n" for i in range(300)),
}


def test_windows_and_lines_are_seeded_and_taken_from_the_text():
    w1 = fusion_eval.make_windows(TEXTS, 10, random.Random(3))
    w2 = fusion_eval.make_windows(TEXTS, 10, random.Random(3))
    assert w1 == w2 and len(w1) == 10
    joined = "\n".join(TEXTS.values())
    for prompt, cont in w1:
        assert prompt and cont.strip() and prompt + cont in joined
        assert len(prompt) <= fusion_eval.PROMPT_CHARS
        assert len(cont) <= fusion_eval.CONTINUATION_CHARS
    lines = fusion_eval.make_lines(TEXTS, 8, random.Random(3))
    for prompt, line in lines:
        assert line.strip() and "\n" not in line and prompt.endswith("\n")
        assert prompt + line + "\n" in joined


def test_held_out_text_is_there():
    texts = held_out_texts()
    assert "fractions.py" in texts and len(texts) >= 8


def test_render_compares_with_the_best_member():
    rows = [
        fusion_eval.Row("a (alone)", 2.0, 0.10, 50),
        fusion_eval.Row("b (alone)", 1.0, 0.20, 50),
        fusion_eval.Row("mean", 0.9, 0.25, 40),
    ]
    args = argparse.Namespace(
        config=None, policies="mean", lines=8, windows=4, seed=0, concurrency=2
    )
    table = fusion_eval.render(rows, args, n_members=2)
    assert "| mean | 0.9000 | 0.900x | 25.0% | +5.0% | 40 |" in table
    assert "fusion eval" in table

"""`fusion distill` end to end on the tiny members' real vLLM engines: teacher signal,
training, export; exact resume after an interruption; the export served by `fusion serve`
(one-member ensemble) and by plain vLLM; bad inputs."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest
import yaml
from conftest import MAX_MODEL_LEN, start_server, tiny_config
from safetensors.numpy import load_file

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
TRAIN_ARGS = ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--checkpoint-every", "2"]


def run_distill(tmp: pathlib.Path, config: pathlib.Path, *args: str, timeout: float = 900):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion_server",
            "distill",
            "--config",
            str(config),
            "--no-progress",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def write_inputs(tmp: pathlib.Path, models: dict, train: str, heldout: str | None = None):
    """train.txt (and heldout.txt) and ensemble.yaml for `models` in tmp; the config path."""
    (tmp / "train.txt").write_text(train)
    if heldout is not None:
        (tmp / "heldout.txt").write_text(heldout)
    config = tmp / "ensemble.yaml"
    config.write_text(yaml.safe_dump(tiny_config(models)))
    return config


@pytest.fixture(scope="module")
def distilled(tiny_models, tmp_path_factory):
    """One full run: teacher through the engines, 4 training steps, held-out figures."""
    tmp = tmp_path_factory.mktemp("distill")
    config = write_inputs(
        tmp,
        tiny_models,
        (STDLIB / "textwrap.py").read_text()[:6000],
        (STDLIB / "shlex.py").read_text()[:3000],
    )
    args = ["--data", "train.txt", "--student", "new:tiny", *TRAIN_ARGS]
    result = run_distill(tmp, config, *args, "--eval-data", "heldout.txt", "--out", "student")
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp, config, args


def test_export_is_a_complete_model_directory_with_metadata(distilled):
    tmp, _, _ = distilled
    out = tmp / "student"
    assert {"config.json", "model.safetensors", "tokenizer.json", "fusion_distill.json"} <= {
        p.name for p in out.iterdir()
    }
    meta = json.loads((out / "fusion_distill.json").read_text())
    assert meta["steps"] == 4 and meta["policy"] == "mean" and meta["teacher_top_k"] == 20
    assert [m["name"] for m in meta["members"]] == ["alpha", "beta"]
    figures = meta["eval"]
    for key in ("student_before_bpb", "student_after_bpb", "ensemble_bpb", "member_alpha_bpb"):
        assert math.isfinite(figures[key]) and figures[key] > 0, figures
    assert len(list((tmp / "student.work" / "teacher").glob("shard-*.npz"))) >= 1
    assert not list(tmp.glob(".student.tmp-*"))


def test_interrupted_run_resumes_to_the_same_weights(distilled):
    tmp, config, args = distilled
    work = tmp / "resume.work"
    shutil.copytree(tmp / "student.work" / "teacher", work / "teacher")  # no engines needed
    first = run_distill(
        tmp, config, *args, "--out", "resumed", "--work-dir", str(work), "--stop-after", "3"
    )
    assert first.returncode == 3, first.stderr[-4000:]
    assert "stopped at step 3/4" in first.stdout and not (tmp / "resumed").exists()
    second = run_distill(tmp, config, *args, "--out", "resumed", "--work-dir", str(work))
    assert second.returncode == 0, second.stderr[-4000:]
    a = load_file(tmp / "student" / "model.safetensors")
    b = load_file(tmp / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert abs(a[name] - b[name]).max() <= 1e-6, name


def test_export_serves_in_fusion_serve_and_plain_vllm(distilled, tmp_path):
    tmp, _, _ = distilled
    out = tmp / "student"
    config = tiny_config({"student": out})
    with start_server(config, {"student": out}, tmp_path) as server, server.client() as client:
        reply = client.generate("def main():", max_tokens=8, ignore_eos=True)
        assert reply.usage.completion_tokens == 8
    code = (
        "from vllm import LLM, SamplingParams\n"
        f"llm = LLM(model={str(out)!r}, max_model_len={MAX_MODEL_LEN}, enforce_eager=True,"
        " kv_cache_memory_bytes=64 * 2**20, dtype='float32')\n"
        "out = llm.generate(['def main():'], SamplingParams(max_tokens=6, ignore_eos=True))\n"
        "print('TOKENS', len(out[0].outputs[0].token_ids))\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "if __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in code.splitlines()),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "TOKENS 6" in result.stdout, result.stderr[-4000:]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d / "data.txt").write_text("   \n"), "empty data"),
        (lambda d: (d / "data.txt").write_text("x = 1\n"), "neither a member"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(tiny_models, tmp_path, setup, message):
    setup(tmp_path)
    config = tmp_path / "ensemble.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_models)))
    student = "no-such-model" if message == "neither a member" else "new:tiny"
    result = run_distill(
        tmp_path, config, "--data", "data.txt", "--student", student, "--out", "out", timeout=300
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_sequence_mode_learns_the_ensembles_own_generations(tiny_models, client, tmp_path):
    """--mode sequence: the targets are the router's fused greedy generations, exactly
    what Generate returns for the same prompts on the same members."""
    prompts = ["def add(a, b):\n", "import os\n", "class Point:\n"]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in prompts)
    )
    config = write_inputs(tmp_path, tiny_models, (STDLIB / "textwrap.py").read_text()[:3000])
    result = run_distill(
        tmp_path,
        config,
        "--data",
        "train.txt",
        "--mode",
        "sequence",
        "--prompts",
        "prompts.jsonl",
        "--max-new-tokens",
        "12",
        "--student",
        "alpha",
        "--kl-weight",
        "0",
        "--ce-weight",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        "student",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    cached = (tmp_path / "student.work" / "sequence_targets.txt").read_text()
    generated = cached.split("\n", 1)[1].split("\0")
    expected = [p + client.generate(p, max_tokens=12).text for p in prompts]
    assert generated == expected
    meta = json.loads((tmp_path / "student" / "fusion_distill.json").read_text())
    assert meta["mode"] == "sequence" and meta["student"] == "member alpha"


def test_cross_vocabulary_distill_to_a_student_of_another_vocabulary(tmp_path):
    """Three members of three tokenizer kinds, the student the SentencePiece member: the
    teacher is projected onto the student's ids at every position (crossvocab.py), the
    held-out figures are on the same text for every row, the export is the student's."""
    import numpy as np

    from fusion_server.tinyvocab import ensure_mixed_models

    models = ensure_mixed_models()
    config = write_inputs(
        tmp_path,
        models,
        (STDLIB / "textwrap.py").read_text()[:4000] + "\nnaïve 世界 🙂\n",
        (STDLIB / "shlex.py").read_text()[:2000],
    )
    args = [
        "--data",
        "train.txt",
        "--student",
        "spm",
        "--eval-data",
        "heldout.txt",
        "--out",
        "student",
    ]
    result = run_distill(tmp_path, config, *args, *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr[-4000:]
    meta = json.loads((tmp_path / "student" / "fusion_distill.json").read_text())
    assert meta["teacher_alignment"] == "student-projection" and meta["student"] == "member spm"
    assert meta["teacher_coverage"] == 1.0, meta
    figures = meta["eval"]
    assert figures["eval_method"] == "pairs"
    for key in ("student_before_bpb", "student_after_bpb", "ensemble_bpb", "member_uni_bpb"):
        assert math.isfinite(figures[key]) and figures[key] > 0, figures
    shard = np.load(tmp_path / "student.work" / "teacher" / "shard-00000.npz")
    probs = np.exp(shard["logprobs"])
    assert (probs.sum(-1) <= 1 + 1e-5).all() and (probs.sum(-1) > 0).all()
    student_vocab = json.loads((models["spm"] / "config.json").read_text())["vocab_size"]
    assert shard["ids"].max() < student_vocab
    tok = json.loads((tmp_path / "student" / "tokenizer.json").read_text())
    assert tok["model"] == json.loads((models["spm"] / "tokenizer.json").read_text())["model"]


def test_student_vocabulary_with_no_alignment_possible_is_refused(tiny_models, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        ["some other words entirely"] * 5,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]),
    )
    student = tmp_path / "words-student"
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(student)
    LlamaConfig(vocab_size=60, hidden_size=32, num_attention_heads=1).save_pretrained(student)
    config = write_inputs(tmp_path, tiny_models, "x = 1\n" * 50)
    args = ["--data", "train.txt", "--student", str(student), "--out", "out"]
    result = run_distill(tmp_path, config, *args, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no alignment possible" in result.stderr and "256 byte values" in result.stderr
    assert "starting the ensemble" not in result.stdout  # refused before any engine
    assert not (tmp_path / "out").exists()

"""Cross-vocabulary fusion on real engines: three members whose tokenizers differ.

One server runs the mixed members (byte-level BPE, SentencePiece-style BPE with byte
fallback, Unigram with byte fallback); one subprocess runs each member alone on plain
vLLM (``vllm_greedy_ref.py``) for the reference. The invariant: with ``mean`` and all
weight on one member, the fused greedy output is that member's own greedy output,
token for token and byte for byte, through Generate and GenerateStream.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import pathlib
import subprocess
import sys

import pytest
from conftest import MAX_MODEL_LEN, start_server, tiny_config

from fusion_client import fusion_pb2

PROMPTS = [
    "def f(x):\n    return",
    "Héllo wörld — 世界 🙂 ",
    "naïve café, 日本語のテキスト 🎉🎉",
]
N_TOKENS = 24
FINISH = {"length": fusion_pb2.FINISH_REASON_LENGTH, "stop": fusion_pb2.FINISH_REASON_EOS}


@pytest.fixture(scope="module")
def mixed_models(tmp_path_factory) -> dict[str, pathlib.Path]:
    from fusion_server.tinyvocab import ensure_mixed_models

    return ensure_mixed_models(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def reference(mixed_models, tmp_path_factory) -> dict[str, list[dict]]:
    """Each member alone on plain vLLM: greedy ids and finish reason per prompt."""
    tmp = tmp_path_factory.mktemp("reference")
    spec = {
        "models": {n: str(p) for n, p in mixed_models.items()},
        "prompts": PROMPTS,
        "max_tokens": N_TOKENS,
        "max_model_len": MAX_MODEL_LEN,
    }
    (tmp / "in.json").write_text(json.dumps(spec))
    script = pathlib.Path(__file__).with_name("vllm_greedy_ref.py")
    with open(tmp / "log", "wb") as log:
        subprocess.run(
            [sys.executable, str(script), str(tmp / "in.json"), str(tmp / "out.json")],
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def mixed(mixed_models, reference, tmp_path_factory):
    # starts after the reference ran: never two sets of engines on the CPUs at once
    config = tiny_config(mixed_models)
    with start_server(config, mixed_models, tmp_path_factory.mktemp("mixed-server")) as running:
        yield running


@pytest.fixture
def mixed_client(mixed):
    with mixed.client() as c:
        yield c


@pytest.fixture(scope="module")
def tables(mixed_models):
    from transformers import AutoTokenizer

    from fusion_server.vocab import byte_table

    return {n: byte_table(AutoTokenizer.from_pretrained(p)) for n, p in mixed_models.items()}


def _only(name: str, names) -> dict[str, float]:
    return {n: 1.0 if n == name else 0.0 for n in names}


def test_get_ensemble_reports_byte_alignment(mixed_client, mixed_models):
    info = mixed_client.get_ensemble()
    assert info.alignment == "bytes"
    kinds = {m.name: m.tokenizer_kind for m in info.members}
    assert kinds == {"bpe": "byte-level-bpe", "spm": "sentencepiece", "uni": "sentencepiece"}
    assert len({m.tokenizer_fingerprint for m in info.members}) == 3
    assert len({m.vocab_size for m in info.members}) == 3


@pytest.mark.parametrize("member", ["bpe", "spm", "uni"])
def test_all_weight_on_one_member_is_that_member_alone(
    mixed_client, mixed_models, reference, tables, member
):
    table = tables[member]
    for prompt, ref in zip(PROMPTS, reference[member], strict=True):
        expected = b"".join(table[i] for i in ref["ids"]).decode("utf-8", "replace")
        options = dict(
            max_tokens=N_TOKENS, weights=_only(member, mixed_models), member_details=True
        )
        out = mixed_client.generate(prompt, **options)
        assert [t.token_id for t in out.tokens] == ref["ids"], (member, prompt)
        assert out.text == expected
        assert out.finish_reason == FINISH[ref["finish"]]
        deltas = list(mixed_client.generate_stream(prompt, **options))
        assert [t.token_id for d in deltas for t in d.tokens] == ref["ids"]
        assert "".join(d.text for d in deltas) == expected
        assert deltas[-1].finish_reason == FINISH[ref["finish"]]
        # a character split across tokens is never a replacement character in a delta
        assert sum(d.text.count("\ufffd") for d in deltas) == expected.count("\ufffd")


def test_fused_output_is_the_chosen_bytes(mixed_client):
    """Equal weights: details spell exactly the text; stream == unary; concurrent == alone."""

    def run(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        kwargs = {"temperature": 0.8, "seed": i} if i % 2 else {}
        return mixed_client.generate(
            prompt, max_tokens=20, ignore_eos=True, logprobs=2, **kwargs
        ).text

    alone = [run(i) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert list(pool.map(run, range(6))) == alone
    for prompt in PROMPTS:
        full = mixed_client.generate(prompt, max_tokens=32, ignore_eos=True)
        deltas = list(mixed_client.generate_stream(prompt, max_tokens=32, ignore_eos=True))
        assert "".join(d.text for d in deltas) == full.text
        assert full.usage.completion_tokens == 32


def test_stop_string_across_candidates(mixed_client, mixed_models, reference, tables):
    """A stop string cut from the member's own output (spanning several of its tokens)."""
    table = tables["spm"]
    ref = reference["spm"][0]["ids"]
    text = b"".join(table[i] for i in ref).decode("utf-8", "replace")
    stop = text[5:12]
    assert len(stop) == 7
    out = mixed_client.generate(
        PROMPTS[0], max_tokens=N_TOKENS, weights=_only("spm", mixed_models), stop=[stop]
    )
    assert out.finish_reason == fusion_pb2.FINISH_REASON_STOP
    assert out.text == text[: text.index(stop)]


# -- Score across vocabularies -----------------------------------------------------------
SCORE_PROMPT = "def f(x):\n"
SCORE_TEXT = "    return x  # café 世界 🙂\n"


def _member_loglik_transformers(path: pathlib.Path, prompt: str, text: str) -> float:
    """The member's own log-likelihood of `text` after `prompt` in its own tokenization
    (prompt with its special tokens, continuation without BOS or dummy prefix)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion_server.feeder import ContinuationEncoder
    from fusion_server.vocab import byte_table, special_ids

    tok = AutoTokenizer.from_pretrained(path)
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    cont = ContinuationEncoder("m", tok, byte_table(tok), special_ids(tok)).encode(text.encode())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :].sum())


def test_score_across_vocabularies_mean_is_the_pool_of_segment_likelihoods(
    mixed_client, mixed_models
):
    names = list(mixed_models)
    reply = mixed_client.score(SCORE_PROMPT, SCORE_TEXT, policy="mean", token_details=True)
    own = {m.member: m.logprob for m in reply.members}
    for name in names:  # every member's own figure equals transformers on its own tokens
        expected = _member_loglik_transformers(mixed_models[name], SCORE_PROMPT, SCORE_TEXT)
        assert abs(own[name] - expected) <= 1e-3 * max(1.0, abs(expected)), (
            name,
            own[name],
            expected,
        )
    segments = reply.token_details
    assert "".join(s.text for s in segments) == SCORE_TEXT and len(segments) == reply.tokens
    for j, name in enumerate(names):  # segments add up to each member's own figure
        assert abs(sum(s.member_logprobs[j] for s in segments) - own[name]) < 1e-6
    for s in segments:  # equal weights: log of the mean of the segment probabilities
        pooled = math.log(sum(math.exp(v) for v in s.member_logprobs) / len(names))
        assert abs(s.logprob - pooled) < 1e-9
    assert abs(reply.logprob - sum(s.logprob for s in segments)) < 1e-6


@pytest.mark.parametrize("member", ["bpe", "spm", "uni"])
def test_score_with_all_weight_on_one_member_is_its_own_loglik(mixed_client, mixed_models, member):
    reply = mixed_client.score(
        SCORE_PROMPT, SCORE_TEXT, policy="mean", weights=_only(member, mixed_models)
    )
    own = {m.member: m.logprob for m in reply.members}
    assert abs(reply.logprob - own[member]) < 1e-6

"""Distillation pieces without engines: data, schedule, teacher fusion, cache, training
resume, atomic export, student vocabulary check."""

from __future__ import annotations

import errno
import json
import pathlib

import numpy as np
import pytest
import torch

from fusion_server.config import EnsembleConfig, FusionConfig, MemberConfig
from fusion_server.distill.data import DistillError, load_documents, pack
from fusion_server.distill.export import METADATA, export_student
from fusion_server.distill.run import load_student, student_vocab, teacher_choice
from fusion_server.distill.teacher import TeacherCache, fused_topk
from fusion_server.distill.train import TrainSettings, batch_rows, lr_factor, train


# -- data ------------------------------------------------------------------------------
def test_load_documents_kinds_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "b.jsonl").write_text('{"text": "t1"}\n\n{"prompt": "p", "completion": "c"}\n')
    ds = load_documents(tmp_path)
    assert ds.documents == ["hello\n", "t1", "pc"]
    assert ds.sha256 == load_documents(tmp_path).sha256
    (tmp_path / "a.txt").write_text("hello!\n")
    assert load_documents(tmp_path).sha256 != ds.sha256

    with pytest.raises(DistillError, match="does not exist"):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DistillError, match="empty data"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(DistillError, match=r"bad.jsonl:1"):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DistillError, match="not UTF-8"):
        load_documents(tmp_path / "bin.txt")


def test_pack_rows():
    assert pack([[1, 2, 3], [1, 4, 5, 6]], 3) == [[1, 2, 3], [1, 4, 5]]
    assert pack([[1, 2]], 5) == [[1, 2]]  # too short for one row: the whole stream
    with pytest.raises(DistillError):
        pack([[1]], 4)


# -- schedule and batches -----------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays_to_the_floor():
    s = TrainSettings(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, s) == pytest.approx(0.1)
    assert lr_factor(9, s) == pytest.approx(1.0)
    assert lr_factor(10, s) == pytest.approx(1.0)
    assert lr_factor(55, s) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, s) == pytest.approx(0.1)
    values = [lr_factor(i, s) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_batches_cover_every_row_once_per_epoch_and_depend_only_on_the_step():
    s = TrainSettings(batch_size=3, seed=7)
    epoch = np.concatenate([batch_rows(step, 9, s) for step in range(3)])
    assert sorted(epoch) == list(range(9))
    assert np.array_equal(batch_rows(2, 9, s), batch_rows(2, 9, s))
    assert not np.array_equal(batch_rows(3, 9, s), batch_rows(0, 9, s))  # new epoch, new order


# -- teacher fusion ------------------------------------------------------------------------
def _config(policy="mean", weights=(1.0, 3.0), **fusion):
    return EnsembleConfig(
        members=[
            MemberConfig(name="a", model="x", weight=weights[0]),
            MemberConfig(name="b", model="y", weight=weights[1]),
        ],
        fusion=FusionConfig(policy=policy, **fusion),
    )


def test_fused_topk_is_the_top_of_the_weighted_mean_with_its_tail_left_out():
    rng = np.random.default_rng(0)
    V, K, N = 50, 6, 4
    full = rng.dirichlet(np.full(V, 0.3), size=(2, N))  # [M, N, V]
    top_ids = np.argsort(-full, axis=-1)[..., :K]
    top_lps = np.log(np.take_along_axis(full, top_ids, axis=-1))
    actual = np.log(full[:, :, 0])
    choice = teacher_choice(_config())
    ids, lps = fused_topk(choice, actual, top_ids, top_lps, V, k=3)
    assert ids.shape == lps.shape == (N, 3)
    for t in range(N):
        # independent reference: union of top-K, fill min(p_K, residual/(V-K)), 1:3 weights
        cand = list(dict.fromkeys([*top_ids[0, t], *top_ids[1, t]]))
        score = {}
        for c in cand:
            p = []
            for m in range(2):
                row = dict(zip(top_ids[m, t], np.exp(top_lps[m, t]), strict=True))
                fill = min(min(row.values()), (1 - sum(row.values())) / (V - K))
                p.append(row.get(c, fill))
            score[c] = 0.25 * p[0] + 0.75 * p[1]
        best = sorted(cand, key=lambda c: -score[c])[:3]
        assert list(ids[t]) == best
        expected = np.array([score[c] for c in best])  # the linear pool itself, not renormalised
        np.testing.assert_allclose(np.exp(lps[t]), expected, rtol=1e-9)


def test_fused_topk_pads_when_fewer_candidates_than_k():
    choice = teacher_choice(_config())
    top_ids = np.array([[[1, 2]], [[2, 1]]])
    top_lps = np.log(np.array([[[0.6, 0.4]], [[0.5, 0.5]]]))
    ids, lps = fused_topk(choice, np.zeros((2, 1)), top_ids, top_lps, 3, k=4)
    assert list(ids[0][:3]) in ([1, 2, 0], [2, 1, 0]) and np.isneginf(lps[0, 3])
    # ids 1 and 2 hold all of both members' mass: no tail
    assert np.exp(lps[0]).sum() == pytest.approx(1.0, abs=1e-6)


def test_teacher_cache_resumes_and_refuses_other_inputs(tmp_path):
    cache = TeacherCache(tmp_path, {"data": "x"}, num_rows=5, rows_per_shard=2)
    assert cache.missing() == [0, 1, 2]
    for i in (0, 2):
        rows = list(cache.rows_of(i))
        cache.save(i, np.full((len(rows), 3, 2), i), np.zeros((len(rows), 3, 2)))
    again = TeacherCache(tmp_path, {"data": "x"}, num_rows=5, rows_per_shard=2)
    assert again.missing() == [1]
    with pytest.raises(DistillError, match="data"):
        TeacherCache(tmp_path, {"data": "y"}, num_rows=5, rows_per_shard=2)


# -- training ------------------------------------------------------------------------------
def test_kl_is_zero_when_the_student_is_the_teacher_tail_included():
    from types import SimpleNamespace

    from fusion_server.distill.train import distill_loss

    logits = torch.randn(1, 3, 12, generator=torch.Generator().manual_seed(0))
    model = lambda input_ids: SimpleNamespace(logits=logits)  # noqa: E731
    logp = torch.log_softmax(logits, -1)
    t_ids = torch.argsort(-logp, -1)[..., :4]
    t_lps = logp.gather(-1, t_ids)  # the student's own top-4, its tail left out
    tokens = torch.zeros(1, 4, dtype=torch.long)
    settings = TrainSettings(ce_weight=0.0, kl_weight=1.0)
    _, _, kl = distill_loss(model, tokens, t_ids, t_lps, settings)
    assert abs(kl.item()) < 1e-6
    sharper = t_lps - torch.logsumexp(t_lps, -1, keepdim=True)  # renormalised: no tail
    _, _, kl = distill_loss(model, tokens, t_ids, sharper, settings)
    assert kl.item() > 0.01  # the tail the student keeps is penalised


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).float()


def _rows_and_teacher(n_rows=6, length=9, k=4):
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 40, size=(n_rows, length))
    ids = rng.integers(0, 40, size=(n_rows, length - 1, k))
    lps = np.log(rng.dirichlet(np.ones(k), size=(n_rows, length - 1))).astype(np.float32)
    return rows, (ids, lps)


def test_training_lowers_the_loss_and_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    rows, teacher = _rows_and_teacher()
    settings = TrainSettings(steps=8, batch_size=2, lr=3e-3, warmup_steps=2, checkpoint_every=3)
    straight = _tiny_llama()
    full = train(straight, rows, teacher, settings, tmp_path / "a", progress=False, run_key="k")
    assert full.finished and full.step == 8
    assert np.mean(full.losses[-2:]) < np.mean(full.losses[:2])

    resumed = _tiny_llama()
    (tmp_path / "b").mkdir()
    part = train(
        resumed,
        rows,
        teacher,
        TrainSettings(**{**settings.__dict__, "stop_after": 5}),
        tmp_path / "b",
        progress=False,
        run_key="k",
    )
    assert not part.finished and part.step == 5
    resumed = _tiny_llama(seed=99)  # a fresh process: weights come from the checkpoint
    rest = train(resumed, rows, teacher, settings, tmp_path / "b", progress=False, run_key="k")
    assert rest.finished and rest.losses == pytest.approx(full.losses, rel=1e-6)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)

    with pytest.raises(DistillError, match="another run"):
        train(
            _tiny_llama(), rows, teacher, settings, tmp_path / "b", progress=False, run_key="other"
        )


# -- export --------------------------------------------------------------------------------
class _Tok:
    def save_pretrained(self, path):
        pathlib.Path(path, "tokenizer.json").write_text("{}")


def test_export_is_atomic_and_failures_leave_nothing(tmp_path, monkeypatch):
    model = _tiny_llama()
    out = tmp_path / "student"
    export_student(model, _Tok(), out, {"steps": 1})
    assert json.loads((out / METADATA).read_text()) == {"steps": 1}
    first = (out / "model.safetensors").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", no_space)
    with pytest.raises(DistillError, match="No space left.*nothing was written"):
        export_student(model, _Tok(), out, {"steps": 2})
    with pytest.raises(DistillError, match="nothing was written"):
        export_student(model, _Tok(), tmp_path / "fresh", {"steps": 2})
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary left
    assert (out / "model.safetensors").read_bytes() == first  # the earlier export is intact
    assert json.loads((out / METADATA).read_text()) == {"steps": 1}

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("mine")
    with pytest.raises(DistillError, match="not an earlier distill export"):
        export_student(model, _Tok(), tmp_path / "other", {})


def test_student_resolution(tmp_path):
    from fusion_server.demo import ensure_demo_models
    from fusion_server.router.ensemble import Ensemble

    paths = ensure_demo_models()
    config = EnsembleConfig(members=[MemberConfig(name=n, model=str(p)) for n, p in paths.items()])
    vocabs = Ensemble.load_vocabs(config)
    path, vocab = student_vocab("alpha", config, vocabs)
    assert path == str(paths["alpha"]) and vocab is vocabs[0]
    model, desc = load_student("alpha", path, vocab.tokenizer, 32, 0)
    assert desc == "member alpha" and model.config.vocab_size >= len(vocab.tokenizer)
    assert student_vocab("new:tiny", config, vocabs) == (None, vocabs[0])
    with pytest.raises(DistillError, match="neither a member"):
        student_vocab(str(tmp_path / "nowhere"), config, vocabs)
    with pytest.raises(DistillError, match="new:tiny"):
        load_student("new:huge", None, vocab.tokenizer, 32, 0)
    with pytest.raises(DistillError, match="multiple of 32"):
        load_student("new:100x2", None, vocab.tokenizer, 32, 0)

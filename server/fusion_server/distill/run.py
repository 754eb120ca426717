"""`fusion distill`: data -> teacher signal -> trained student -> export.

Order of work (nothing heavy starts before every input is checked): load the ensemble
config, read and hash the data, load every member's tokenizer, resolve the student's
vocabulary; when it is not every member's, check that alignment is possible (fast
tokenizers, a student that can spell every byte; crossvocab.py) and otherwise refuse;
tokenize the data with the student's tokenizer and pack it. Only then start the member
engines, and only if some teacher shard is missing or held-out figures for the
ensemble are asked for. Training resumes from `work_dir` when a checkpoint is there;
the export is atomic (export.py).

Teacher: shared vocabulary -> teacher.py (the members' ids are the student's);
otherwise crossvocab.py (members fed the student's text as Generate feeds them, their
top-k projected onto the student's ids, then fused the same way).

Held-out figures: shared vocabulary -> windows of seq_len + 1 student tokens, every
model scored on the same ids. Otherwise -> (prompt, continuation) pairs of whole lines
(`eval_pairs`), the ensemble and its members through Score (common segmentation),
the student on its own tokenization of the same text; bits per byte of the same
continuation bytes for every row.

Sequence-level mode (`--mode sequence`): the ensemble first generates a continuation
for every prompt through the real router (fused decoding, `--max-new-tokens`); the
prompt + generated text become the training documents (KL to the fused teacher still
applies when kl_weight > 0).

Student: a member's name (start from that member's weights and vocabulary), a Hugging
Face directory, or `new:tiny` / `new:small` / `new:<hidden>x<layers>` (a fresh Llama
with the first member's tokenizer).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pathlib
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import EnsembleConfig
from ..fusion.policies import normalize_weights, resolve_policy
from .crossvocab import CrossVocabTeacher, encoder_of
from .data import Dataset, DistillError, load_documents, pack
from .export import export_student
from .teacher import TeacherCache, TeacherChoice, fill_cache, shared_row_teacher
from .train import TrainSettings, progress_bar, train, window_logprobs

log = logging.getLogger(__name__)

NEW_SIZES = {"tiny": (128, 2), "small": (256, 4)}


@dataclass
class DistillSettings:
    data: str
    student: str
    out: str
    work_dir: str | None = None
    mode: str = "token"
    prompts: str | None = None
    max_new_tokens: int = 64
    seq_len: int = 128
    top_k: int = 20
    eval_data: str | None = None
    device: str = "cpu"
    progress: bool = True
    train: TrainSettings = field(default_factory=TrainSettings)


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusion-serve")
    except PackageNotFoundError:
        return "unknown"


def teacher_choice(config: EnsembleConfig) -> TeacherChoice:
    names = [m.name for m in config.members]
    policy = resolve_policy(config.fusion.policy)(names)
    return TeacherChoice(
        policy=policy,
        params=policy.validate_params(config.fusion.params),
        weights=normalize_weights(names, {m.name: m.weight for m in config.members}, {}),
        roles=policy.validate_roles(names, config.fusion.roles),
    )


def student_vocab(spec: str, config: EnsembleConfig, vocabs: list) -> tuple[str | None, object]:
    """(model dir or None for new:<size>, vocabulary) of --student; loads no weights."""
    names = [m.name for m in config.members]
    if spec.startswith("new:"):
        return None, vocabs[0]  # a fresh model speaks the first member's vocabulary
    if spec in names:
        i = names.index(spec)
        return str(config.members[i].model), vocabs[i]
    if not pathlib.Path(spec, "config.json").exists():
        raise DistillError(
            f"--student: {spec!r} is neither a member ({', '.join(names)}), "
            "a Hugging Face model directory, nor new:<size>"
        )
    from ..router.ensemble import load_vocab

    try:
        return spec, load_vocab(spec)
    except Exception as err:
        raise DistillError(f"--student: cannot load a tokenizer from {spec}: {err}") from None


def load_student(spec: str, path: str | None, tokenizer, seq_len: int, seed: int):
    """(model, description) for --student (student_vocab resolved it to path)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        return model, (path if spec == path else f"member {spec}")
    size = spec[4:]
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if size in NEW_SIZES:
        hidden, layers = NEW_SIZES[size]
    elif m:
        hidden, layers = int(m.group(1)), int(m.group(2))
    else:
        raise DistillError(f"--student: {spec!r}: use new:tiny, new:small or new:<hidden>x<layers>")
    if hidden % 32:
        raise DistillError(f"--student: hidden size {hidden} must be a multiple of 32")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,  # head_dim 32 (vLLM CPU attention accepts it)
        num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=max(2048, seq_len + 1),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).float(), f"new Llama {hidden}x{layers}"


def tokenize(tokenizer, docs: list[str]) -> list[list[int]]:
    return [list(tokenizer(d, add_special_tokens=True)["input_ids"]) for d in docs]


def windows_of(token_docs: list[list[int]], seq_len: int) -> np.ndarray:
    """Held-out evaluation windows: each document cut into rows of seq_len + 1 ids."""
    return np.asarray(pack(token_docs, seq_len + 1), dtype=np.int64)


def scored_bytes(windows: np.ndarray, table: list[bytes]) -> int:
    return sum(len(table[int(t)]) for t in windows[:, 1:].reshape(-1))


async def _ensemble_window_logprobs(members, choice, windows, vocab_size, top_k) -> np.ndarray:
    from ..router.score import fuse_positions

    out = []
    for w, row in enumerate(windows):
        outs = await asyncio.gather(
            *(m.score(f"eval-{w}", [int(t) for t in row], top_k) for m in members)
        )
        actual = np.stack([o[0] for o in outs])
        fused = fuse_positions(
            choice,
            actual,
            np.stack([o[1] for o in outs]),
            np.stack([o[2] for o in outs]),
            np.asarray(row[1:], dtype=np.int64),
            vocab_size,
        )
        out.append(fused)
    return np.stack(out)


def eval_pairs(docs: list[str], max_chars: int) -> list[tuple[str, str]]:
    """Held-out (prompt, continuation) pairs when vocabularies differ: each document in
    chunks of whole lines (up to max_chars, longer lines cut); a chunk's first line is
    the prompt, the rest the scored continuation (chunks of one line are skipped)."""
    pairs = []
    for doc in docs:
        lines = []
        for line in doc.splitlines(keepends=True):
            lines += [line[i : i + max_chars] for i in range(0, len(line), max_chars)]
        chunk: list[str] = []
        for line in [*lines, None]:
            if line is None or (chunk and sum(map(len, chunk)) + len(line) > max_chars):
                if len(chunk) > 1 and "".join(chunk[1:]).strip():
                    pairs.append((chunk[0], "".join(chunk[1:])))
                chunk = []
            if line is not None:
                chunk.append(line)
    if not pairs:
        raise DistillError("--eval-data: too little text to evaluate (no two-line chunk)")
    return pairs


def pair_logprobs(model, vocab, encoder, pairs, device: str = "cpu") -> np.ndarray:
    """log p(continuation | prompt) per pair, the way Score scores a member: prompt by
    the tokenizer (with BOS), continuation by the continuation encoder."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for prompt, cont in pairs:
            head = list(vocab.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            tail = encoder.encode(cont.encode())
            ids = torch.as_tensor([head + tail], dtype=torch.long, device=device)
            logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), dim=-1)
            got = logp[0, len(head) - 1 :].gather(-1, ids[0, len(head) :, None])
            out.append(float(got.sum()))
    return np.asarray(out)


async def _ensemble_pair_scores(ensemble, choice, pairs, top_k: int) -> list:
    """The ensemble's Score of each pair (shared ids or common segmentation)."""
    from ..router.score import FusionChoice, ScoreParams, Scorer

    scorer = Scorer(ensemble, top_k)
    fusion = FusionChoice(choice.policy, choice.params, choice.weights, choice.roles)
    results = []
    for i, (prompt, cont) in enumerate(pairs):
        params = ScoreParams(request_id=f"eval-{i}", prompt=prompt, continuation=cont)
        results.append(
            await scorer.score(
                params, fusion, ensemble.encode(prompt), ensemble.encode_continuation(cont)
            )
        )
    return results


async def _generate(ensemble, config: EnsembleConfig, prompts: list[str], max_new: int, seed: int):
    """Sequence-level targets: fused greedy decoding through the real router."""
    from ..router.request import FusionRequest, GenerateParams
    from ..router.router import Router

    router = Router(ensemble, max_running=32)
    router.start()
    choice = teacher_choice(config)
    limit = asyncio.Semaphore(32)

    async def one(i: int, prompt: str) -> str:
        params = GenerateParams(
            request_id=f"distill-gen-{i}", prompt=prompt, max_tokens=max_new, seed=seed + i
        )
        prompts_ids = ensemble.encode_members(prompt)  # per member, its own ids
        room = ensemble.max_model_len - max(map(len, prompts_ids))
        if room < 1:
            raise DistillError(f"--prompts: prompt {i} does not fit the members' context")
        request = FusionRequest(
            params,
            prompts_ids[0],
            router.policy(config.fusion.policy),
            choice.params,
            choice.weights,
            max_tokens=min(max_new, room),
            roles=choice.roles,
            member_prompt_ids=prompts_ids,
        )
        async with limit:
            router.submit(request)
            text = []
            try:
                while True:
                    event = await request.events.get()
                    if isinstance(event, BaseException):
                        raise event
                    text.append(event.text)
                    if event.finish_reason is not None:
                        return prompt + "".join(text)
            finally:
                await router.release(request)

    try:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    finally:
        await router.stop()


async def _run(settings: DistillSettings, config: EnsembleConfig) -> dict:
    from ..router.ensemble import Ensemble

    t_start = time.time()
    dataset: Dataset = load_documents(settings.data)
    prompts = None
    if settings.mode == "sequence":
        if not settings.prompts:
            raise DistillError("--prompts: sequence mode needs a prompts file")
        prompts = load_documents(settings.prompts).documents
    elif settings.mode != "token":
        raise DistillError(f"--mode: {settings.mode!r}: use token or sequence")
    eval_docs = load_documents(settings.eval_data).documents if settings.eval_data else None
    vocabs = Ensemble.load_vocabs(config)
    if any(v is None for v in vocabs) or config.server.member_workers:
        raise DistillError(
            "--config: distill runs the members' engines itself; endpoint: members and "
            "server.member_workers are not supported"
        )
    path, svocab = student_vocab(settings.student, config, vocabs)
    tokenizer, table, vocab_print = svocab.tokenizer, svocab.table, svocab.fingerprint
    choice = teacher_choice(config)
    shared = all(v.fingerprint == vocab_print for v in vocabs)
    cross = None
    if not shared:  # checks that alignment is possible before anything heavy
        cross = CrossVocabTeacher([m.name for m in config.members], vocabs, svocab, choice)
    model, student_desc = load_student(
        settings.student, path, tokenizer, settings.seq_len, settings.train.seed
    )
    if model.config.vocab_size < len(tokenizer):
        raise DistillError(
            f"--student: embedding has {model.config.vocab_size} rows, the vocabulary {len(tokenizer)}"
        )
    out = pathlib.Path(settings.out)
    work = pathlib.Path(settings.work_dir or out.with_name(out.name + ".work"))
    work.mkdir(parents=True, exist_ok=True)

    ensemble = None
    try:

        async def engines():
            nonlocal ensemble
            if ensemble is None:
                print("distill: starting the ensemble's engines", flush=True)
                ensemble = await Ensemble.start(config)
            return ensemble

        docs = dataset.documents
        data_hash = dataset.sha256
        if prompts is not None:
            cached = work / "sequence_targets.txt"
            key = hashlib.sha256(
                ("\0".join(prompts) + f"|{settings.max_new_tokens}").encode()
            ).hexdigest()
            if cached.exists() and cached.read_text().startswith(key):
                generated = cached.read_text()[len(key) + 1 :].split("\0")
            else:
                generated = await _generate(
                    await engines(), config, prompts, settings.max_new_tokens, settings.train.seed
                )
                tmp = cached.with_suffix(".tmp")
                tmp.write_text(key + "\n" + "\0".join(generated))
                tmp.replace(cached)
            docs = docs + generated
            data_hash = hashlib.sha256((data_hash + key).encode()).hexdigest()
        rows = np.asarray(pack(tokenize(tokenizer, docs), settings.seq_len + 1), dtype=np.int64)

        teacher = None
        coverage = None
        if settings.train.kl_weight > 0:
            manifest = {
                "teacher_format": 3 if cross else 2,  # 2: kept ids carry 1 - tail mass
                "data_sha256": data_hash,
                "vocab": vocab_print,
                "alignment": "student-projection" if cross else "shared-ids",
                "members": [[m.name, str(m.model), m.weight] for m in config.members],
                "policy": config.fusion.policy,
                "params": config.fusion.params,
                "roles": config.fusion.roles,
                "row_len": settings.seq_len + 1,
                "top_k": settings.top_k,
            }
            cache = TeacherCache(work / "teacher", manifest, len(rows), rows_per_shard=64)
            if cache.missing():
                ens = await engines()
                row_list = [list(map(int, r)) for r in rows]
                if cross is not None:
                    max_len = [m.max_model_len for m in ens.members]
                    row_teacher = cross.row_teacher(row_list, ens.members, settings.top_k, max_len)
                else:
                    row_teacher = shared_row_teacher(
                        row_list, ens.members, choice, ens.vocab_size, settings.top_k
                    )
                bar = progress_bar(len(rows), "teacher", "row", enabled=settings.progress)
                await fill_cache(cache, row_teacher, bar)
                if bar is not None:
                    bar.close()
            teacher = cache.load()
            coverage = float(np.isfinite(teacher[1][:, :, 0]).mean())
            print(f"distill: teacher at {coverage:.1%} of the student's positions", flush=True)

        figures: dict = {}
        windows = pairs = None
        if eval_docs is not None and cross is None:
            windows = windows_of(tokenize(tokenizer, eval_docs), settings.seq_len)
            n_bytes = scored_bytes(windows, table)
            figures["eval_bytes"] = n_bytes
            figures["student_before_bpb"] = _bpb(
                window_logprobs(model, windows, settings.device), n_bytes
            )
            ens = await engines()
            lps = await _ensemble_window_logprobs(
                ens.members, choice, windows, ens.vocab_size, settings.top_k
            )
            figures["ensemble_bpb"] = _bpb(lps, n_bytes)
            for m in config.members:
                member_model, _ = load_student(m.name, str(m.model), tokenizer, settings.seq_len, 0)
                figures[f"member_{m.name}_bpb"] = _bpb(
                    window_logprobs(member_model, windows), n_bytes
                )
                del member_model
        elif eval_docs is not None:
            pairs = eval_pairs(eval_docs, 2 * settings.seq_len)
            n_bytes = sum(len(c.encode()) for _, c in pairs)
            figures["eval_bytes"] = n_bytes
            figures["eval_method"] = "pairs"
            encoder = encoder_of("--student", svocab)
            figures["student_before_bpb"] = _bpb(
                pair_logprobs(model, svocab, encoder, pairs, settings.device), n_bytes
            )
            ens = await engines()
            scored = await _ensemble_pair_scores(ens, choice, pairs, settings.top_k)
            figures["ensemble_bpb"] = _bpb(np.array([r.logprob for r in scored]), n_bytes)
            for i, m in enumerate(config.members):
                lps = np.array([r.members[i].logprob for r in scored])
                figures[f"member_{m.name}_bpb"] = _bpb(lps, n_bytes)
        if ensemble is not None:  # the engines are not needed for training
            ensemble.shutdown()
            ensemble = None

        result = train(
            model, rows, teacher, settings.train, work, settings.device, settings.progress
        )
        if not result.finished:
            print(
                f"distill: stopped at step {result.step}/{settings.train.steps}; rerun to resume",
                flush=True,
            )
            return {"finished": False, "step": result.step}
        if windows is not None:
            figures["student_after_bpb"] = _bpb(
                window_logprobs(model, windows, settings.device), figures["eval_bytes"]
            )
        if pairs is not None:
            figures["student_after_bpb"] = _bpb(
                pair_logprobs(model, svocab, encoder, pairs, settings.device), figures["eval_bytes"]
            )
        metadata = {
            "format": "fusion-serve/distill/v1",
            "code_version": _code_version(),
            "members": [
                {"name": m.name, "model": str(m.model), "weight": m.weight} for m in config.members
            ],
            "policy": config.fusion.policy,
            "policy_params": choice.params,
            "weights": {
                m.name: float(w) for m, w in zip(config.members, choice.weights, strict=True)
            },
            "student": student_desc,
            "mode": settings.mode,
            "data": dataset.source,
            "data_sha256": data_hash,
            "rows": len(rows),
            "seq_len": settings.seq_len,
            "teacher_top_k": settings.top_k if teacher is not None else 0,
            "teacher_alignment": None
            if teacher is None
            else ("student-projection" if cross else "shared-ids"),
            "teacher_coverage": coverage,
            "train": asdict(settings.train),
            "steps": result.step,
            "final_loss": result.losses[-1] if result.losses else None,
            "tokens_per_second": result.tokens_per_second,
            "eval": figures,
            "seconds": round(time.time() - t_start, 1),
        }
        path = export_student(model, tokenizer, out, metadata)
        print(f"distill: exported {path}", flush=True)
        return {"finished": True, "step": result.step, "out": str(path), **metadata}
    finally:
        if ensemble is not None:
            ensemble.shutdown()


def _bpb(logprobs: np.ndarray, num_bytes: int) -> float:
    import math

    return float(-logprobs.sum() / (math.log(2) * num_bytes))


def distill(settings: DistillSettings, config: EnsembleConfig) -> dict:
    return asyncio.run(_run(settings, config))

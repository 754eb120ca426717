"""`fusion distill`: data -> teacher signal -> trained student -> export.

Order of work (nothing heavy starts before every input is checked): load the ensemble
config, read and hash the data, load the ensemble's shared tokenizer (members with
different vocabularies are refused), resolve the
student and check that its vocabulary is the ensemble's (a student with another
vocabulary is refused: the teacher signal lives in the ensemble's ids and no alignment
to another vocabulary is implemented), tokenize and pack. Only then start the member
engines, and only if some teacher shard is missing or held-out figures for the
ensemble are asked for. Training resumes from `work_dir` when a checkpoint is there;
the export is atomic (export.py).

Sequence-level mode (`--mode sequence`): the ensemble first generates a continuation
for every prompt through the real router (fused decoding, `--max-new-tokens`); the
prompt + generated text become the training documents (KL to the fused teacher still
applies when kl_weight > 0).

Student: a member's name (start from that member's weights), a Hugging Face directory,
or `new:tiny` / `new:small` / `new:<hidden>x<layers>` (a fresh Llama with the
ensemble's tokenizer).
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
from ..vocab import byte_table, fingerprint, special_ids
from .data import Dataset, DistillError, load_documents, pack
from .export import export_student
from .teacher import TeacherCache, TeacherChoice, fill_cache
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


def resolve_student(spec: str, config: EnsembleConfig, tokenizer, seq_len: int, seed: int):
    """(model, description) for --student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    members = {m.name: m.model for m in config.members}
    if spec.startswith("new:"):
        size = spec[4:]
        m = re.fullmatch(r"(\d+)x(\d+)", size)
        if size in NEW_SIZES:
            hidden, layers = NEW_SIZES[size]
        elif m:
            hidden, layers = int(m.group(1)), int(m.group(2))
        else:
            raise DistillError(
                f"--student: {spec!r}: use new:tiny, new:small or new:<hidden>x<layers>"
            )
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
    path = members.get(spec, spec)
    if not pathlib.Path(path, "config.json").exists():
        raise DistillError(
            f"--student: {spec!r} is neither a member ({', '.join(members)}), "
            "a Hugging Face model directory, nor new:<size>"
        )
    try:
        student_tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise DistillError(f"--student: cannot load a tokenizer from {path}: {err}") from None
    ours = fingerprint(byte_table(tokenizer), special_ids(tokenizer))
    theirs = fingerprint(byte_table(student_tok), special_ids(student_tok))
    if ours != theirs:
        raise DistillError(
            f"--student: {path} has a different vocabulary ({len(student_tok)} tokens) than the "
            f"ensemble ({len(tokenizer)} tokens); the teacher signal is in the ensemble's ids "
            "and no alignment to another vocabulary is available"
        )
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return model, f"{'member ' + spec if spec in members else path}"


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
        ids = ensemble.encode(prompt)
        room = ensemble.max_model_len - len(ids)
        if room < 1:
            raise DistillError(f"--prompts: prompt {i} does not fit the members' context")
        request = FusionRequest(
            params,
            ids,
            router.policy(config.fusion.policy),
            choice.params,
            choice.weights,
            max_tokens=min(max_new, room),
            roles=choice.roles,
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
    if len({v.fingerprint for v in vocabs}) != 1:
        raise DistillError(
            "--config: the members' vocabularies differ; the teacher signal is computed in "
            "one shared vocabulary (cross-vocabulary distillation is not implemented)"
        )
    tokenizer, table, vocab_print = vocabs[0].tokenizer, vocabs[0].table, vocabs[0].fingerprint
    model, student_desc = resolve_student(
        settings.student, config, tokenizer, settings.seq_len, settings.train.seed
    )
    if model.config.vocab_size < len(tokenizer):
        raise DistillError(
            f"--student: embedding has {model.config.vocab_size} rows, the vocabulary {len(tokenizer)}"
        )
    choice = teacher_choice(config)
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
        if settings.train.kl_weight > 0:
            manifest = {
                "teacher_format": 2,  # 2: kept ids carry 1 - tail mass
                "data_sha256": data_hash,
                "vocab": vocab_print,
                "members": [[m.name, str(m.model), m.weight] for m in config.members],
                "policy": config.fusion.policy,
                "params": config.fusion.params,
                "roles": config.fusion.roles,
                "row_len": settings.seq_len + 1,
                "top_k": settings.top_k,
            }
            cache = TeacherCache(work / "teacher", manifest, len(rows), rows_per_shard=64)
            if cache.missing():
                members = (await engines()).members
                bar = progress_bar(len(rows), "teacher", "row", enabled=settings.progress)
                await fill_cache(
                    cache,
                    [list(map(int, r)) for r in rows],
                    members,
                    choice,
                    (await engines()).vocab_size,
                    settings.top_k,
                    bar,
                )
                if bar is not None:
                    bar.close()
            teacher = cache.load()

        figures: dict = {}
        windows = None
        if eval_docs is not None:
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
                member_model, _ = resolve_student(m.name, config, tokenizer, settings.seq_len, 0)
                figures[f"member_{m.name}_bpb"] = _bpb(
                    window_logprobs(member_model, windows), n_bytes
                )
                del member_model
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

"""The student's training loop: cross-entropy on the data + KL to the fused teacher.

Contract: loss = ce_weight * CE(data) + kl_weight * KL(q || p_student) per position,
both over the teacher's kept ids K plus one tail outcome (teacher.py): q_c for c in K
and q_tail = 1 - sum q_c; the student's p_c from its full-vocabulary log-softmax and
p_tail = 1 - sum_{c in K} p_c. KL is averaged over the positions that have a teacher
(a row of -inf log-probs has none; crossvocab.py); CE over every position. AdamW, linear
warm-up then cosine decay to `min_lr_ratio * lr`, gradient-norm clipping.

Determinism and resume: batch b of step s is a fixed function of (seed, s) (one
seeded permutation of the rows per epoch), dropout is off, and a checkpoint holds the
model, optimiser, schedule, step, loss history and torch's RNG state. A checkpoint is
written to a temporary file and renamed over the previous one, so an interrupted run
leaves either the old or the new checkpoint, never half of one; rerunning continues
from it and reaches the same weights as an uninterrupted run (same machine, same
thread count).
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from dataclasses import dataclass, field

import numpy as np

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainSettings:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    ce_weight: float = 0.5
    kl_weight: float = 0.5
    seed: int = 0
    checkpoint_every: int = 50
    stop_after: int | None = None
    """Stop (with a checkpoint) after this many steps of this run: an interruption."""


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0
    finished: bool = False


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of the base learning rate at `step` (0-based)."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(settings.steps - settings.warmup_steps, 1)
    progress = min((step - settings.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine


def batch_rows(step: int, num_rows: int, settings: TrainSettings) -> np.ndarray:
    """Row indices of the batch at `step` (a pure function of seed and step)."""
    out = []
    start = step * settings.batch_size
    for j in range(start, start + settings.batch_size):
        epoch, pos = divmod(j, num_rows)
        perm = np.random.default_rng([settings.seed, epoch]).permutation(num_rows)
        out.append(perm[pos])
    return np.asarray(out)


def distill_loss(model, tokens, t_ids, t_lps, settings: TrainSettings):
    """(loss, ce, kl) for one batch. tokens [B, L]; t_ids/t_lps [B, L-1, k] or None."""
    import torch

    logits = model(input_ids=tokens[:, :-1]).logits.float()  # [B, L-1, V]
    logp = torch.log_softmax(logits, dim=-1)
    targets = tokens[:, 1:]
    ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()
    if t_ids is None or settings.kl_weight == 0:
        return settings.ce_weight * ce if t_ids is not None else ce, ce, torch.zeros(())
    finite = torch.isfinite(t_lps)  # [B, L-1, k]
    has = finite.any(-1)  # [B, L-1] positions with a teacher (crossvocab may leave some out)
    q = torch.exp(t_lps)  # 0 at -inf padding
    safe_t = torch.where(finite, t_lps, torch.zeros_like(t_lps))
    student = logp.gather(-1, t_ids)  # [B, L-1, k]
    student_in_k = torch.where(finite, student, torch.full_like(student, -torch.inf))
    # a position without teacher gets a finite dummy row (no NaN gradient) and KL 0
    student_in_k = torch.where(has[..., None], student_in_k, torch.zeros_like(student_in_k))
    q_tail = (1 - q.sum(-1)).clamp_min(1e-12)
    p_tail = (-torch.expm1(torch.logsumexp(student_in_k, -1))).clamp_min(1e-12)
    kl_k = (q * (safe_t - student)).sum(-1)
    kl_pos = torch.where(has, kl_k + q_tail * (q_tail.log() - p_tail.log()), 0.0)
    kl = kl_pos.sum() / has.sum().clamp_min(1)
    return settings.ce_weight * ce + settings.kl_weight * kl, ce, kl


def train(
    model,
    rows: np.ndarray,
    teacher: tuple[np.ndarray, np.ndarray] | None,
    settings: TrainSettings,
    work_dir: pathlib.Path,
    device: str = "cpu",
    progress: bool = True,
    run_key: str = "",
) -> TrainResult:
    """Train `model` in place; resumes from work_dir/checkpoint.pt when present.

    run_key names the inputs (data, student, settings); a checkpoint made from other
    inputs is refused instead of being resumed.
    """
    import torch

    model.to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, settings))
    result = TrainResult(step=0)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state.get("run_key") != run_key:
            from .data import DistillError

            raise DistillError(
                f"{ckpt}: checkpoint of another run (other data, student or settings); "
                "use another --work-dir or delete it"
            )
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        result.step, result.losses = state["step"], list(state["losses"])

    tokens_all = torch.as_tensor(rows, dtype=torch.long)
    if teacher is not None:
        t_ids_all = torch.as_tensor(teacher[0], dtype=torch.long)
        t_lps_all = torch.as_tensor(teacher[1], dtype=torch.float32)
    bar = progress_bar(settings.steps, "distill", "step", result.step, progress)
    started, seen = time.perf_counter(), 0
    done_this_run = 0
    while result.step < settings.steps:
        if settings.stop_after is not None and done_this_run >= settings.stop_after:
            break
        idx = torch.as_tensor(batch_rows(result.step, len(rows), settings))
        tokens = tokens_all[idx].to(device)
        t_ids = t_lps = None
        if teacher is not None:
            t_ids, t_lps = t_ids_all[idx].to(device), t_lps_all[idx].to(device)
        loss, ce, kl = distill_loss(model, tokens, t_ids, t_lps, settings)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optim.step()
        sched.step()
        result.step += 1
        done_this_run += 1
        result.losses.append(loss.item())
        seen += tokens.numel()
        result.tokens_per_second = seen / max(time.perf_counter() - started, 1e-9)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                ce=f"{ce.item():.3f}",
                kl=f"{kl.item():.3f}",
                tok_s=f"{result.tokens_per_second:,.0f}",
            )
        if result.step % settings.checkpoint_every == 0 or result.step == settings.steps:
            save_checkpoint(ckpt, model, optim, sched, result, run_key)
    if done_this_run and result.step % settings.checkpoint_every:
        save_checkpoint(ckpt, model, optim, sched, result, run_key)
    if bar is not None:
        bar.close()
    result.finished = result.step >= settings.steps
    model.eval()
    return result


def save_checkpoint(
    path: pathlib.Path, model, optim, sched, result: TrainResult, run_key: str = ""
) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    state = {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "sched": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "step": result.step,
        "losses": result.losses,
        "run_key": run_key,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A tqdm bar (None when disabled or tqdm is missing)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


def window_logprobs(model, windows: np.ndarray, device: str = "cpu", batch: int = 8) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1 of each window: [W, L-1]."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            tokens = torch.as_tensor(windows[i : i + batch], dtype=torch.long, device=device)
            logp = torch.log_softmax(model(input_ids=tokens[:, :-1]).logits.float(), dim=-1)
            out.append(logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).cpu().numpy())
    return np.concatenate(out).astype(np.float64)

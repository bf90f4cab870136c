"""Minimal strength: scale an edit down to the smallest factor that still reaches a target margin.

Locate-then-edit targets overshoot: ROME's optimised output change typically leaves a margin
log P(new) - log P(true) of several times what the edit needs (benchmarks/RESULTS.md, "Editing in full
precision"), and every nat beyond that is damage to the subject's neighbours. `minimal_scale` bisects
a factor alpha in [min_scale, 1] on the mean margin over the edit prompt and its context prefixes
(the deltas applied through hooks, the model untouched) and returns the smallest alpha whose margin
is at least `target_margin`. The margin is the new target's lead over the true answer and over every
other token (see `_margin`): measured against the true answer alone, a scaled MEMIT edit often still
preferred the new target to the old one without saying it (top-1). For a batch (MEMIT, AlphaEdit)
the batch's deltas on every layer are scaled together until its weakest request reaches the target.
Computed on a quantized model's weights (`edit --quant`, the aware ladder) and encoded edit-aware,
the margin reached is the margin after quantization.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from qedit.core.batching import best_other, build_batch, logits_at, target_index
from qedit.core.delta import LowRankDelta
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest
from qedit.core.hooks import edit_outputs
from qedit.core.model import LoadedModel
from qedit.edit.keys import delta_edits

log = logging.getLogger(__name__)


@torch.no_grad()
def _margin(loaded: LoadedModel, reqs: Sequence[EditRequest], prefixes: Sequence[str],
            deltas: Sequence[LowRankDelta]) -> float:
    """The smallest over `reqs` of the mean over prefixes of the edit's lead, with `deltas` applied (through
    hooks; the model is not changed). A request's lead is the smaller of
    - mean log P(target_new) - mean log P(ground_truth) (CounterFact's margin), and
    - the mean over target_new's tokens of log P(token) - the largest log P of any other token there,
    so that at a positive target the model says the new target (top-1), not only prefers it to the old.
    """
    texts = [pre + r.prompt for r in reqs for pre in prefixes] * 2
    targets = [r.target_new for r in reqs for _ in prefixes] + [r.ground_truth or "" for r in reqs for _ in prefixes]
    batch = build_batch(loaded, texts, targets)
    rows, cols, ids = target_index(batch)
    with edit_outputs(loaded.model, delta_edits(loaded, deltas)):
        logp = F.log_softmax(logits_at(loaded, batch, rows, cols), -1)                     # (n_tok, vocab)
    own = logp.gather(1, ids[:, None])[:, 0]                                               # (n_tok,)
    other = best_other(logp, ids)                                                          # (n_tok,)
    count = torch.bincount(rows, minlength=len(texts)).clamp(min=1)                        # (2 n,)
    per_row = own.new_zeros(len(texts)).index_add(0, rows, own) / count                    # (2 n,)
    lead = own.new_zeros(len(texts)).index_add(0, rows, own - other) / count               # (2 n,)
    n = len(texts) // 2
    vs_true = (per_row[:n] - per_row[n:]).view(len(reqs), len(prefixes)).mean(1)          # (n_reqs,)
    top1 = lead[:n].view(len(reqs), len(prefixes)).mean(1)                                 # (n_reqs,)
    return float(torch.minimum(vs_true, top1).min())


def check_strength(target_margin: float | None, max_scale: float) -> None:
    """Validate the minimal-strength settings of a method's config (QeditError naming the field)."""
    if target_margin is not None and target_margin <= 0:
        raise QeditError("target_margin must be > 0 nats, or None to keep the full strength")
    if isinstance(max_scale, bool) or not isinstance(max_scale, (int, float)) or not 1.0 <= max_scale < float("inf"):
        raise QeditError(f"max_scale must be a finite number >= 1 (1: never scale an edit up), got {max_scale!r}")


MarginFn = Callable[[LoadedModel, Sequence[EditRequest], Sequence[str], Sequence[LowRankDelta]], float]


def forget_gap(loaded: LoadedModel, reqs: Sequence[EditRequest], prefixes: Sequence[str],
               deltas: Sequence[LowRankDelta]) -> float:
    """The smallest over `reqs` of `forget_gaps` (a MarginFn for minimal_scale)."""
    return float(forget_gaps(loaded, reqs, prefixes, deltas).min())


@torch.no_grad()
def forget_gaps(loaded: LoadedModel, reqs: Sequence[EditRequest], prefixes: Sequence[str],
                deltas: Sequence[LowRankDelta]) -> torch.Tensor:
    """For unlearning (`kforget`, whose requests carry the answer to erase as target_new), with `deltas`
    applied through hooks: per request (n_reqs,), the gap log P(best other token) - log P(the answer's
    first token), the smaller of its mean over the prefixes and its value on the bare prompt (prefixes[0],
    the one a user types). Positive: the answer is not top-1 on the bare prompt."""
    texts = [pre + r.prompt for r in reqs for pre in prefixes]
    logp, ids = first_token_logp(loaded, texts, [r.target_new for r in reqs for _ in prefixes], deltas)
    own = logp.gather(1, ids[:, None])[:, 0]                                               # (n,)
    gap = (best_other(logp, ids) - own).view(len(reqs), len(prefixes))                     # (n_reqs, n_prefixes)
    return torch.minimum(gap.mean(1), gap[:, 0])                                           # (n_reqs,)


@torch.no_grad()
def first_token_logp(loaded: LoadedModel, texts: Sequence[str], answers: Sequence[str],
                     deltas: Sequence[LowRankDelta]) -> tuple[torch.Tensor, torch.Tensor]:
    """With `deltas` applied through hooks: the log-probabilities (n, vocab) where each answer's first token follows
    its text, and those first tokens' ids (n,)."""
    batch = build_batch(loaded, texts, answers)
    device = batch.input_ids.device
    rows = torch.arange(len(texts), device=device)
    cols = torch.tensor([pos[0] for pos in batch.target_pos], device=device)                # (n,) first answer token
    ids = torch.tensor([tid[0] for tid in batch.target_ids], device=device)                 # (n,)
    with edit_outputs(loaded.model, delta_edits(loaded, deltas)):
        logp = F.log_softmax(logits_at(loaded, batch, rows, cols), -1)                     # (n, vocab)
    return logp, ids


def minimal_scale(loaded: LoadedModel, reqs: Sequence[EditRequest], prefixes: Sequence[str],
                  deltas: Sequence[LowRankDelta], applied: Sequence[LowRankDelta], target_margin: float,
                  min_scale: float = 0.05, steps: int = 6, max_scale: float = 1.0,
                  margin_fn: MarginFn | None = None) -> tuple[float, float]:
    """(alpha, margin at alpha): the smallest alpha in [min_scale, max_scale] (bisected `steps` times) at which
    every request's margin (`margin_fn`, default `_margin`), with `deltas` scaled by alpha on top of
    `applied`, is >= target_margin.

    When even the full edit (alpha = 1) stays below the target: alpha = 1 if max_scale is 1, else the
    smallest alpha in (1, max_scale] that reaches it, or max_scale when none does. alpha = 1 when a
    request has no ground truth (the default margin needs it).
    """
    fn = margin_fn or _margin
    if fn is _margin and any(r.ground_truth is None for r in reqs):
        return 1.0, float("nan")

    def margin(alpha: float) -> float:
        return fn(loaded, reqs, prefixes, [*applied, *(d.scaled(alpha) for d in deltas)])

    full = margin(1.0)
    if full >= target_margin:
        lo, hi, hi_margin = min_scale, 1.0, full
        lo_margin = margin(lo)
        if lo_margin >= target_margin:
            return lo, lo_margin
    else:
        if max_scale <= 1.0:
            return 1.0, full
        top = margin(max_scale)
        if top < target_margin:
            log.info("%s: even %.1f x the edit stays below the margin (%.2f nats)",
                     ", ".join(r.subject for r in reqs[:3]), max_scale, top)
            return max_scale, top
        lo, hi, hi_margin = 1.0, max_scale, top
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        m = margin(mid)
        if m >= target_margin:
            hi, hi_margin = mid, m
        else:
            lo = mid
    log.info("%s: edit scaled to %.3f (margin %.2f -> %.2f nats)", ", ".join(r.subject for r in reqs[:3]),
             hi, full, hi_margin)
    return hi, hi_margin

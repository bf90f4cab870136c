"""kforget: key-local unlearning, MEMIT's closed form turned around.

GA, NPO and qforget train dW by gradient steps on the facts and a retain loss; a change large enough
to outlast rounding then also moves the answers of the retain prompts (CounterFact's neighbourhood
prompts, which share the erased answer). kforget instead edits the way MEMIT does, keyed to each
fact's subject:

1. Target: a residual vector at the last edit layer, at the subject's last token, optimised until
   the answer's first token trails the best other token by `forget_margin` nats over the prompt and
   its context prefixes (a hinge; the KL on "<subject> is a" keeps the subject's other properties).
2. Spread: MEMIT's per-layer least squares, dW = R K^T (lambda C + K K^T + w R_keep)^-1, where C is the
   key covariance and R_keep = sum of k k^T over every token of the retain prompts (weight
   `retain_weight` per token): the solve keeps the retain prompts' MLP outputs where they were.
3. Strength: when the spread overshoots, the deltas are scaled down (on every layer together) to the
   smallest factor in [0.05, 1] at which every fact's answer still trails the best other token by
   `forget_margin` nats on the bare prompt and on average over its context prefixes
   (`_strength.minimal_scale` with `forget_gap` as the margin). Under the strong prior the spread
   usually falls short instead; scaling up (`max_scale` > 1) cost retain accuracy, so it is off.
4. Passes: the facts whose answer is still top-1 after that (the spread under a strong prior falls
   short for some) get a second spread of their own (`passes`), computed on top of the first deltas,
   with the first pass's keys held in the solve so that it does not undo the other facts.
5. The edit keys come back with the deltas, so patches, exports and the survival ladder encode the
   edited tensors edit-aware (the change kept at the keys through requantization) and, at coarse GGUF
   rungs, compute the unlearning on the rung's own weights, as they do for edits.

Option `wrong_margin` (off by default): the target also puts the answer's first token `wrong_margin`
nats below the first token of the fact's wrong answer (`qedit.unlearn.requests.wrong_answers`: its target_new, or
an answer of the same relation_id), on the prompt, its paraphrases that hold the subject and the context prefixes,
whether or not the answer was top-1 (`objectives.BelowWrong`); the strength step keeps both margins, and the
extra passes take the facts still above their wrong answer too. First tokens only: the forget metrics compare
whole answers.

Facts only: a request needs a prompt, a subject and the answer to erase (texts are GA/NPO/qforget's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from qedit.core import linalg
from qedit.core.batching import build_batch, logits_at
from qedit.core.delta import LowRankDelta
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest
from qedit.core.hooks import record
from qedit.core.model import LoadedModel
from qedit.edit.keys import context_prefixes
from qedit.edit.methods.memit import MemitConfig
from qedit.edit.registry import EditContext, EditResult, resolve_layers
from qedit.edit.spread import spread_edit
from qedit.edit.strength import MarginFn, first_token_logp, forget_gap, forget_gaps, minimal_scale
from qedit.unlearn.objectives import AwayFromAnswer, BelowWrong
from qedit.unlearn.registry import UnlearnMethod, register_unlearn_method
from qedit.unlearn.requests import ForgetRequest, RetainItem, check_retain_setting, default_retain, wrong_answers


@dataclass(frozen=True)
class KForgetConfig(MemitConfig):
    # Settings chosen on Gemma 3 270M (benchmarks/RESULTS.md, "Unlearning", tables the retain weight,
    # margin and passes). Without the retain prompts' keys in the solve, the erased answers drag the retain
    # prompts down with them; a heavier covariance prior (cov_weight) keeps held-out prompts where they
    # were; scaling the deltas up until every fact reaches the margin cost retain and held-out accuracy
    # alike, so it stays off. A heavier retain weight and a wider margin keep retain accuracy at the
    # unedited model's after quantization, and the extra passes forget the facts one pass leaves known.
    cov_weight: float = 1e4
    target_margin: float | None = None    # minimal strength is for edits; kforget's strength is forget_margin
    forget_margin: float = 4.0            # nats the answer's first token must trail the best other token by
    retain: tuple[RetainItem, ...] = ()   # a shared retain set, besides each request's own retain items
    retain_weight: float = 100.0          # weight of each retain-prompt token's key in the solve's prior
    retain_chunk: int = 32                # retain prompts per forward pass
    passes: int = 3                       # more passes for the facts whose answer is still top-1 after one
    wrong_margin: float | None = None     # nats the answer must trail its wrong answer by (None: off; module doc)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_margin is not None:
            raise QeditError("KForgetConfig.target_margin: must stay None (an edit setting); "
                             "kforget's strength is forget_margin")
        for key in ("forget_margin", "retain_weight") + (("wrong_margin",) if self.wrong_margin is not None else ()):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise QeditError(f"KForgetConfig.{key}: must be a finite number >= 0, got {value!r}")
        if not isinstance(self.passes, int) or isinstance(self.passes, bool) or not 1 <= self.passes <= 10:
            raise QeditError(f"KForgetConfig.passes: must be an integer in [1, 10], got {self.passes!r}")
        if not isinstance(self.retain_chunk, int) or self.retain_chunk < 1:
            raise QeditError(f"KForgetConfig.retain_chunk: must be an integer >= 1, got {self.retain_chunk!r}")
        check_retain_setting("KForgetConfig.retain", self.retain)


def as_edit_requests(requests: Sequence[ForgetRequest], with_wrong: bool = False) -> list[EditRequest]:
    """Each fact as the EditRequest the spread optimises: target_new carries the answer to push away; `with_wrong`:
    ground_truth carries its wrong answer (None where it has none) and rephrase_prompts its paraphrases."""
    wrong = wrong_answers([r for r in requests if r.is_fact]) if with_wrong else []
    facts = iter(wrong)
    out = []
    for i, r in enumerate(requests):
        if not r.is_fact or r.texts:
            raise QeditError(f"kforget: request {i} ({r.name!r}) has texts to forget; kforget erases facts "
                             "(prompt, subject, answer) only: use --method qforget (or ga, npo) for texts")
        assert r.prompt is not None and r.subject is not None and r.answer is not None
        if with_wrong:
            out.append(EditRequest(r.prompt, r.subject, r.answer, ground_truth=next(facts)[0],
                                   rephrase_prompts=r.paraphrase_prompts, case_id=r.case_id))
        else:
            out.append(EditRequest(r.prompt, r.subject, r.answer, case_id=r.case_id))
    return out


@torch.no_grad()
def wrong_gaps(loaded: LoadedModel, reqs: Sequence[EditRequest], prefixes: Sequence[str],
               deltas: Sequence[LowRankDelta]) -> torch.Tensor:
    """With `deltas` applied through hooks, per request (n_reqs,): log P(wrong answer's first token) - log P(the
    answer's first token) (the wrong answer in ground_truth), the smallest over its prompt and paraphrases of the
    smaller of the mean over the prefixes and the bare prompt's value; +inf for a request without a wrong answer."""
    out = torch.full((len(reqs),), float("inf"), device="cpu")
    for j, r in enumerate(reqs):
        if r.ground_truth is None:
            continue
        prompts = [r.prompt] + [q for q in r.rephrase_prompts if r.subject in q]
        texts = [pre + q for q in prompts for pre in prefixes]
        logp, ids = first_token_logp(loaded, texts * 2, [r.target_new] * len(texts) + [r.ground_truth] * len(texts),
                                     deltas)                                                # (2 t, vocab), (2 t,)
        own = logp.gather(1, ids[:, None])[:, 0]                                           # (2 t,)
        gap = (own[len(texts):] - own[:len(texts)]).view(len(prompts), len(prefixes))     # (prompts, prefixes)
        out[j] = float(torch.minimum(gap.mean(1), gap[:, 0]).min())
    return out


@torch.no_grad()
def retain_grams(loaded: LoadedModel, layers: Sequence[int], prompts: Sequence[str],
                 chunk: int) -> dict[int, torch.Tensor]:
    """Per layer, sum of k k^T (d_in, d_in) float64 over the MLP output projection's input at every token of
    `prompts` (the unedited model), on the layer's device (`linalg.float64_device`)."""
    modules = [loaded.arch.mlp_out.format(layer) for layer in layers]
    d_in = {layer: loaded.edit_shape(layer)[1] for layer in layers}
    grams = {layer: torch.zeros(d_in[layer], d_in[layer], dtype=torch.float64,
                                device=linalg.float64_device(loaded.layer_device(layer))) for layer in layers}
    origin = torch.zeros(1, dtype=torch.long, device=loaded.device)
    for lo in range(0, len(prompts), chunk):
        part = list(prompts[lo:lo + chunk])
        batch = build_batch(loaded, part, [None] * len(part))
        with record(loaded.model, modules, "input") as rec:
            logits_at(loaded, batch, origin, origin)
        mask = batch.attention_mask.bool()                                          # (b, s)
        for layer, m in zip(layers, modules):
            k = linalg.wide(rec[m][mask.to(rec[m].device)], grams[layer].device)   # (tokens, d_in)
            grams[layer] += k.t() @ k
    return grams


def _margin_fn(cfg: KForgetConfig) -> MarginFn:
    """The strength step's margin: the answer's gap below the best other token; with `wrong_margin`, also its gap
    below the wrong answer less (wrong_margin - forget_margin), so that both margins must hold at the scale kept."""
    if cfg.wrong_margin is None:
        return forget_gap
    shift = cfg.wrong_margin - cfg.forget_margin

    def both(loaded: LoadedModel, reqs: Sequence[EditRequest], prefixes: Sequence[str],
             deltas: Sequence[LowRankDelta]) -> float:
        rank = forget_gaps(loaded, reqs, prefixes, deltas)                                  # (n,)
        wrong = wrong_gaps(loaded, reqs, prefixes, deltas).to(rank.device) - shift           # (n,)
        return float(torch.minimum(rank, wrong).min())

    return both


# its solve holds the weighted covariance, the retain Gram matrix, K^T K and their sum with its factor; each
# edited layer's float64 retain Gram matrix is held throughout (its covariance is read back as MEMIT's is)
@register_unlearn_method(UnlearnMethod.KFORGET, KForgetConfig, multi_layer=True, solve_copies=4, stats_held=8)
def compute(loaded: LoadedModel, requests: Sequence[ForgetRequest], cfg: KForgetConfig,
            ctx: EditContext) -> EditResult:
    edits = as_edit_requests(requests)
    layers = resolve_layers(loaded, cfg, multi_layer=True)
    items = default_retain(requests, cfg.retain)
    keep = retain_grams(loaded, layers, [x.prompt for x in items], cfg.retain_chunk) if cfg.retain_weight > 0 and items \
        else {}

    done: dict[int, list[torch.Tensor]] = {}   # layer -> keys (n, d_in) of earlier passes, kept in later solves

    def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        device = keys.device   # the solve runs where the keys are (linalg.batch_update)
        prior = cfg.cov_weight * linalg.wide(cov, device)
        if layer in ctx.history:
            prior = prior + ctx.history[layer].to(prior)
        if layer in keep:
            prior = prior + cfg.retain_weight * keep[layer].to(prior.device)
        for k in done.get(layer, []):
            k64 = linalg.wide(k, prior.device)
            prior = prior + k64.t() @ k64
        return linalg.batch_update(keys, resid, prior).float()                      # (d_out, d_in)

    prefixes = context_prefixes(loaded, cfg)
    objective: AwayFromAnswer | BelowWrong = AwayFromAnswer(cfg.forget_margin)
    if cfg.wrong_margin is not None:
        edits = as_edit_requests(requests, with_wrong=True)
        objective = BelowWrong.of(cfg.forget_margin, cfg.wrong_margin,
                                  [[e.prompt, e.ground_truth, list(e.rephrase_prompts)] for e in edits])
    result = spread_edit(loaded, edits, cfg, ctx, solve, objective=objective)
    alpha, margin = minimal_scale(loaded, edits, prefixes, result.deltas, [], cfg.forget_margin,
                                  max_scale=cfg.max_scale, margin_fn=_margin_fn(cfg))
    deltas = [d.scaled(alpha) for d in result.deltas]
    keys = {layer: [k] for layer, k in result.keys.items()}
    info = {**result.info, "forget_margin": cfg.forget_margin, "scale": alpha, "margin": margin, "n_retain": len(items),
            "retain_weight": cfg.retain_weight, "passes": [len(edits)]}
    for _ in range(cfg.passes - 1):
        # the facts whose answer is still top-1 (bare prompt or mean over prefixes) get a pass of their own,
        # computed on top of the deltas so far, with the keys of the earlier passes held in the solve
        gaps = forget_gaps(loaded, edits, prefixes, deltas)                         # (n,)
        if cfg.wrong_margin is not None:   # and those whose answer is not yet below its wrong answer
            gaps = torch.minimum(gaps, wrong_gaps(loaded, edits, prefixes, deltas).to(gaps.device))
        left = [r for r, g in zip(edits, gaps.tolist()) if g <= 0]
        if not left:
            break
        done.clear()
        done.update({layer: list(ks) for layer, ks in keys.items()})   # a copy: this pass's keys join after it
        more = spread_edit(loaded, left, cfg, ctx, solve, objective=objective, base=deltas)
        deltas += more.deltas
        for layer, k in more.keys.items():
            keys.setdefault(layer, []).append(k)
        info["passes"].append(len(left))
    return EditResult(deltas, {layer: torch.cat(ks) for layer, ks in keys.items()}, info)

"""qforget: unlearning that survives requantization to the source type and to Q4_0.

GA and NPO stop at tiny updates, which requantizing W0 + dW to W0's grid rounds away: the facts come
back. qforget changes three things, and needs no llama.cpp (qedit's kernels are llama.cpp-exact):

1. A target margin instead of -inf: the loss is a hinge, mean relu(log P(answer) - log P(best other
   token) + margin) over the first answer token of each fact (every token of a text), the gradient
   flowing through log P(answer) only, so training stops once the answer sits `margin` nats below the
   best other token, rather than wrecking the model to drive it to zero. With `auto_margin`, the
   margin is at least `margin_scale` times the mean change of that gap when the unedited weights are
   requantized to the `quant_types` (a quantization step's effect on those logits).
2. Saliency-restricted, larger updates: dW may only use `n_columns` input columns (FFN neurons) per
   layer, those most active at the facts' subjects relative to their activation on the retain prompts
   (or with the largest forget gradient), trained with a step ~30x GA's, so each changed weight moves
   by several quantization steps instead of a fraction of one. (subspace "keys" instead restricts dW
   to the facts' whitened subject keys, ROME's C^-1 k; it needs the key covariance.)
3. Quantization in the loop: the hinge is evaluated in every view of dW, full precision and each type
   in `quant_types` ("source": the GGUF type the weight came from), each requantized as a patched
   file would be, Q(W0 + dW) - W0, with a straight-through gradient; training stops only when every
   view forgets every fact. After the low-rank projection the views are checked again and, while a
   fact came back in one of them, training resumes from the projected update (up to `rounds` times).

The retain term (KL to the unedited model at the retain answers, weight `retain_kl`) keeps working for
`polish` steps after every view forgets, and the result is the last update at which every view did.
On Gemma 3 270M no fact comes back at the source types or at Q4_0. With other known facts in the retain
set besides the locality prompts, retain accuracy stays at the unedited model's and never-seen facts are
kept better than by GA and NPO; with the locality prompts alone, pushing each answer below its
competitors drags down the retain prompts that share it (benchmarks/RESULTS.md, "Unlearning").
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from qedit.core import linalg
from qedit.core.batching import best_other, subject_last_index
from qedit.core.delta import LowRankDelta
from qedit.core.errors import QeditError
from qedit.core.hooks import at_positions, record
from qedit.core.model import LoadedModel
from qedit.core.stats import key_covariance
from qedit.edit.registry import EditContext, EditResult, finish_delta, resolve_layers
from qedit.edit.requant import SOURCE, Requantizer
from qedit.kernels.registry import as_type
from qedit.unlearn.loop import (
    RetainTerm,
    Targets,
    UnlearnConfig,
    View,
    forget_targets,
    full_precision,
    logits_with,
    train,
)
from qedit.unlearn.registry import UnlearnMethod, register_unlearn_method
from qedit.unlearn.requests import ForgetRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QForgetConfig(UnlearnConfig):
    steps: int = 80
    lr: float = 3e-4
    energy: float | None = None        # exact: dW lives on n_columns columns, stored as such (no SVD)
    retain_kl: float = 20.0             # a strong retain KL: the hinge stops pulling once the margin is met
    margin: float = 1.0                # nats between the answer and the best other token
    auto_margin: bool = True           # raise the margin to margin_scale x the requantization effect on the gap
    margin_scale: float = 0.5
    n_columns: int = 32                # input columns (FFN neurons) per layer dW may use; 0 = all
    saliency: str = "activation"       # how they are chosen: "activation" (at the subjects) or "gradient"
    subspace: str = "columns"          # "columns": dW on n_columns salient columns; "keys": dW = A B, B the
                                       # facts' subject keys whitened by the key covariance (ROME's C^-1 k)
    cov_ridge: float = 0.1             # "keys": C + ridge * mean(diag C) * I
    quant_types: tuple[str, ...] = (SOURCE, "Q4_0")   # requantized views ("source" = the GGUF's own type)
    rounds: int = 3                    # re-checks after the low-rank projection (training resumes on failure)
    polish: int = 30                   # steps on after every view forgets, the retain term pulling dW back

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("margin", "margin_scale"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise QeditError(f"QForgetConfig.{key}: must be a finite number >= 0, got {value!r}")
        if not isinstance(self.n_columns, int) or self.n_columns < 0:
            raise QeditError(f"QForgetConfig.n_columns: must be an integer >= 0 (0 = all columns), got {self.n_columns!r}")
        if self.subspace not in ("columns", "keys"):
            raise QeditError(f"QForgetConfig.subspace: must be 'columns' or 'keys', got {self.subspace!r}")
        if self.saliency not in ("activation", "gradient"):
            raise QeditError(f"QForgetConfig.saliency: must be 'activation' or 'gradient', got {self.saliency!r}")
        if not isinstance(self.polish, int) or self.polish < 0:
            raise QeditError(f"QForgetConfig.polish: must be an integer >= 0, got {self.polish!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise QeditError(f"QForgetConfig.rounds: must be an integer >= 1, got {self.rounds!r}")
        if not isinstance(self.quant_types, tuple) or not all(isinstance(q, str) for q in self.quant_types):
            raise QeditError("QForgetConfig.quant_types: must be a tuple of GGML type names or 'source'")

        for q in self.quant_types:
            if q != SOURCE:
                as_type(q, "QForgetConfig.quant_types")


def gaps(logits: torch.Tensor, t: Targets, detach_other: bool = False) -> torch.Tensor:
    """log P(target) - log P(best other token) at each hinge token (facts' first tokens, texts' tokens): (n,).

    With detach_other the gradient flows through log P(target) alone: lowering it moves the answer's mass
    to every other token in proportion to its probability, instead of raising the runner-up (on Gemma,
    often " the" for every prompt of a relation) as the plain logit gap does.
    """
    sel = t.first | ~t.fact
    logp = torch.log_softmax(logits[sel], -1)                                        # (n, vocab)
    ids = t.ids[sel]
    own = logp.gather(1, ids[:, None])[:, 0]                                         # (n,)
    other = best_other(logp, ids)                                                    # (n,)
    return own - (other.detach() if detach_other else other)


def hinge(margin: float):
    """mean relu(gap + margin), the gap's runner-up held fixed (see `gaps`)."""

    def objective(logits: torch.Tensor, t: Targets) -> torch.Tensor:
        return torch.relu(gaps(logits, t, detach_other=True) + margin).mean()

    return objective


def _views(loaded: LoadedModel, layers: Sequence[int], cfg: QForgetConfig) -> tuple[list[Requantizer], list[str]]:
    quants, names = [], []
    for name in cfg.quant_types:
        if name == SOURCE and not loaded.stored_types:
            log.warning("%s was not loaded from a GGUF file: no 'source' type to train against", loaded.source)
            continue
        quants.append(Requantizer.for_type(loaded, list(layers), name))
        names.append(name)
    return quants, names


def _rms_inputs(loaded: LoadedModel, layers: Sequence[int], t: Targets, rows: torch.Tensor | None = None,
                cols: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Per layer, the RMS (in,) of the MLP output projection's input over t's positions (rows, cols),
    or over every real token of t's batch."""
    modules = [loaded.arch.mlp_out.format(layer) for layer in layers]
    with torch.no_grad(), record(loaded.model, modules, "input") as rec:
        logits_with(loaded, {}, t)
    out = {}
    for layer, m in zip(layers, modules):
        keys = rec[m][t.batch.attention_mask.bool().to(rec[m].device)] if rows is None \
            else at_positions(rec[m], rows, cols)                                                # (n, in)
        out[layer] = keys.float().pow(2).mean(0).sqrt()                                         # (in,)
    return out


def column_masks(loaded: LoadedModel, layers: Sequence[int], requests: Sequence[ForgetRequest], forget: Targets,
                 objective: Any, cfg: QForgetConfig, retain: Targets | None) -> dict[int, torch.Tensor]:
    """Per layer, (out, in) float 0/1: the n_columns input columns (FFN neurons) dW may use.

    saliency "activation": the neurons most active at the facts' subject tokens relative to their RMS
    activation on every token of the retain prompts; "gradient": the largest forget-loss gradient norm,
    relative to the same retain activation (a neuron that fires on the retain prompts as much as on the
    facts cannot be changed without changing them too).
    """
    usage = _rms_inputs(loaded, layers, retain) if retain is not None else {}
    if cfg.saliency == "gradient":
        params = {layer: torch.zeros(loaded.edit_shape(layer), device=loaded.layer_device(layer), requires_grad=True)
                  for layer in layers}
        objective(logits_with(loaded, params, forget), forget).backward()
        signal = {layer: p.grad.norm(dim=0) for layer, p in params.items()}           # (in,) per layer
    else:
        facts = [r for r in requests if r.is_fact]
        if not facts:
            raise QeditError("qforget saliency 'activation' needs facts (with subjects); use saliency 'gradient' for texts")
        rows = torch.arange(len(facts), device=loaded.device)
        cols = torch.tensor([subject_last_index(loaded.tokenizer, r.prompt, r.subject) for r in facts],  # type: ignore[arg-type]
                            device=loaded.device)
        signal = _rms_inputs(loaded, layers, forget, rows, cols)
    masks = {}
    for layer in layers:
        score = signal[layer]
        if layer in usage:
            score = score / (usage[layer] + 0.1 * usage[layer].mean() + 1e-12).to(score.device)
        mask = torch.zeros(loaded.edit_shape(layer), device=loaded.layer_device(layer))   # (out, in)
        if cfg.n_columns == 0 or cfg.n_columns >= score.numel():
            mask.fill_(1.0)
        else:
            mask[:, score.topk(cfg.n_columns).indices.to(mask.device)] = 1.0
        masks[layer] = mask
    return masks


def key_basis(loaded: LoadedModel, layers: Sequence[int], requests: Sequence[ForgetRequest], forget: Targets,
              cfg: QForgetConfig) -> dict[int, torch.Tensor]:
    """Per layer, B (n_facts, in): row i is (C + ridge)^-1 k_i scaled so that B_i . k_i = 1, k_i the input of the
    MLP output projection at fact i's subject-last token (ROME's key), C the key covariance."""

    facts = [r for r in requests if r.is_fact]
    if not facts:
        raise QeditError("qforget subspace 'keys' needs facts (with subjects); use subspace 'columns' for texts")
    rows = torch.arange(len(facts), device=loaded.device)
    cols = torch.tensor([subject_last_index(loaded.tokenizer, r.prompt, r.subject) for r in facts],  # type: ignore[arg-type]
                        device=loaded.device)
    modules = [loaded.arch.mlp_out.format(layer) for layer in layers]
    with torch.no_grad(), record(loaded.model, modules, "input") as rec:
        logits_with(loaded, {}, forget)
    covs = key_covariance(loaded, layers, cfg.stats)
    out = {}
    for layer, m in zip(layers, modules):
        keys = linalg.wide(at_positions(rec[m], rows, cols))                             # (n, in), the layer's device
        ck = linalg.solve_spd(linalg.shrink(covs[layer].to(keys.device), cfg.cov_ridge), keys.t()).t()  # (n, in)
        out[layer] = (ck / (ck * keys).sum(1, keepdim=True)).float()
    return out


@torch.no_grad()
def view_gaps(loaded: LoadedModel, changes: dict[int, torch.Tensor], forget: Targets,
              quants: Sequence[Requantizer], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The hinge tokens' logit gaps with dW in full precision and requantized to each type (no STE)."""
    out = {"fp32": gaps(logits_with(loaded, changes, forget), forget)}
    for name, q in zip(names, quants):
        out[name] = gaps(logits_with(loaded, q.changes(changes), forget), forget)
    return out


def _delta(loaded: LoadedModel, layer: int, dense: torch.Tensor, cfg: QForgetConfig,
           masks: dict[int, torch.Tensor] | None, n_requests: int) -> LowRankDelta:
    """dW (out, in) -> LowRankDelta. On salient columns without a rank/energy setting, exactly:
    a = dW[:, cols] (out, k), b = the one-hot rows (k, in) picking those columns, so every other column
    stays exactly 0 (an SVD would leak rounding noise into them)."""
    meta = {"n_requests": n_requests}
    if masks is None or cfg.rank is not None or cfg.energy is not None:
        return finish_delta(loaded, layer, dense, cfg, meta)
    cols = masks[layer].amax(0).nonzero()[:, 0]                                         # (k,)
    b = torch.zeros(len(cols), dense.shape[1], device=dense.device)                     # (k, in)
    b[torch.arange(len(cols), device=dense.device), cols.to(dense.device)] = 1.0
    return LowRankDelta(loaded.arch.weight_name(layer), layer, dense[:, cols].float().contiguous(), b, 1.0,
                        loaded.arch.mlp_out_orientation, meta)


@register_unlearn_method(UnlearnMethod.QFORGET, QForgetConfig, multi_layer=True)
def compute(loaded: LoadedModel, requests: Sequence[ForgetRequest], cfg: QForgetConfig,
            ctx: EditContext) -> EditResult:
    layers = resolve_layers(loaded, cfg, multi_layer=True)
    forget = forget_targets(loaded, requests)
    quants, names = _views(loaded, layers, cfg)
    margin, effect = cfg.margin, 0.0
    zero = {layer: torch.zeros(loaded.edit_shape(layer), device=loaded.layer_device(layer)) for layer in layers}
    base = view_gaps(loaded, zero, forget, quants, names)
    if cfg.auto_margin and names:
        effect = max(float((base[n] - base["fp32"]).abs().mean()) for n in names)
        margin = max(margin, cfg.margin_scale * effect)
    objective = hinge(margin)
    retain = RetainTerm(loaded, requests, cfg)
    basis = key_basis(loaded, layers, requests, forget, cfg) if cfg.subspace == "keys" else None
    masks = column_masks(loaded, layers, requests, forget, objective, cfg, retain.targets) if basis is None else None
    views: list[View] = [full_precision] + [q.ste_changes for q in quants]

    def done(logits_per_view: Sequence[torch.Tensor], t: Targets) -> bool:
        return all(bool((gaps(lg.detach(), t) <= -margin).all()) for lg in logits_per_view)

    init: dict[int, torch.Tensor] | None = None
    info: dict[str, Any] = {"layers": list(layers), "margin": margin, "quant_effect": effect, "views": ["fp32", *names],
                            "types": {n: q.describe() for n, q in zip(names, quants)}, "rounds": []}
    for rnd in range(cfg.rounds):
        changes, run = train(loaded, layers, cfg, forget, retain, objective, views, done, masks, init,
                             cfg.polish, basis, desc=f"qforget round {rnd + 1}")
        deltas = [_delta(loaded, layer, changes[layer], cfg, masks, len(requests)) for layer in layers]
        projected = {d.layer: d.dense() for d in deltas}                               # (out, in) per layer
        check = view_gaps(loaded, projected, forget, quants, names)
        back = {n: int((g > 0).sum()) for n, g in check.items()}                       # facts still top-1 per view
        short = {n: int((g > -margin).sum()) for n, g in check.items()}                # inside the margin
        info["rounds"].append({**run, "recovered": back, "inside_margin": short})
        log.info("qforget round %d: still top-1 per view %s, inside the margin %s", rnd + 1, back, short)
        if not any(back.values()):
            break
        init = projected if basis is None else \
            {layer: projected[layer] @ torch.linalg.pinv(basis[layer]) for layer in layers}   # A (out, n)
    info.update(n_retain=len(retain.items), n_columns=cfg.n_columns)
    return EditResult(deltas, {}, info)

"""FT-L: constrained fine-tuning of the edit-target MLP weights (Zhu et al. 2020; ROME's FT-L).

The change dW of each target weight is trained directly on the target NLL, with every entry
clamped to |dW_ij| <= linf, then projected to low rank by SVD. A retain term keeps the model's
next-token distributions on unrelated text (the statistics corpus) where they were: the KL to the
unedited model at every position of `n_retain` corpus snippets, weighted by `retain_weight`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qedit.batching import build_batch, logits_at, target_index
from qedit.facts import EditRequest
from qedit.hooks import edit_outputs
from qedit.methods._common import context_prefixes
from qedit.methods._unlearn import corpus_retain, dense_edits
from qedit.methods.base import (EditContext, EditMethod, EditResult, MethodConfig, finish_delta, register_method,
                                resolve_layers)
from qedit.model import LoadedModel


@dataclass(frozen=True)
class FtConfig(MethodConfig):
    steps: int = 40
    lr: float = 5e-3
    linf: float = 2e-2          # bound on every entry of dW
    stop_nll: float = 0.05
    energy: float | None = 0.9  # low-rank projection keeps this share of the energy
    retain_weight: float = 1.0  # weight of the KL to the unedited model on retain text (0: off)
    n_retain: int = 16          # corpus snippets used as retain text
    retain_len: int = 24        # tokens per snippet

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.lr <= 0 or self.linf <= 0:
            raise ValueError("FtConfig: steps >= 1, lr > 0 and linf > 0 are required")
        if self.retain_weight < 0 or self.n_retain < 0 or self.retain_len < 2:
            raise ValueError("FtConfig: retain_weight >= 0, n_retain >= 0 and retain_len >= 2 are required")


@register_method(EditMethod.FT, FtConfig, multi_layer=False)
def compute(loaded: LoadedModel, requests: Sequence[EditRequest], cfg: FtConfig, ctx: EditContext) -> EditResult:
    layers = resolve_layers(loaded, cfg, multi_layer=False)
    prefixes = context_prefixes(loaded, cfg)
    texts = [pre + r.prompt for r in requests for pre in prefixes]
    batch = build_batch(loaded, texts, [r.target_new for r in requests for _ in prefixes])
    rows, cols, ids = target_index(batch)
    params = {layer: torch.zeros(tuple(loaded.edit_weight(layer).shape), requires_grad=True) for layer in layers}  # (out, in)
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)

    edits = dense_edits(loaded, params)
    retain = corpus_retain(loaded, cfg.stats, cfg.n_retain, cfg.retain_len) if cfg.retain_weight > 0 else None
    nll = float("inf")
    for _ in tqdm(range(cfg.steps), desc="fine-tuning", unit="step", leave=False):
        opt.zero_grad()
        with edit_outputs(loaded.model, edits):
            logits = logits_at(loaded, batch, rows, cols)
        loss = -F.log_softmax(logits, -1).gather(1, ids[:, None]).mean()
        nll = float(loss.detach())
        if retain is not None:
            r_batch, r_rows, r_cols, r_ref = retain
            with edit_outputs(loaded.model, edits):
                r_logp = F.log_softmax(logits_at(loaded, r_batch, r_rows, r_cols), -1)      # (n_pos, vocab)
            kl = F.kl_div(r_logp, r_ref, log_target=True, reduction="batchmean")
            loss = loss + cfg.retain_weight * kl
        if nll < cfg.stop_nll:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p in params.values():
                p.clamp_(-cfg.linf, cfg.linf)
    deltas = [finish_delta(loaded, layer, p.detach(), cfg, {"n_requests": len(requests)}) for layer, p in params.items()]
    return EditResult(deltas, {}, {"layers": list(layers), "train_nll": nll})

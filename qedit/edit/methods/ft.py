"""FT-L: constrained fine-tuning of the edit-target MLP weights (Zhu et al. 2020; ROME's FT-L).

The change dW of each target weight is trained directly on the target NLL, with every entry
clamped to |dW_ij| <= linf (the norm constraint of FT-L), then projected to low rank by SVD.
Training stops once the mean NLL of the target tokens is below stop_nll.

Two optional retain terms keep unrelated text where it was (both off by default; see
benchmarks/RESULTS.md, "Editing in full precision", for what each costs and buys on Gemma 3 270M):
- `key_weight`: the relative change of the layer's output on ordinary keys,
  E||dW k||^2 / E||W k||^2 = tr(dW C dW^T) / tr(W C W^T), C = E[k k^T] the cached key statistics
  (MEMIT's preservation term as a penalty; one (out, in) x (in, in) product per step). With Adam it
  barely binds (Adam's first steps move every entry by lr whatever the gradient's size); with
  optimizer="normalized" (steps of Frobenius norm lr along the gradient) it does, slowly.
- `retain_weight`: the KL to the unedited model at every 6th position of `n_retain` corpus
  snippets; it runs the model over the snippets at every step, which makes an edit many times slower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qedit.core.batching import build_batch, logits_at, target_index
from qedit.core.facts import EditRequest
from qedit.core.hooks import edit_outputs
from qedit.core.model import LoadedModel
from qedit.core.stats import key_covariance
from qedit.edit.keys import context_prefixes
from qedit.edit.registry import (
    EditContext,
    EditMethod,
    EditResult,
    MethodConfig,
    finish_delta,
    register_method,
    resolve_layers,
)
from qedit.edit.requant import dense_edits
from qedit.edit.retain import corpus_retain


@dataclass(frozen=True)
class FtConfig(MethodConfig):
    steps: int = 40
    lr: float = 1e-3
    linf: float = 1e-3          # bound on every entry of dW
    stop_nll: float = 1.0       # mean NLL of the target tokens: P(target) > 0.37 is enough to win
    energy: float | None = 0.9  # low-rank projection keeps this share of the energy
    optimizer: str = "adam"     # "adam", or "normalized": steps of Frobenius norm lr along the gradient
    key_weight: float = 0.0     # weight of the relative output change on the statistics' keys (0: off)
    retain_weight: float = 0.0  # weight of the KL to the unedited model on corpus snippets (0: off)
    n_retain: int = 16          # corpus snippets used as retain text
    retain_len: int = 24        # tokens per snippet

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.lr <= 0 or self.linf <= 0:
            raise ValueError("FtConfig: steps >= 1, lr > 0 and linf > 0 are required")
        if self.optimizer not in ("adam", "normalized"):
            raise ValueError(f"FtConfig: optimizer must be 'adam' or 'normalized', not {self.optimizer!r}")
        if self.key_weight < 0 or self.retain_weight < 0 or self.n_retain < 0 or self.retain_len < 2:
            raise ValueError("FtConfig: key_weight >= 0, retain_weight >= 0, n_retain >= 0 and retain_len >= 2 are required")


@register_method(EditMethod.FT, FtConfig, multi_layer=False)
def compute(loaded: LoadedModel, requests: Sequence[EditRequest], cfg: FtConfig, ctx: EditContext) -> EditResult:
    layers = resolve_layers(loaded, cfg, multi_layer=False)
    prefixes = context_prefixes(loaded, cfg)
    texts = [pre + r.prompt for r in requests for pre in prefixes]
    batch = build_batch(loaded, texts, [r.target_new for r in requests for _ in prefixes])
    rows, cols, ids = target_index(batch)
    params = {layer: torch.zeros(loaded.edit_shape(layer), device=loaded.layer_device(layer), requires_grad=True)
              for layer in layers}                                                                      # (out, in)
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr) if cfg.optimizer == "adam" else None

    edits = dense_edits(loaded, params)
    covs = {layer: c.to(params[layer].device)                                                   # (in, in) each
            for layer, c in (key_covariance(loaded, layers, cfg.stats) if cfg.key_weight > 0 else {}).items()}
    with torch.no_grad():  # tr(W C W^T): the mean squared output on ordinary keys
        out_energy = {layer: float(((loaded.edit_weight(layer).float() @ c) * loaded.edit_weight(layer).float()).sum())
                      for layer, c in covs.items()}
    retain = corpus_retain(loaded, cfg.stats, cfg.n_retain, cfg.retain_len) if cfg.retain_weight > 0 else None
    nll = float("inf")
    for _ in tqdm(range(cfg.steps), desc="fine-tuning", unit="step", leave=False):
        for p in params.values():
            p.grad = None
        with edit_outputs(loaded.model, edits):
            logits = logits_at(loaded, batch, rows, cols)
        loss = -F.log_softmax(logits, -1).gather(1, ids[:, None]).mean()                      # on the input device
        nll = float(loss.detach())
        if nll < cfg.stop_nll:
            break
        for layer, c in covs.items():  # tr(dW C dW^T) / tr(W C W^T), dW (out, in)
            loss = loss + (cfg.key_weight * ((params[layer] @ c) * params[layer]).sum() / out_energy[layer]).to(loss.device)
        if retain is not None:
            r_batch, r_rows, r_cols, r_ref = retain
            with edit_outputs(loaded.model, edits):
                r_logp = F.log_softmax(logits_at(loaded, r_batch, r_rows, r_cols), -1)      # (n_pos, vocab)
            kl = F.kl_div(r_logp, r_ref, log_target=True, reduction="batchmean")
            loss = loss + cfg.retain_weight * kl
        loss.backward()
        with torch.no_grad():
            if opt is not None:
                opt.step()
            else:  # a step of Frobenius norm lr along the gradient: it keeps the gradient's low rank
                first = next(iter(params.values())).device   # with a device map, layers' grads on their devices
                norm = torch.sqrt(sum((p.grad ** 2).sum().to(first) for p in params.values())).clamp_min(1e-12)
                for p in params.values():
                    p.sub_(cfg.lr * p.grad / norm.to(p.device))
            for p in params.values():
                p.clamp_(-cfg.linf, cfg.linf)
    deltas = [finish_delta(loaded, layer, p.detach(), cfg, {"n_requests": len(requests)}) for layer, p in params.items()]
    return EditResult(deltas, {}, {"layers": list(layers), "train_nll": nll})

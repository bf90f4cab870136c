"""MEMIT's scheme, shared by MEMIT and AlphaEdit: optimise a residual target z at the last edit
layer, then walk the layers in order, giving each an equal share of what is still missing and
solving that layer's least-squares update with the method's own solver."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from qedit.core import linalg
from qedit.core.delta import LowRankDelta
from qedit.core.facts import EditRequest
from qedit.core.model import LoadedModel
from qedit.core.stats import key_covariance
from qedit.edit.keys import context_prefixes, site_values, site_values_many
from qedit.edit.registry import EditContext, EditResult, MethodConfig, finish_delta, resolve_layers
from qedit.edit.strength import check_strength, minimal_scale
from qedit.edit.target_cache import target_cache_dir
from qedit.edit.targets import REACH_TARGET, TargetObjective, optimize_targets

# Singular values of the post-MLP norm's Jacobian below this share of the largest are dropped:
# Gemma's norm gains span 0.02..800, and chasing the weak directions blows the update up.
PINV_RTOL = 1e-3

# (layer, keys (n, d_in), residuals (n, d_out), key covariance (d_in, d_in)) -> dW (d_out, d_in)
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SpreadConfig(MethodConfig):
    """Settings of the methods that spread a batch over several layers (MEMIT, AlphaEdit)."""

    # Minimal strength: scale the batch's deltas down to the smallest factor at which every request's new
    # target still leads the true answer and every other token by this many nats, averaged over its prompt
    # and context prefixes (None: full strength). It trades a little generalization for a smaller |dW| and
    # better locality at the same efficacy (benchmarks/RESULTS.md: full strength in "Editing in full
    # precision", this default in the fp32 columns of "Quantization-aware editing, case by case"). A batch
    # is scaled until its weakest request reaches the margin, so large batches are seldom scaled at all.
    target_margin: float | None = 2.0
    # When even the full edit stays below target_margin (the spread leaves part of the target unreached),
    # scale it up to the smallest factor that reaches it, at most this much (1: never scale up).
    max_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_strength(self.target_margin, self.max_scale)


def _to_mlp_space(loaded: LoadedModel, layer: int, resid: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
    """Residual-stream change (n, d) -> the MLP-output change that produces it, through the
    post-MLP norm's Jacobian at the current MLP output (identity when there is no such norm), divided by
    the factor the MLP output is scaled by before the residual add (Granite's residual_multiplier)."""
    if loaded.arch.mlp_out_scale is not None:
        resid = resid / float(getattr(loaded.model.config, loaded.arch.mlp_out_scale))
    if loaded.arch.mlp_out_norm is None:
        return resid
    norm = loaded.module(loaded.arch.mlp_out_norm.format(layer))
    out = []
    for r, u in zip(resid, mlp_out):
        jac = torch.autograd.functional.jacobian(lambda x: norm(x[None])[0], u.detach())   # (d, d), at the layer's device
        # the norm's Jacobian is singular along u itself: a truncated pseudo-inverse keeps the step finite
        j64 = linalg.wide(jac)
        out.append((torch.linalg.pinv(j64, rtol=PINV_RTOL) @ linalg.wide(r, j64.device)).float())
    return torch.stack(out)


def spread_edit(loaded: LoadedModel, requests: Sequence[EditRequest], cfg: SpreadConfig, ctx: EditContext,
                solver: LayerSolver, objective: TargetObjective = REACH_TARGET,
                base: Sequence[LowRankDelta] = ()) -> EditResult:
    """MEMIT's spread of `requests` with `solver`. `objective`: what the residual target reaches (an
    unlearning method passes its own; minimal strength applies only where the objective allows it).
    `base`: deltas already made (applied through hooks, the model untouched) that this edit is computed
    on top of; not returned."""
    layers = resolve_layers(loaded, cfg, multi_layer=True)
    covs = key_covariance(loaded, layers, cfg.stats)    # every layer's in one pass over the text (and cached)
    if cfg.stats.use_cache:   # read back one layer's at its solve: one (d_in, d_in) matrix held, not len(layers)
        covs = {}
    prefixes = context_prefixes(loaded, cfg)
    # The target is optimised as a change of the last edit layer's MLP output, so the residual
    # target z is one that an MLP can write (with a post-MLP norm, as in Gemma, not every
    # residual direction is cheap to reach); z is the last layer's output with that change made.
    z_site = loaded.arch.layer.format(layers[-1])
    last_mlp = loaded.arch.mlp_out.format(layers[-1])
    u_delta, nlls = optimize_targets(loaded, requests, last_mlp, prefixes, cfg.target, applied=base,
                                     cache_dir=target_cache_dir(loaded, cfg, ctx), objective=objective)  # (n, d_out)
    z_target = site_values(loaded, requests, z_site, "output", prefixes, applied=base,
                           inject=(last_mlp, u_delta))                                   # (n, d_model)
    applied: list[LowRankDelta] = []
    keys: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(tqdm(layers, desc="spreading over layers", unit="layer", leave=False)):
        mlp = loaded.arch.mlp_out.format(layer)
        k, mlp_now, cur = site_values_many(loaded, requests, [(mlp, "input"), (mlp, "output"), (z_site, "output")],
                                           prefixes, [*base, *applied])          # (n, d_in), (n, d_out), (n, d_model)
        resid = (z_target - cur) / (len(layers) - i)                                         # (n, d_model)
        resid = _to_mlp_space(loaded, layer, resid, mlp_now)                                 # (n, d_out)
        cov = covs[layer] if layer in covs else key_covariance(loaded, [layer], cfg.stats)[layer]   # (d_in, d_in)
        dw = solver(layer, k, resid, cov)                                                    # (d_out, d_in)
        del cov
        applied.append(finish_delta(loaded, layer, dw, cfg, {"n_requests": len(requests)}))
        keys[layer] = k
    info = {"layers": list(layers), "target_nll": nlls}
    if cfg.target_margin is not None and objective.minimal_strength:
        alpha, margin = minimal_scale(loaded, requests, prefixes, applied, base, cfg.target_margin,
                                      max_scale=cfg.max_scale)
        applied = [d.scaled(alpha) for d in applied]
        info.update(scale=alpha, margin=margin)
    return EditResult(applied, keys, info)

"""ROME (Meng et al. 2022): one rank-one edit per request at a single MLP output projection.

dW = (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*), where v* - W k* is the optimised output change.
Several requests are applied one after another (each sees the earlier ones through hooks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from qedit.core import linalg
from qedit.core.delta import LowRankDelta
from qedit.core.facts import EditRequest
from qedit.core.model import LoadedModel
from qedit.core.stats import key_covariance
from qedit.edit.keys import context_prefixes, edit_keys
from qedit.edit.registry import (
    EditContext,
    EditMethod,
    EditResult,
    MethodConfig,
    TargetConfig,
    register_method,
    resolve_layers,
)
from qedit.edit.strength import check_strength, minimal_scale
from qedit.edit.target_cache import target_cache_dir
from qedit.edit.targets import optimize_targets


@dataclass(frozen=True)
class RomeConfig(MethodConfig):
    # A gentler target than ROME's paper settings (stop at P(new) ~ 0.74, tighter norm bound, more KL):
    # on Gemma 3 270M it makes a smaller |dW| at the same efficacy, with better locality
    # (benchmarks/RESULTS.md, "Editing in full precision").
    target: TargetConfig = field(default_factory=lambda: TargetConfig(stop_nll=0.3, clamp_norm=2.0, kl_factor=0.25))
    cov_ridge: float = 0.0      # shrink C towards mean(diag C) * I before C^-1 k (see linalg.shrink)
    # Minimal strength: scale each edit down to the smallest factor at which the new target still leads the
    # true answer and every other token by this many nats over the prompt and its context prefixes (None:
    # full strength). A smaller margin means a smaller |dW| and better locality at the same efficacy, at some
    # cost in generalization (benchmarks/RESULTS.md, "Editing in full precision", ROME at minimal strength).
    target_margin: float | None = 2.0
    max_scale: float = 1.0      # when the full edit stays below target_margin, scale it up at most this much

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cov_ridge < 0:
            raise ValueError("cov_ridge must be >= 0")
        check_strength(self.target_margin, self.max_scale)
        if self.layers is not None and len(self.layers) != 1:
            raise ValueError("ROME edits exactly one layer")


@register_method(EditMethod.ROME, RomeConfig, multi_layer=False)
def compute(loaded: LoadedModel, requests: Sequence[EditRequest], cfg: RomeConfig, ctx: EditContext) -> EditResult:
    (layer,) = resolve_layers(loaded, cfg, multi_layer=False)
    cov = key_covariance(loaded, [layer], cfg.stats)[layer]                          # (d_in, d_in)
    prefixes = context_prefixes(loaded, cfg)
    site = loaded.arch.mlp_out.format(layer)
    name = loaded.arch.weight_name(layer)
    deltas: list[LowRankDelta] = []
    keys, nlls = [], []
    for req in requests:  # sequential: each edit is computed on the model with the earlier ones applied
        k = edit_keys(loaded, [req], layer, prefixes, deltas)[0]                      # (d_in,)
        resid, nll = optimize_targets(loaded, [req], site, prefixes, cfg.target, deltas,
                                     target_cache_dir(loaded, cfg, ctx))  # (1, d_out)
        u, v = linalg.rank_one_update(cov, k, resid[0], cfg.cov_ridge)                              # (d_out, 1), (1, d_in)
        delta = LowRankDelta(name, layer, u.float(), v.float(), 1.0, loaded.arch.mlp_out_orientation,
                             {"subject": req.subject, "target_nll": nll[0]})
        if cfg.target_margin is not None:
            alpha, margin = minimal_scale(loaded, [req], prefixes, [delta], deltas, cfg.target_margin,
                                          max_scale=cfg.max_scale)
            delta = LowRankDelta(name, layer, u.float(), v.float(), alpha, loaded.arch.mlp_out_orientation,
                                 dict(delta.meta, scale=alpha, margin=margin))
        deltas.append(delta)
        keys.append(k)
        nlls.extend(nll)
    return EditResult(deltas, {layer: torch.stack(keys)}, {"layers": [layer], "target_nll": nlls})

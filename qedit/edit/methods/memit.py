"""MEMIT (Meng et al. 2023): a batch of edits spread over several MLP layers.

Per layer: dW = R K^T (lambda C + K K^T)^-1 (math orientation), C = E[k k^T] of the layer's keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from qedit.core import linalg
from qedit.core.facts import EditRequest
from qedit.core.model import LoadedModel
from qedit.edit.registry import EditContext, EditMethod, EditResult, register_method
from qedit.edit.spread import SpreadConfig, spread_edit


@dataclass(frozen=True)
class MemitConfig(SpreadConfig):
    cov_weight: float = 1e3     # lambda: how strongly the covariance of ordinary keys is preserved

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cov_weight < 0:
            raise ValueError("cov_weight must be >= 0")


@register_method(EditMethod.MEMIT, MemitConfig, multi_layer=True)
def compute(loaded: LoadedModel, requests: Sequence[EditRequest], cfg: MemitConfig, ctx: EditContext) -> EditResult:
    def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        # lambda C + history: one (d_in, d_in) copy, where the solve runs (the keys' device)
        prior = cov.to(device=linalg.float64_device(keys.device), dtype=torch.float64, copy=True).mul_(cfg.cov_weight)
        prior += ctx.history[layer].to(prior) if layer in ctx.history else 0.0
        return linalg.batch_update(keys, resid, prior, consume=True).float()

    return spread_edit(loaded, requests, cfg, ctx, solve)

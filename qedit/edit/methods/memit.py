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


@register_method(EditMethod.MEMIT, MemitConfig, multi_layer=True, stats_held=0)   # covariances: spread_edit
def compute(loaded: LoadedModel, requests: Sequence[EditRequest], cfg: MemitConfig, ctx: EditContext) -> EditResult:
    def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        def prior() -> torch.Tensor:   # lambda C + history, afresh: batch_update adds to it and factors it in place
            p = cov.to(device=linalg.float64_device(keys.device), dtype=torch.float64, copy=True).mul_(cfg.cov_weight)
            p += ctx.history[layer].to(p) if layer in ctx.history else 0.0
            return p                                                                # (d_in, d_in) float64

        return linalg.batch_update(keys, resid, prior).float()

    return spread_edit(loaded, requests, cfg, ctx, solve)

"""AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of the preserved
keys, so dW K0 = 0 for ordinary keys K0; sequential batches add the keys of earlier edits.

Per layer: dW = R K^T P ((K_p K_p^T + K K^T) P + l2 I)^-1, P the projector onto the eigenvectors
of C = E[k k^T] with small eigenvalues, K_p the keys of earlier batches (EditContext.history).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from qedit.core import linalg
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest
from qedit.core.model import LoadedModel
from qedit.core.stats import key_eigh
from qedit.edit.registry import EditContext, EditMethod, EditResult, register_method, resolve_layers
from qedit.edit.spread import SpreadConfig, spread_edit


@dataclass(frozen=True)
class AlphaEditConfig(SpreadConfig):
    nullspace_threshold: float = 1e-3   # eigenvalues of C below threshold * max eigenvalue span the null space
    l2: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.nullspace_threshold < 1 or self.l2 < 0:
            raise ValueError("nullspace_threshold must be in (0, 1) and l2 >= 0")


# its solve holds the projector, the prior, K^T K, their sum, P (C + K^T K) and the LU factor of that; each edited
# layer's float64 eigenvectors are held throughout
@register_method(EditMethod.ALPHAEDIT, AlphaEditConfig, multi_layer=True, solve_copies=6, stats_held=8)
def compute(loaded: LoadedModel, requests: Sequence[EditRequest], cfg: AlphaEditConfig, ctx: EditContext) -> EditResult:
    def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        proj = linalg.projector_from_eigh(*eighs[layer], cfg.nullspace_threshold, relative=True)  # (d_in, d_in)
        null_dim = int(round(float(torch.trace(proj))))
        if null_dim == 0:
            raise QeditError(
                f"AlphaEdit: layer {layer} has no null space at nullspace_threshold={cfg.nullspace_threshold} "
                "(every key direction is in use), so the edit would be zero; raise the threshold or use memit")
        null_dims[layer] = null_dim
        prior = ctx.history.get(layer, torch.zeros_like(cov))   # batch_update moves it to the keys' device
        return linalg.batch_update(keys, resid, prior, projector=proj, l2=cfg.l2).float()

    eighs = key_eigh(loaded, resolve_layers(loaded, cfg, multi_layer=True), cfg.stats)  # cached with the statistics
    null_dims: dict[int, int] = {}
    result = spread_edit(loaded, requests, cfg, ctx, solve)
    result.info["null_space_dims"] = null_dims
    return result

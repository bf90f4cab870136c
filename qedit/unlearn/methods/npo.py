"""NPO: negative preference optimisation (Zhang et al. 2024) on the facts (and texts) to forget, with a retain loss.

L = (2 / beta) * mean_i log(1 + (pi(y_i | x_i) / pi_ref(y_i | x_i))^beta), with pi the edited model's
probability of the whole answer (or text) sequence and pi_ref the unedited model's; plus the retain
term of `qedit.unlearn.loop`. Unlike GA its gradient fades once pi << pi_ref, so it diverges less.
Trained on the MLP output weights of the default edit layers, dW projected to low rank like FT's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from qedit.core.errors import QeditError
from qedit.core.model import LoadedModel
from qedit.edit.registry import EditContext, EditResult
from qedit.unlearn.loop import (
    Targets,
    UnlearnConfig,
    active_sequences,
    forget_targets,
    logits_with,
    seq_logprobs,
    unlearn,
)
from qedit.unlearn.registry import UnlearnMethod, register_unlearn_method
from qedit.unlearn.requests import ForgetRequest


@dataclass(frozen=True)
class NpoConfig(UnlearnConfig):
    # The utility-constrained baseline of the literature: small steps, stopped as soon as every fact is
    # forgotten at full precision; on Gemma nearly every fact comes back at Q4_K_M (benchmarks/RESULTS.md,
    # "Unlearning").
    steps: int = 60
    lr: float = 1e-5
    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0 or not math.isfinite(self.beta):
            raise QeditError(f"NpoConfig.beta: must be a finite number > 0, got {self.beta!r}")


def npo_objective(ref: torch.Tensor, beta: float, drop_forgotten: bool):
    """The NPO loss for reference sequence log-probs ref (n_seq,); with drop_forgotten, over the facts
    whose answer is still top-1 (and the texts) only."""

    def objective(logits: torch.Tensor, t: Targets) -> torch.Tensor:
        ratio = seq_logprobs(logits, t) - ref                                   # (n_seq,) log(pi / pi_ref)
        loss = (2.0 / beta) * F.softplus(beta * ratio)                          # (n_seq,)
        if not drop_forgotten:
            return loss.mean()
        keep = active_sequences(logits, t)                                      # (n_seq,)
        return loss[keep].sum() / max(1, int(keep.sum()))

    return objective


@register_unlearn_method(UnlearnMethod.NPO, NpoConfig, multi_layer=True)
def compute(loaded: LoadedModel, requests: Sequence[ForgetRequest], cfg: NpoConfig, ctx: EditContext) -> EditResult:
    forget = forget_targets(loaded, requests)
    with torch.no_grad():
        ref = seq_logprobs(logits_with(loaded, {}, forget), forget)                # (n_seq,)
    return unlearn(loaded, requests, cfg, forget, npo_objective(ref, cfg.beta, cfg.drop_forgotten), "NPO")

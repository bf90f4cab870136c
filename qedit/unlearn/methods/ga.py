"""GA: gradient ascent on the answer NLL of the facts (and texts) to forget, with a retain loss.

The naive unlearning baseline (Jang et al. 2023; with a retain term, "gradient difference"):
minimise the mean log-probability of the tokens to forget plus the retain term of
`qedit.unlearn.loop` (KL to the unedited model at the retain answers by default), on the MLP
output weights of the architecture's default edit layers, until no fact's answer is top-1 any more
(or `steps` run out); each layer's dW is then projected to low rank like FT's.

Small updates of this kind are what quantization undoes: requantizing W0 + dW to W0's grid rounds
most of dW away, and the facts come back (Zhang et al., ICLR 2025). See `qforget` for the robust variant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from qedit.core.model import LoadedModel
from qedit.edit.registry import EditContext, EditResult
from qedit.unlearn.loop import Targets, UnlearnConfig, active_sequences, forget_targets, token_logprobs, unlearn
from qedit.unlearn.registry import UnlearnMethod, register_unlearn_method
from qedit.unlearn.requests import ForgetRequest


@dataclass(frozen=True)
class GaConfig(UnlearnConfig):
    # The utility-constrained baseline of the literature: small steps, stopped as soon as every fact is
    # forgotten at full precision; on Gemma nearly every fact comes back at Q4_K_M (benchmarks/RESULTS.md,
    # "Unlearning").
    steps: int = 60
    lr: float = 1e-5


def ga_objective(drop_forgotten: bool):
    """Mean log P of the tokens to forget (minimised: gradient ascent on their NLL); with drop_forgotten,
    only of the facts whose answer is still top-1 (and of the texts)."""

    def objective(logits: torch.Tensor, t: Targets) -> torch.Tensor:
        logp = token_logprobs(logits, t)                                           # (n_tok,)
        if not drop_forgotten:
            return logp.mean()
        keep = active_sequences(logits, t)[t.owner]                                # (n_tok,)
        return logp[keep].sum() / max(1, int(keep.sum()))

    return objective


@register_unlearn_method(UnlearnMethod.GA, GaConfig, multi_layer=True)
def compute(loaded: LoadedModel, requests: Sequence[ForgetRequest], cfg: GaConfig, ctx: EditContext) -> EditResult:
    return unlearn(loaded, requests, cfg, forget_targets(loaded, requests), ga_objective(cfg.drop_forgotten),
                   "gradient ascent")

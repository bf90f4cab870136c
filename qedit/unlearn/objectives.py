"""Target objectives of unlearning (`qedit.edit.targets.TargetObjective`): what kforget's residual target
must reach at the subject's last token instead of an edit's new answer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qedit.core.batching import best_other


@dataclass(frozen=True)
class AwayFromAnswer:
    """The answer's first token `margin` nats below the best other token: a hinge that stops pulling once the
    margin holds. The runner-up is held fixed, so lowering the answer spreads its mass over every other token."""

    margin: float
    name: str = "hinge"
    first_token_only: bool = True
    minimal_strength: bool = False    # kforget scales its deltas itself, to its own forget margin

    def token_loss(self, logp_all: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
        logp = logp_all.gather(1, t_ids[:, None])[:, 0]                                   # (n_t,)
        other = best_other(logp_all, t_ids).detach()                                       # (n_t,)
        return torch.relu(logp - other + self.margin)                                      # (n_t,)

    def cache_tag(self) -> dict[str, float]:
        return {"away_margin": self.margin}   # the key the cache has always used for these targets

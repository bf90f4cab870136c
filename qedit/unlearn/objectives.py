"""Target objectives of unlearning (`qedit.edit.targets.TargetObjective`): what kforget's residual target
must reach at the subject's last token instead of an edit's new answer."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
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
    contrast: bool = False
    paraphrases: bool = False

    def token_loss(self, logp_all: torch.Tensor, t_ids: torch.Tensor,
                   contrast_ids: torch.Tensor | None = None) -> torch.Tensor:
        logp = logp_all.gather(1, t_ids[:, None])[:, 0]                                   # (n_t,)
        other = best_other(logp_all, t_ids).detach()                                       # (n_t,)
        return torch.relu(logp - other + self.margin)                                      # (n_t,)

    def cache_tag(self) -> dict[str, float]:
        return {"away_margin": self.margin}   # the key the cache has always used for these targets


@dataclass(frozen=True)
class BelowWrong:
    """AwayFromAnswer's hinge, and a second one: the answer's first token `wrong_margin` nats below the first token
    of the request's wrong answer (kforget puts it in the EditRequest's ground_truth), whether or not the answer was
    top-1; on the prompt, its paraphrases that hold the subject (the EditRequest's rephrase_prompts) and the context
    prefixes. The wrong answer is held fixed: the answer is lowered, the wrong one is not taught."""

    margin: float
    wrong_margin: float
    digest: str = ""                  # of the wrong answers and paraphrases (they are not in the cache's key)
    name: str = "hinge below the wrong answer"
    first_token_only: bool = True
    minimal_strength: bool = False
    contrast: bool = True
    paraphrases: bool = True

    @staticmethod
    def of(margin: float, wrong_margin: float, wrong_and_paraphrases: Sequence[object]) -> BelowWrong:
        blob = json.dumps(wrong_and_paraphrases, sort_keys=True, default=str)
        return BelowWrong(margin, wrong_margin, hashlib.sha256(blob.encode()).hexdigest()[:12])

    def token_loss(self, logp_all: torch.Tensor, t_ids: torch.Tensor,
                   contrast_ids: torch.Tensor | None = None) -> torch.Tensor:
        away = AwayFromAnswer(self.margin).token_loss(logp_all, t_ids)                     # (n_t,)
        if contrast_ids is None:
            return away
        logp = logp_all.gather(1, t_ids[:, None])[:, 0]                                   # (n_t,)
        wrong = logp_all.gather(1, contrast_ids.clamp(min=0)[:, None])[:, 0].detach()      # (n_t,)
        below = torch.relu(logp - wrong + self.wrong_margin)                               # (n_t,)
        return away + torch.where(contrast_ids >= 0, below, torch.zeros_like(below))       # (n_t,)

    def cache_tag(self) -> dict[str, float]:
        return {"away_margin": self.margin, "wrong_margin": self.wrong_margin,
                "wrong_digest": float(int(self.digest, 16)) if self.digest else 0.0}

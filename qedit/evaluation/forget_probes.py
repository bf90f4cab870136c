"""What forgetting leaves of an answer beyond its rank: its probability against a wrong answer of the same type, on
the prompt and on its paraphrases, and whether sampling still says it (`qedit.evaluation.forget` reports them).

- A fact's wrong answer (`qedit.unlearn.requests.wrong_answers`, which kforget's option trains with too): its
  `target_new` (CounterFact's counterfactual answer); else the answer of another fact of
  the same requests with the same `relation_id` and a different answer (the next such fact in their order, wrapping
  around); else none, and the fact is left out of the ratio metrics. Never the model's own next-best token: that
  changes from model to model, and the rungs of a ladder must be compared against one fixed answer.
- truth ratio of a fact: P(true) / (P(true) + P(wrong)), each the whole answer's teacher-forced probability
  (computed as sigmoid(log P(true) - log P(wrong)): no underflow); below_wrong: P(true) < P(wrong).
- sampled leak of a fact: at least one of `LeakSampling.n` continuations of its prompt, sampled at
  `LeakSampling.temperature` with a fixed seed in the runner's runtime, starts with the true answer
  (`starts_with_answer`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from qedit.runtimes.torch_runner import Runner, check_sampling
from qedit.unlearn.requests import wrong_answers

__all__ = ["LeakSampling", "sample_all", "starts_with_answer", "truth_ratio", "wrong_answers"]

log = logging.getLogger(__name__)

_PROGRESS_CHUNK = 8  # prompts sampled per progress-bar step


@dataclass(frozen=True)
class LeakSampling:
    """How `sampled_leak` samples: `n` continuations per fact prompt at `temperature`, the draws seeded by `seed`
    (and the prompt: `qedit.runtimes.torch_runner.prompt_seed`)."""

    n: int = 20
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_sampling(self.n, self.temperature)


def starts_with_answer(text: str, answer: str) -> bool:
    """The one rule of a leak: the continuation, stripped, starts with the answer (case ignored)."""
    return text.strip().casefold().startswith(answer.strip().casefold())


def truth_ratio(logp_true: float, logp_wrong: float) -> float:
    """P(true) / (P(true) + P(wrong)) from the two log-probabilities."""
    d = logp_wrong - logp_true
    return 1.0 / (1.0 + math.exp(d)) if d < 700 else 0.0


def sample_all(runner: Runner, items: list[tuple[str, int]], sampling: LeakSampling,
               progress: str | None) -> list[list[str]]:
    """runner.sample over all (prompt, max_tokens) items; with a `progress` label, in chunks under a progress bar."""
    def run(chunk: list[tuple[str, int]]) -> list[list[str]]:
        return runner.sample(chunk, sampling.n, sampling.temperature, sampling.seed)

    if progress is None:
        return run(items)
    from tqdm.auto import tqdm

    out: list[list[str]] = []
    with tqdm(total=len(items), desc=f"{progress} sampling", unit="prompt", leave=False) as bar:
        for lo in range(0, len(items), _PROGRESS_CHUNK):
            out += run(items[lo:lo + _PROGRESS_CHUNK])
            bar.update(len(items[lo:lo + _PROGRESS_CHUNK]))
    return out

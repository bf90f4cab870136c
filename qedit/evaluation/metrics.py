"""Edit metrics per request, on any runner.

- efficacy: mean log P(target_new) > mean log P(ground_truth) on the prompt (CounterFact's test);
  efficacy_top1: the runner's top-1 tokens spell target_new exactly (teacher forced).
- generalization / generalization_top1: the same on the rephrased prompts (averaged).
- locality: share of the locality answer's tokens whose top-1 is unchanged against the unedited
  model (EasyEdit's measure); locality_top1: all of them unchanged. Needs a baseline report of the
  unedited model; without one, locality is not reported.
- margin: mean log P(target_new) - mean log P(ground_truth) on the prompt, in nats.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qedit.core.facts import EditRequest
from qedit.core.files import atomic_path
from qedit.runtimes.torch_runner import Runner, TokenScore

_PROGRESS_CHUNK = 32  # prompts scored per progress-bar step
METRICS = ("efficacy", "efficacy_top1", "generalization", "generalization_top1", "locality", "locality_top1")


@dataclass
class CaseResult:
    case_id: str | None
    subject: str
    target_new: str
    ground_truth: str | None
    logp_new: float
    logp_true: float | None
    efficacy: float | None
    efficacy_top1: float
    generalization: float | None
    generalization_top1: float | None
    locality: float | None
    locality_top1: float | None
    locality_argmax: list[list[int]] = field(default_factory=list)   # top-1 ids on each locality answer

    @property
    def margin(self) -> float | None:
        return None if self.logp_true is None else self.logp_new - self.logp_true


@dataclass
class EvalReport:
    runner: dict[str, str]
    cases: list[CaseResult]

    def aggregate(self) -> dict[str, float | None]:
        agg: dict[str, float | None] = {}
        for m in METRICS + ("margin",):
            vals = [getattr(c, m) for c in self.cases if getattr(c, m) is not None]
            agg[m] = sum(vals) / len(vals) if vals else None
        agg["n_cases"] = float(len(self.cases))
        return agg

    def to_json(self) -> dict[str, Any]:
        cases = []
        for c in self.cases:
            d = asdict(c)
            d["margin"] = c.margin
            cases.append(d)
        return {"runner": self.runner, "aggregate": self.aggregate(), "cases": cases}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalReport:
        """The report `to_json` wrote (derived fields such as margin are recomputed)."""
        names = {f.name for f in fields(CaseResult)}
        return cls(dict(data["runner"]), [CaseResult(**{k: v for k, v in c.items() if k in names}) for c in data["cases"]])

    def write_json(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2))


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score_all(runner: Runner, pairs: list[tuple[str, str]], progress: str | None) -> list[TokenScore]:
    """runner.score over all pairs; with a `progress` label, in chunks under a progress bar."""
    if progress is None:
        return runner.score(pairs)
    from tqdm.auto import tqdm

    out: list[TokenScore] = []
    with tqdm(total=len(pairs), desc=progress, unit="prompt", leave=False) as bar:
        for lo in range(0, len(pairs), _PROGRESS_CHUNK):
            out += runner.score(pairs[lo:lo + _PROGRESS_CHUNK])
            bar.update(min(_PROGRESS_CHUNK, len(pairs) - lo))
    return out


def evaluate(runner: Runner, requests: Sequence[EditRequest], baseline: EvalReport | None = None,
             progress: str | None = None) -> EvalReport:
    """Score every request on `runner`; `baseline` (the unedited model's report) enables locality.
    `progress`: a label for a progress bar over the scored prompts (none by default)."""
    if baseline is not None and len(baseline.cases) != len(requests):
        raise ValueError(f"baseline report has {len(baseline.cases)} cases, not {len(requests)}: "
                         "it must score the same requests in the same order")
    pairs: list[tuple[str, str]] = []
    for r in requests:
        pairs.append((r.prompt, r.target_new))
        if r.ground_truth is not None:
            pairs.append((r.prompt, r.ground_truth))
        for rp in r.rephrase_prompts:
            pairs.append((rp, r.target_new))
            if r.ground_truth is not None:
                pairs.append((rp, r.ground_truth))
        pairs.extend(zip(r.locality_prompts, r.locality_answers))
    scores = iter(score_all(runner, pairs, progress))
    cases = []
    for i, r in enumerate(requests):
        new: TokenScore = next(scores)
        true = next(scores) if r.ground_truth is not None else None
        gen, gen_top1 = [], []
        for _ in r.rephrase_prompts:
            g_new = next(scores)
            g_true = next(scores) if r.ground_truth is not None else None
            if g_true is not None:
                gen.append(float(g_new.mean_logprob > g_true.mean_logprob))
            gen_top1.append(float(g_new.top1))
        loc_scores = [next(scores) for _ in r.locality_prompts]
        argmax = [list(s.argmax_ids) for s in loc_scores]
        loc = loc_top1 = None
        if baseline is not None and loc_scores:
            ref = baseline.cases[i].locality_argmax
            per_tok = [float(a == b) for cur, base in zip(argmax, ref) for a, b in zip(cur, base)]
            loc = _mean(per_tok)
            loc_top1 = _mean([float(cur == base) for cur, base in zip(argmax, ref)])
        cases.append(CaseResult(
            case_id=r.case_id, subject=r.subject, target_new=r.target_new, ground_truth=r.ground_truth,
            logp_new=new.mean_logprob, logp_true=None if true is None else true.mean_logprob,
            efficacy=None if true is None else float(new.mean_logprob > true.mean_logprob),
            efficacy_top1=float(new.top1), generalization=_mean(gen), generalization_top1=_mean(gen_top1),
            locality=loc, locality_top1=loc_top1, locality_argmax=argmax,
        ))
    return EvalReport(runner.describe(), cases)


def format_summary(label: str, report: EvalReport) -> str:
    agg = report.aggregate()
    parts = [f"{m}={agg[m]:.3f}" for m in METRICS + ("margin",) if agg.get(m) is not None]
    return f"{label}: " + "  ".join(parts)

"""Unlearning metrics on any runner (torch, llama.cpp, ...): only `Runner.score` and `Runner.nll` are used.

Per fact to forget (a `ForgetRequest` with an answer):
- prob: P(answer's whole token sequence | prompt), teacher forced; prob_first: P(its first token);
- known: the answer's first token is still the runner's top-1 (the fact is recovered / not forgotten).
Per text to forget: its mean per-token NLL (nats).
Per retain item: correct = its answer's first token is top-1.

Aggregates: forget_prob, forget_prob_first (means), recovery_rate (share of facts still known),
retain_acc (share of retain items correct), heldout_acc (the same over held-out retain items: scored,
never given to the method), text_nll, and, against a baseline report of the unedited model on the same
facts and retain items, retain_kept (share of the retain items the baseline got right that are still
right) and forgotten (share of the facts the baseline knew that are no longer known).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from qedit.core.errors import QeditError
from qedit.core.files import atomic_path
from qedit.evaluation.metrics import score_all
from qedit.runtimes.torch_runner import Runner, TokenScore
from qedit.unlearn.requests import ForgetRequest, RetainItem

FORGET_METRICS = ("forget_prob", "forget_prob_first", "recovery_rate", "retain_acc", "retain_kept", "forgotten",
                  "heldout_acc", "text_nll")


@dataclass
class FactResult:
    case_id: str | None
    name: str                 # "subject -> answer"
    prompt: str
    answer: str
    prob: float               # P(all answer tokens), teacher forced
    prob_first: float         # P(first answer token)
    known: bool               # first answer token is top-1


@dataclass
class TextResult:
    case_id: str | None
    text: str
    nll: float                # mean NLL per token (nats)


@dataclass
class RetainResult:
    prompt: str
    answer: str
    prob_first: float
    correct: bool             # first answer token is top-1
    held_out: bool = False    # scored only; the method never saw it


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class ForgetReport:
    runner: dict[str, str]
    facts: list[FactResult]
    retain: list[RetainResult]
    texts: list[TextResult]
    baseline: ForgetReport | None = None   # the unedited model's report on the same items, for the relative metrics

    def aggregate(self) -> dict[str, float | None]:
        agg: dict[str, float | None] = {
            "forget_prob": _mean([f.prob for f in self.facts]),
            "forget_prob_first": _mean([f.prob_first for f in self.facts]),
            "recovery_rate": _mean([float(f.known) for f in self.facts]),
            "retain_acc": _mean([float(r.correct) for r in self.retain if not r.held_out]),
            "retain_kept": None,
            "forgotten": None,
            "heldout_acc": _mean([float(r.correct) for r in self.retain if r.held_out]),
            "text_nll": _mean([t.nll for t in self.texts]),
        }
        if self.baseline is not None:
            kept = [float(r.correct) for r, b in zip(self.retain, self.baseline.retain) if b.correct and not r.held_out]
            gone = [float(not f.known) for f, b in zip(self.facts, self.baseline.facts) if b.known]
            agg["retain_kept"], agg["forgotten"] = _mean(kept), _mean(gone)
        held = sum(r.held_out for r in self.retain)
        agg.update(n_facts=float(len(self.facts)), n_retain=float(len(self.retain) - held), n_heldout=float(held),
                   n_texts=float(len(self.texts)))
        return agg

    def to_json(self) -> dict[str, Any]:
        """Facts, retain items and texts with their scores; the baseline is not embedded (only its aggregates)."""
        return {"runner": self.runner, "aggregate": self.aggregate(),
                "baseline_aggregate": None if self.baseline is None else self.baseline.aggregate(),
                "facts": [asdict(f) for f in self.facts], "retain": [asdict(r) for r in self.retain],
                "texts": [asdict(t) for t in self.texts]}

    @classmethod
    def from_json(cls, data: dict[str, Any], baseline: ForgetReport | None = None) -> ForgetReport:
        """The report `to_json` wrote (give the baseline report again for the relative metrics)."""
        def rows(kind: type, key: str) -> list[Any]:
            names = {f.name for f in fields(kind)}
            return [kind(**{k: v for k, v in row.items() if k in names}) for row in data.get(key, [])]

        try:
            report = cls(dict(data["runner"]), rows(FactResult, "facts"), rows(RetainResult, "retain"),
                         rows(TextResult, "texts"))
        except (KeyError, TypeError) as exc:
            raise QeditError(f"not a forget report ({exc}); expected the JSON that ForgetReport.to_json wrote") from exc
        if baseline is not None:
            _check_baseline(baseline, report.facts, report.retain)
            report.baseline = baseline
        return report

    def write_json(self, path: Path) -> None:
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2))


def _check_baseline(baseline: ForgetReport, facts: Sequence[FactResult], retain: Sequence[RetainResult]) -> None:
    same = [(f.prompt, f.answer) for f in facts] == [(f.prompt, f.answer) for f in baseline.facts] and \
        [(r.prompt, r.answer, r.held_out) for r in retain] == [(r.prompt, r.answer, r.held_out) for r in baseline.retain]
    if not same:
        raise QeditError(f"baseline report scores {len(baseline.facts)} facts and {len(baseline.retain)} retain items "
                         "that differ from these; evaluate the unedited model on the same requests and retain set")


def _first(score: TokenScore) -> tuple[float, bool]:
    if not score.target_ids:
        raise QeditError("the runner returned no answer tokens; the answer must tokenize to at least one token")
    return math.exp(score.logprobs[0]), score.argmax_ids[0] == score.target_ids[0]


def evaluate_forget(runner: Runner, requests: Sequence[ForgetRequest], retain: Sequence[RetainItem],
                    baseline: ForgetReport | None = None, progress: str | None = None) -> ForgetReport:
    """Score the facts and texts to forget and the retain items on `runner`.

    `baseline`: the unedited model's report on the same requests and retain items (enables
    retain_kept and forgotten). `progress`: a label for a progress bar (none by default).
    """
    for i, r in enumerate(requests):
        if not isinstance(r, ForgetRequest):
            raise QeditError(f"request {i} is a {type(r).__name__}, not a ForgetRequest; "
                             "read the facts with qedit.unlearn.requests.load_forget_requests")
    facts = [r for r in requests if r.is_fact]
    pairs = [(r.prompt, r.answer) for r in facts] + [(x.prompt, x.answer) for x in retain]
    scores = score_all(runner, pairs, progress) if pairs else []  # type: ignore[arg-type]
    fact_rows = []
    for r, s in zip(facts, scores[: len(facts)]):
        p_first, known = _first(s)
        fact_rows.append(FactResult(r.case_id, r.name, r.prompt, r.answer, math.exp(sum(s.logprobs)), p_first,  # type: ignore[arg-type]
                                    bool(known)))
    retain_rows = []
    for item, s in zip(retain, scores[len(facts):]):
        p_first, correct = _first(s)
        retain_rows.append(RetainResult(item.prompt, item.answer, p_first, bool(correct), item.held_out))
    text_rows = []
    for r in requests:
        for text in r.texts:
            total, count = runner.nll(text)
            text_rows.append(TextResult(r.case_id, text, total / max(1, count)))
    if baseline is not None:
        _check_baseline(baseline, fact_rows, retain_rows)
    return ForgetReport(runner.describe(), fact_rows, retain_rows, text_rows, baseline)


def format_forget_summary(label: str, report: ForgetReport) -> str:
    agg = report.aggregate()
    parts = [f"{m}={agg[m]:.3f}" for m in FORGET_METRICS if agg.get(m) is not None]
    return f"{label}: " + "  ".join(parts)


"""Unlearning metrics on any runner (torch, llama.cpp, ...): only `Runner.score` and `Runner.nll` are used.

Per fact to forget (a `ForgetRequest` with an answer):
- prob: P(answer's whole token sequence | prompt), teacher forced; prob_first: P(its first token);
- known: the answer's first token is still the runner's top-1 (the fact is recovered / not forgotten).
- with a wrong answer (`qedit.evaluation.forget_probes`: target_new, or a same-relation answer): logp_wrong, and
  on each paraphrase prompt log P(true) and log P(wrong); leaks: how many of the sampled continuations of the
  prompt start with the answer.
Per text to forget: its mean per-token NLL (nats).
Per retain item: correct = its answer's first token is top-1.

Aggregates: forget_prob, forget_prob_first (means), recovery_rate (share of facts still known),
retain_acc (share of retain items correct), heldout_acc (the same over held-out retain items: scored,
never given to the method), text_nll, and, against a baseline report of the unedited model on the same
facts and retain items, retain_kept (share of the retain items the baseline got right that are still
right) and forgotten (share of the facts the baseline knew that are no longer known).
Beyond the rank (`forget_probes`): truth_ratio (mean of P(true) / (P(true) + P(wrong))) and below_wrong (share
of facts with P(true) < P(wrong)) over the facts with a wrong answer; para_truth_ratio and para_below_wrong, the
same on the paraphrase prompts (per fact the mean over its paraphrases, then the mean over facts); sampled_leak,
the share of facts whose answer starts at least one of the sampled continuations.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qedit.core.errors import QeditError
from qedit.core.files import atomic_path
from qedit.evaluation.forget_probes import LeakSampling, sample_all, starts_with_answer, truth_ratio, wrong_answers
from qedit.evaluation.metrics import score_all
from qedit.runtimes.torch_runner import GEN_EXTRA_TOKENS, Runner, TokenScore
from qedit.unlearn.requests import ForgetRequest, RetainItem

FORGET_METRICS = ("forget_prob", "forget_prob_first", "recovery_rate", "retain_acc", "retain_kept", "forgotten",
                  "heldout_acc", "text_nll", "truth_ratio", "below_wrong", "para_truth_ratio", "para_below_wrong",
                  "sampled_leak")


@dataclass
class FactResult:
    case_id: str | None
    name: str                 # "subject -> answer"
    prompt: str
    answer: str
    prob: float               # P(all answer tokens), teacher forced
    prob_first: float         # P(first answer token)
    known: bool               # first answer token is top-1
    logp: float | None = None                 # log P(all answer tokens)
    wrong: str | None = None                  # the wrong answer it is compared with
    wrong_source: str | None = None           # "target_new" or "relation"
    logp_wrong: float | None = None           # log P(all wrong-answer tokens | prompt)
    para_logp: list[float] = field(default_factory=list)        # log P(answer | paraphrase), per paraphrase
    para_logp_wrong: list[float] = field(default_factory=list)  # log P(wrong | paraphrase)
    leaks: int | None = None                  # sampled continuations that start with the answer (None: not sampled)
    n_samples: int = 0

    @property
    def truth_ratio(self) -> float | None:
        return None if self.logp is None or self.logp_wrong is None else truth_ratio(self.logp, self.logp_wrong)

    @property
    def below_wrong(self) -> bool | None:
        return None if self.logp is None or self.logp_wrong is None else self.logp < self.logp_wrong

    @property
    def para_truth_ratio(self) -> float | None:
        return _mean([truth_ratio(t, w) for t, w in zip(self.para_logp, self.para_logp_wrong)])

    @property
    def para_below_wrong(self) -> float | None:
        return _mean([float(t < w) for t, w in zip(self.para_logp, self.para_logp_wrong)])


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
            **_probe_aggregates(self.facts),
        }
        if self.baseline is not None:
            kept = [float(r.correct) for r, b in zip(self.retain, self.baseline.retain) if b.correct and not r.held_out]
            gone = [float(not f.known) for f, b in zip(self.facts, self.baseline.facts) if b.known]
            agg["retain_kept"], agg["forgotten"] = _mean(kept), _mean(gone)
        held = sum(r.held_out for r in self.retain)
        agg.update(n_facts=float(len(self.facts)), n_retain=float(len(self.retain) - held), n_heldout=float(held),
                   n_texts=float(len(self.texts)), n_ratio=float(sum(f.logp_wrong is not None for f in self.facts)),
                   n_paraphrased=float(sum(bool(f.para_logp) for f in self.facts)),
                   n_sampled=float(sum(f.leaks is not None for f in self.facts)))
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


def _probe_aggregates(facts: Sequence[FactResult]) -> dict[str, float | None]:
    ratio = [f for f in facts if f.truth_ratio is not None]
    para = [f for f in facts if f.para_logp]
    return {"truth_ratio": _mean([f.truth_ratio for f in ratio]),  # type: ignore[misc]
            "below_wrong": _mean([float(bool(f.below_wrong)) for f in ratio]),
            "para_truth_ratio": _mean([f.para_truth_ratio for f in para]),  # type: ignore[misc]
            "para_below_wrong": _mean([f.para_below_wrong for f in para]),  # type: ignore[misc]
            "sampled_leak": _mean([float(f.leaks > 0) for f in facts if f.leaks is not None])}


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
                    baseline: ForgetReport | None = None, progress: str | None = None,
                    sampling: LeakSampling | None = LeakSampling()) -> ForgetReport:
    """Score the facts and texts to forget and the retain items on `runner`.

    `baseline`: the unedited model's report on the same requests and retain items (enables
    retain_kept and forgotten). `progress`: a label for a progress bar (none by default). `sampling`: how the
    facts' prompts are sampled for sampled_leak (None: not sampled); each sample is at most the answer's token
    count + GEN_EXTRA_TOKENS tokens long, as a generated answer of the edit metrics.
    """
    for i, r in enumerate(requests):
        if not isinstance(r, ForgetRequest):
            raise QeditError(f"request {i} is a {type(r).__name__}, not a ForgetRequest; "
                             "read the facts with qedit.unlearn.requests.load_forget_requests")
    facts = [r for r in requests if r.is_fact]
    wrongs = wrong_answers(facts)
    pairs: list[tuple[str, str]] = []
    for r, (wrong, _) in zip(facts, wrongs):     # a prompt's pairs one after the other: llama.cpp runs it once
        pairs += [(r.prompt, r.answer)] + ([(r.prompt, wrong)] if wrong is not None else [])  # type: ignore[list-item]
        if wrong is not None:
            pairs += [(p, a) for p in r.paraphrase_prompts for a in (r.answer, wrong)]  # type: ignore[misc]
    pairs += [(x.prompt, x.answer) for x in retain]
    scores = iter(score_all(runner, pairs, progress) if pairs else [])
    fact_rows, budgets = [], []
    for r, (wrong, source) in zip(facts, wrongs):
        s = next(scores)
        budgets.append(len(s.target_ids) + GEN_EXTRA_TOKENS)
        p_first, known = _first(s)
        row = FactResult(r.case_id, r.name, r.prompt, r.answer, math.exp(sum(s.logprobs)), p_first,  # type: ignore[arg-type]
                         bool(known), logp=sum(s.logprobs))
        if wrong is not None:
            row.wrong, row.wrong_source, row.logp_wrong = wrong, source, sum(next(scores).logprobs)
            for _ in r.paraphrase_prompts:
                row.para_logp.append(sum(next(scores).logprobs))
                row.para_logp_wrong.append(sum(next(scores).logprobs))
        fact_rows.append(row)
    if sampling is not None and fact_rows:
        said = sample_all(runner, [(f.prompt, n) for f, n in zip(fact_rows, budgets)], sampling, progress)
        for row, texts in zip(fact_rows, said):
            row.leaks, row.n_samples = sum(starts_with_answer(t, row.answer) for t in texts), len(texts)
    retain_rows = []
    for item, s in zip(retain, scores):
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


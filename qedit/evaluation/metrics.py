"""Edit metrics per request, on any runner.

- efficacy: mean log P(target_new) > mean log P(ground_truth) on the prompt (CounterFact's test);
  efficacy_top1: the runner's top-1 tokens spell target_new exactly (teacher forced).
- generalization / generalization_top1: the same on the rephrased prompts (averaged).
- locality: share of the locality answer's tokens whose top-1 is unchanged against the unedited
  model (EasyEdit's measure); locality_top1: all of them unchanged. Needs a baseline report of the
  unedited model; without one, locality is not reported.
- margin: mean log P(target_new) - mean log P(ground_truth) on the prompt, in nats.

Generated answers (what a user reads; "The Mirage of Model Editing", arXiv 2502.11177), from the runner's
greedy continuation of each prompt, at most the answer's token count + GEN_EXTRA_TOKENS tokens long:
- efficacy_gen: the continuation of the prompt starts with target_new (`answers_with`).
- generalization_gen: the same on the rephrased prompts (averaged).
- locality_gen: share of the locality prompts whose continuation is the unedited model's, exactly (needs a
  baseline report that carries its continuations).

Chat (`evaluate(..., chat=True)`): each fact asked as a one-turn chat, its chat_prompt (or else its prompt) the
user turn, formatted with the model's chat template as the runner's runtime applies it (`Runner.chat`):
- chat_efficacy_gen: the assistant's greedy reply starts with target_new, by the same rule and within the same
  token budget as efficacy_gen (a reply that first restates the question does not count).
- chat_generalization_gen: the same on the fact's chat_rephrase_prompts (averaged; None without them).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qedit.core.facts import EditRequest
from qedit.core.files import atomic_path
from qedit.runtimes.torch_runner import GEN_EXTRA_TOKENS, Runner, TokenScore

_PROGRESS_CHUNK = 32  # prompts scored per progress-bar step
METRICS = ("efficacy", "efficacy_top1", "efficacy_gen", "generalization", "generalization_top1", "generalization_gen",
           "locality", "locality_top1", "locality_gen", "chat_efficacy_gen", "chat_generalization_gen")
_ARTICLE = re.compile(r"(?:a|an|the)\s+")


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
    efficacy_gen: float | None = None
    generalization_gen: float | None = None
    locality_gen: float | None = None
    continuation: str | None = None                                   # the greedy continuation of the prompt
    rephrase_continuations: list[str] = field(default_factory=list)
    locality_continuations: list[str] = field(default_factory=list)
    chat_efficacy_gen: float | None = None
    chat_generalization_gen: float | None = None
    chat_reply: str | None = None                                     # the assistant's reply to the chat prompt
    chat_rephrase_replies: list[str] = field(default_factory=list)

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


def answers_with(text: str, target: str) -> bool:
    """Whether generated `text` starts with `target`: leading whitespace and case ignored, a leading article
    (a, an, the) allowed, and the target not the start of a longer word ("Japanese" does not answer "Japan")."""
    text, want = text.lstrip().casefold(), target.strip().casefold()
    article = _ARTICLE.match(text)
    for rest in (text, text[article.end():] if article else None):
        if rest is not None and rest.startswith(want):
            after = rest[len(want):len(want) + 1]
            if not (after.isalnum() and want[-1:].isalnum()):
                return True
    return False


def _answered(texts: Sequence[str], target: str) -> float | None:
    """Share of `texts` that answer with `target` (None for none)."""
    return _mean([float(answers_with(t, target)) for t in texts])


def score_all(runner: Runner, pairs: list[tuple[str, str]], progress: str | None,
              generate: Sequence[bool] | None = None) -> list[TokenScore]:
    """runner.score over all pairs (with `generate`: and the continuations asked for); with a `progress`
    label, in chunks under a progress bar."""
    if progress is None:
        return runner.score(pairs, generate) if generate is not None else runner.score(pairs)
    from tqdm.auto import tqdm

    out: list[TokenScore] = []
    with tqdm(total=len(pairs), desc=progress, unit="prompt", leave=False) as bar:
        for lo in range(0, len(pairs), _PROGRESS_CHUNK):
            chunk = pairs[lo:lo + _PROGRESS_CHUNK]
            asked = None if generate is None else generate[lo:lo + _PROGRESS_CHUNK]
            out += runner.score(chunk, asked) if asked is not None else runner.score(chunk)
            bar.update(len(chunk))
    return out


def chat_all(runner: Runner, items: list[tuple[str, int]], progress: str | None) -> list[str]:
    """runner.chat over all (question, max_tokens) items; with a `progress` label, in chunks under a progress bar."""
    if progress is None:
        return runner.chat(items)
    from tqdm.auto import tqdm

    out: list[str] = []
    with tqdm(total=len(items), desc=f"{progress} chat", unit="chat", leave=False) as bar:
        for lo in range(0, len(items), _PROGRESS_CHUNK):
            out += runner.chat(items[lo:lo + _PROGRESS_CHUNK])
            bar.update(len(items[lo:lo + _PROGRESS_CHUNK]))
    return out


def evaluate(runner: Runner, requests: Sequence[EditRequest], baseline: EvalReport | None = None,
             progress: str | None = None, generate: bool = True, chat: bool = False) -> EvalReport:
    """Score every request on `runner`; `baseline` (the unedited model's report) enables locality.
    `progress`: a label for a progress bar over the scored prompts (none by default). `generate`: also the
    generated-answer metrics (a greedy continuation of every prompt; False skips them). `chat`: also the chat
    metrics (each fact asked as a one-turn chat; a QeditError when the model has no chat template)."""
    if baseline is not None and len(baseline.cases) != len(requests):
        raise ValueError(f"baseline report has {len(baseline.cases)} cases, not {len(requests)}: "
                         "it must score the same requests in the same order")
    if chat:
        runner.chat([])             # a model without a chat template fails here, before anything is scored
    pairs: list[tuple[str, str]] = []
    flags: list[bool] = []          # which pairs' prompts are continued: each prompt once, with its own answer

    def add(prompt: str, answer: str, continued: bool) -> None:
        pairs.append((prompt, answer))
        flags.append(continued)

    for r in requests:
        add(r.prompt, r.target_new, True)
        if r.ground_truth is not None:
            add(r.prompt, r.ground_truth, False)
        for rp in r.rephrase_prompts:
            add(rp, r.target_new, True)
            if r.ground_truth is not None:
                add(rp, r.ground_truth, False)
        for lp, la in zip(r.locality_prompts, r.locality_answers):
            add(lp, la, True)
    scores = iter(score_all(runner, pairs, progress, flags if generate else None))
    cases, budgets = [], []
    for i, r in enumerate(requests):
        new: TokenScore = next(scores)
        budgets.append(len(new.target_ids) + GEN_EXTRA_TOKENS)
        true = next(scores) if r.ground_truth is not None else None
        gen, gen_top1, rephrased = [], [], []
        for _ in r.rephrase_prompts:
            g_new = next(scores)
            g_true = next(scores) if r.ground_truth is not None else None
            if g_true is not None:
                gen.append(float(g_new.mean_logprob > g_true.mean_logprob))
            gen_top1.append(float(g_new.top1))
            rephrased += [g_new.continuation] if g_new.continuation is not None else []
        loc_scores = [next(scores) for _ in r.locality_prompts]
        argmax = [list(s.argmax_ids) for s in loc_scores]
        loc = loc_top1 = loc_gen = None
        if baseline is not None and loc_scores:
            ref = baseline.cases[i].locality_argmax
            per_tok = [float(a == b) for cur, base in zip(argmax, ref) for a, b in zip(cur, base)]
            loc = _mean(per_tok)
            loc_top1 = _mean([float(cur == base) for cur, base in zip(argmax, ref)])
        located = [s.continuation for s in loc_scores if s.continuation is not None]
        if baseline is not None and located and len(located) == len(baseline.cases[i].locality_continuations):
            loc_gen = _mean([float(a == b) for a, b in zip(located, baseline.cases[i].locality_continuations)])
        said = [new.continuation] if new.continuation is not None else []
        cases.append(CaseResult(
            case_id=r.case_id, subject=r.subject, target_new=r.target_new, ground_truth=r.ground_truth,
            logp_new=new.mean_logprob, logp_true=None if true is None else true.mean_logprob,
            efficacy=None if true is None else float(new.mean_logprob > true.mean_logprob),
            efficacy_top1=float(new.top1), generalization=_mean(gen), generalization_top1=_mean(gen_top1),
            locality=loc, locality_top1=loc_top1, locality_argmax=argmax,
            efficacy_gen=_answered(said, r.target_new), generalization_gen=_answered(rephrased, r.target_new),
            locality_gen=loc_gen, continuation=new.continuation, rephrase_continuations=rephrased,
            locality_continuations=located,
        ))
    if chat:
        add_chat(runner, requests, cases, budgets, progress)
    return EvalReport(runner.describe(), cases)


def add_chat(runner: Runner, requests: Sequence[EditRequest], cases: Sequence[CaseResult], budgets: Sequence[int],
             progress: str | None) -> None:
    """Fill each case's chat replies and chat metrics: its chat question and chat paraphrases asked as one-turn
    chats, each reply at most `budgets[i]` tokens (the answer's token count + GEN_EXTRA_TOKENS, as efficacy_gen)."""
    items = [(q, n) for r, n in zip(requests, budgets) for q in (r.chat_question, *r.chat_rephrase_prompts)]
    said = iter(chat_all(runner, items, progress))
    for r, case in zip(requests, cases):
        case.chat_reply = next(said)
        case.chat_rephrase_replies = [next(said) for _ in r.chat_rephrase_prompts]
        case.chat_efficacy_gen = float(answers_with(case.chat_reply, r.target_new))
        case.chat_generalization_gen = _answered(case.chat_rephrase_replies, r.target_new)


def format_summary(label: str, report: EvalReport) -> str:
    """The teacher-forced metrics on one line, the generated-answer ones on the next (when measured)."""
    agg = report.aggregate()
    parts = [f"{m}={agg[m]:.3f}" for m in METRICS + ("margin",) if agg.get(m) is not None and not m.endswith("_gen")]
    said = [f"{m}={agg[m]:.3f}" for m in METRICS if agg.get(m) is not None and m.endswith("_gen")]
    return f"{label}: " + "  ".join(parts) + ("\n" + " " * (len(label) + 2) + "  ".join(said) if said else "")

"""What the ladder measures on each model: edits (efficacy, generalization, locality) or unlearning
(forget score, recovery, retain accuracy). Both score through the Runner protocol only, so every
runtime (torch, llama.cpp, GPTQ, bitsandbytes) is measured the same way."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest
from qedit.evaluation.forget import ForgetReport, evaluate_forget
from qedit.evaluation.forget_probes import LeakSampling
from qedit.evaluation.metrics import EvalReport, evaluate
from qedit.runtimes.torch_runner import Runner
from qedit.unlearn.requests import ForgetRequest, RetainItem


class Scoring(Protocol):
    kind: str                                     # "edit" or "forget"

    def evaluate(self, runner: Runner, baseline: Any, label: str | None) -> Any: ...

    def report_from_json(self, data: dict[str, Any]) -> Any: ...

    def cache_parts(self) -> list[Any]: ...


@dataclass(frozen=True)
class EditScoring:
    requests: tuple[EditRequest, ...]
    kind: str = "edit"
    chat: bool = False                            # also the chat metrics (each fact asked as a one-turn chat)

    def evaluate(self, runner: Runner, baseline: EvalReport | None, label: str | None) -> EvalReport:
        return evaluate(runner, self.requests, baseline=baseline, progress=label, chat=self.chat)

    def report_from_json(self, data: dict[str, Any]) -> EvalReport:
        return EvalReport.from_json(data)

    def cache_parts(self) -> list[Any]:
        return ["with continuations"] + (["chat"] if self.chat else []) + [r.to_json() for r in self.requests]


@dataclass(frozen=True)
class ForgetScoring:
    requests: tuple[ForgetRequest, ...]
    retain: tuple[RetainItem, ...]
    kind: str = "forget"
    sampling: LeakSampling | None = LeakSampling()    # sampled_leak's samples (None: not sampled)

    def evaluate(self, runner: Runner, baseline: ForgetReport | None, label: str | None) -> ForgetReport:
        return evaluate_forget(runner, self.requests, self.retain, baseline=baseline, progress=label,
                               sampling=self.sampling)

    def report_from_json(self, data: dict[str, Any]) -> ForgetReport:
        return ForgetReport.from_json(data)

    def cache_parts(self) -> list[Any]:
        sampled = None if self.sampling is None else [self.sampling.n, self.sampling.temperature, self.sampling.seed]
        return ["forget", "wrong answers, paraphrases", ["sampled", sampled], [r.to_json() for r in self.requests],
                [x.to_json() for x in self.retain]]


def scoring_for(requests: Sequence[Any], retain: Sequence[RetainItem] | None = None, chat: bool = False) -> Scoring:
    """EditScoring for EditRequests (`chat`: with the chat metrics), ForgetScoring for ForgetRequests (with
    `retain`); mixed lists are refused."""
    if requests and all(isinstance(r, ForgetRequest) for r in requests):
        if chat:
            raise QeditError("--chat measures edits; unlearning has no chat metrics")
        return ForgetScoring(tuple(requests), tuple(retain or ()))
    if all(isinstance(r, EditRequest) for r in requests):
        if retain:
            raise QeditError("a retain set applies to unlearning (ForgetRequests), not to edits")
        return EditScoring(tuple(requests), chat=chat)
    raise QeditError("survival: the requests mix edits and facts to forget; check them in separate runs")

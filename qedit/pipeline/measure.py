"""What `--eval` measures after a job: the edit metrics in torch before and after (edits), or the forget
score at full precision and on the written artifact in its runtime, each against the unedited model there
(unlearning), with the `--require` gates checked on them."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qedit.core.delta import applied
from qedit.core.model import LoadedModel
from qedit.edit.compute import EditOutcome
from qedit.evaluation.forget import ForgetReport, evaluate_forget, format_forget_summary
from qedit.evaluation.forget_compare import forget_metrics, recovered_facts
from qedit.evaluation.gate import GateResult, Requirement, check_requirements
from qedit.evaluation.metrics import EvalReport, evaluate, format_summary
from qedit.pipeline.plan import OutputKind, Plan
from qedit.runtimes.gptq import gptq_runner
from qedit.runtimes.llama import LlamaCppRunner
from qedit.runtimes.torch_runner import Runner, TorchRunner
from qedit.unlearn.requests import RetainItem

log = logging.getLogger(__name__)

FORGET_RUNGS = ("fp32", "output")     # what a forget --require can name


@dataclass
class EditMeasurement:
    """Edit metrics in torch on the model the edit was computed on, before and after."""

    before: EvalReport
    after: EvalReport

    def lines(self) -> list[str]:
        return [format_summary("before", self.before), format_summary("after ", self.after)]


@dataclass
class ForgetMeasurement:
    """The forget score before, after (fp32) and on the written output, the gates, and facts brought back."""

    before: ForgetReport
    after: ForgetReport
    output: ForgetReport | None
    output_runner: str | None
    metrics: dict[str, dict[str, float | None] | None]
    gates: list[GateResult] = field(default_factory=list)

    @property
    def brought_back(self) -> list[str]:
        return recovered_facts(self.after, self.output) if self.output is not None else []

    @property
    def failed(self) -> bool:
        return any(not g.passed for g in self.gates)

    def lines(self) -> list[str]:
        out = [format_forget_summary("unedited (fp32)", self.before), format_forget_summary("forgotten (fp32)", self.after)]
        if self.output is not None:
            out.append(format_forget_summary(f"output ({self.output_runner})", self.output))
        if self.brought_back:
            out.append(f"facts the written file brought back ({len(self.brought_back)}): " + "; ".join(self.brought_back))
        for g in self.gates:
            out.append(f"require {g.requirement}: {'PASS' if g.passed else 'FAIL'} (measured "
                       f"{'-' if g.actual is None else f'{g.actual:.3f}'}){' ' + g.reason if g.reason else ''}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"unedited": self.before.to_json(), "fp32": self.after.to_json(),
                "output": None if self.output is None else self.output.to_json(), "metrics": self.metrics,
                "gates": [{"requirement": str(g.requirement), "actual": g.actual, "passed": g.passed,
                           "reason": g.reason} for g in self.gates]}


def measure_edit(loaded: LoadedModel, outcome: EditOutcome, before: EvalReport,
                 requests: Sequence[Any] | None = None, chat: bool = False) -> EditMeasurement:
    """`requests` (default: the outcome's) scored in torch with the edit applied, against `before`; `chat`: with the
    chat metrics (the facts as the user gave them, where a --chat edit's own requests are their chat texts)."""
    with applied(loaded.model, outcome.deltas):
        after = evaluate(TorchRunner(loaded), outcome.requests if requests is None else requests, baseline=before,
                         chat=chat)
    return EditMeasurement(before, after)


def measure_forget(plan: Plan, loaded: LoadedModel, outcome: EditOutcome, retain: Sequence[RetainItem],
                   before: ForgetReport, requirements: Sequence[Requirement], base: Path | None) -> ForgetMeasurement:
    """Score the forgetting in torch and on the written artifact, and check the gates."""
    requests = outcome.requests
    with applied(loaded.model, outcome.deltas):
        after = evaluate_forget(TorchRunner(loaded), requests, retain, baseline=before, progress="fp32")
    metrics: dict[str, dict[str, float | None] | None] = {"fp32": forget_metrics(after, before, None), "output": None}
    runners = _output_runners(plan, base)
    output, name = None, None
    if runners is not None:
        out_runner, base_runner = runners
        base = evaluate_forget(base_runner, requests, retain, progress="unedited output runtime") \
            if base_runner is not None else before
        output = evaluate_forget(out_runner, requests, retain, baseline=base, progress="output")
        metrics["output"] = forget_metrics(output, base, after)
        name = out_runner.name
    else:
        metrics["output"] = metrics["fp32"]
    gates = check_requirements(list(requirements), metrics)
    return ForgetMeasurement(before, after, output, name, metrics, gates)


def _output_runners(plan: Plan, base: Path | None) -> tuple[Runner, Runner | None] | None:
    """(runner of the written artifact, runner of the unedited model in the same runtime), or None when the
    output is a full-precision directory (the fp32 measurement covers it). `base`: the unedited model at the
    output's level that the output patches, when the plan writes one."""
    job, kind = plan.job, plan.kind
    out = job.output.path
    if kind is OutputKind.GGUF_LORA:
        return LlamaCppRunner(job.model, lora=out), LlamaCppRunner(job.model)
    if kind in (OutputKind.GGUF_PATCH, OutputKind.GGUF_EXPORT):
        if kind is OutputKind.GGUF_EXPORT and base is None:
            log.warning("the unedited baseline of an export is the source at full precision in torch")
            return LlamaCppRunner(out), None
        return LlamaCppRunner(out), LlamaCppRunner(base or job.model)
    if kind is OutputKind.GPTQ_PATCH:
        return gptq_runner(out), gptq_runner(job.model)
    if kind is OutputKind.GPTQ_WRITE:
        return gptq_runner(out), (gptq_runner(base) if base is not None else None)
    return None

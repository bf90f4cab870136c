"""`--require RUNG:METRIC>=VALUE` gates: a pipeline fails when an edit falls short at a rung."""
from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from qedit.core.errors import QeditError

# Metrics a gate can name: the rung's aggregate metrics, their ratio to full precision ("_kept"),
# the fluency drift (perplexity of the edited artifact over the baseline at the same rung), and
# for unlearning the forget score, recovery and retain metrics of `metrics_forget`.
GATE_METRICS = (
    "efficacy", "efficacy_top1", "generalization", "generalization_top1", "locality", "locality_top1",
    "margin", "efficacy_kept", "generalization_kept", "margin_kept", "ppl_ratio", "died",
    # generated answers (greedy continuations; qedit.evaluation.metrics) and teacher-forced minus generated efficacy
    "efficacy_gen", "generalization_gen", "locality_gen", "efficacy_gen_gap",
    # the facts asked as one-turn chats with the model's template (--chat)
    "chat_efficacy_gen", "chat_generalization_gen",
    # unlearning (qedit forget / survival of ForgetRequests)
    "forget_prob", "forget_prob_first", "recovery_rate", "recovery_change", "recovered", "forgotten", "retain_acc",
    "retain_acc_change", "retain_kept", "heldout_acc", "heldout_acc_change",
    # unlearning beyond the rank (qedit.evaluation.forget_probes), and their change against full precision
    "truth_ratio", "below_wrong", "para_truth_ratio", "para_below_wrong", "sampled_leak", "truth_ratio_change",
    "below_wrong_change", "para_below_wrong_change", "sampled_leak_change",
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}
_RE = re.compile(r"^\s*([^:\s]+)\s*:\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Requirement:
    rung: str
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.rung}:{self.metric}{self.op}{self.value:g}"

    def holds(self, actual: float | None) -> bool:
        return actual is not None and _OPS[self.op](actual, self.value)


@dataclass(frozen=True)
class GateResult:
    requirement: Requirement
    actual: float | None
    passed: bool
    reason: str = ""


def parse_requirement(text: str, rung_names: Sequence[str]) -> Requirement:
    """'Q4_K_M:efficacy>=0.95' -> Requirement; the rung must be one of the ladder's."""
    m = _RE.match(text)
    if m is None:
        raise QeditError(f"--require {text!r}: expected RUNG:METRIC>=VALUE, e.g. Q4_K_M:efficacy>=0.95")
    metric, op, value = m.group(2).lower(), m.group(3), float(m.group(4))
    rung = {n.upper(): n for n in rung_names}.get(m.group(1).upper())  # names compare case-insensitively
    if rung is None:
        raise QeditError(f"--require {text!r}: rung {m.group(1)} is not in the ladder ({', '.join(rung_names)}); "
                         "add it to --ladder")
    if metric not in GATE_METRICS:
        raise QeditError(f"--require {text!r}: unknown metric {metric!r}; use one of {', '.join(GATE_METRICS)}")
    return Requirement(rung, metric, op, value)


def check_requirements(requirements: Sequence[Requirement],
                       rung_values: Mapping[str, Mapping[str, float | None] | None]) -> list[GateResult]:
    """Evaluate each requirement on its rung's metrics (None for a rung that was skipped)."""
    results = []
    for req in requirements:
        values = rung_values.get(req.rung)
        if values is None:
            results.append(GateResult(req, None, False, f"rung {req.rung} was not built"))
            continue
        actual = values.get(req.metric)
        if actual is None:
            results.append(GateResult(req, None, False, f"{req.metric} is not measured at {req.rung}"))
            continue
        results.append(GateResult(req, actual, req.holds(actual)))
    return results

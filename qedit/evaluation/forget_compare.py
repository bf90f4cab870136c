"""Unlearning compared across runtimes: per rung or output, the forget score (probability of the erased answers), the
recovery rate (share of facts whose answer is top-1 again), retain accuracy against the unedited
model at the same rung (and on held-out retain items, which the method never saw), and, by name, every
fact that quantization brought back."""
from __future__ import annotations

from typing import Any

from qedit.evaluation.forget import ForgetReport

FORGET_RUNG_METRICS = ("forget_prob", "forget_prob_first", "recovery_rate", "retain_acc", "retain_kept",
                       "forgotten", "baseline_retain_acc", "retain_acc_change", "recovery_change", "recovered",
                       "heldout_acc", "baseline_heldout_acc", "heldout_acc_change")


def forget_metrics(edited: ForgetReport, baseline: ForgetReport, reference: ForgetReport | None) -> dict[str, float | None]:
    """Aggregates of `edited`; retain metrics against `baseline` (the unedited model in the same runtime);
    with the full-precision `reference` (edited, torch): recovery_change (rung minus fp32, in points of
    the rate) and recovered (facts forgotten at fp32 that are known again here)."""
    rebased = ForgetReport(edited.runner, edited.facts, edited.retain, edited.texts, baseline)
    agg = rebased.aggregate()
    out: dict[str, float | None] = {m: agg.get(m) for m in FORGET_RUNG_METRICS[:6]}
    base = baseline.aggregate()
    for key in ("retain_acc", "heldout_acc"):
        out[key] = agg.get(key)
        out[f"baseline_{key}"] = base.get(key)
        out[f"{key}_change"] = None if out[key] is None or base.get(key) is None \
            else out[key] - base[key]  # type: ignore[operator]
    out["recovery_change"] = out["recovered"] = None
    if reference is not None:
        ref = reference.aggregate()
        if out["recovery_rate"] is not None and ref.get("recovery_rate") is not None:
            out["recovery_change"] = out["recovery_rate"] - ref["recovery_rate"]  # type: ignore[operator]
        out["recovered"] = float(len(recovered_facts(reference, edited)))
    return out


def recovered_facts(reference: ForgetReport, edited: ForgetReport) -> list[str]:
    """Names of the facts forgotten at full precision whose answer is top-1 again in `edited`."""
    return [e.name for r, e in zip(reference.facts, edited.facts) if not r.known and e.known]


def forget_case_rows(requests: list[Any], reference: ForgetReport, rungs: list[tuple[str, ForgetReport]]) -> list[dict[str, Any]]:
    """Per fact: full-precision probability and known flag, and per rung the same plus `recovered`."""
    rows = []
    for i, ref in enumerate(reference.facts):
        per_rung = {name: {"prob": rep.facts[i].prob, "prob_first": rep.facts[i].prob_first,
                           "known": rep.facts[i].known, "recovered": (not ref.known) and rep.facts[i].known}
                    for name, rep in rungs}
        rows.append({"case_id": ref.case_id, "name": ref.name, "prompt": ref.prompt, "answer": ref.answer,
                     "fp32": {"prob": ref.prob, "prob_first": ref.prob_first, "known": ref.known},
                     "rungs": per_rung})
    return rows

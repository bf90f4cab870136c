"""Survival metrics derived from a `SurvivalResult`: per rung (with the ratios to full precision)
and per case (which edits died at which rung, and how much their margin shrank). Unlearning runs
get the forget metrics of `metrics_forget` instead."""
from __future__ import annotations

from typing import Any

from qedit.evaluation.forget import ForgetReport
from qedit.evaluation.forget_compare import forget_case_rows, forget_metrics, recovered_facts
from qedit.evaluation.metrics import METRICS, CaseResult
from qedit.survival.measure import FULL_PRECISION, Measured, RungResult, SurvivalResult

SCHEMA = "qedit.survival/2"
_KEPT = ("efficacy", "generalization")


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or abs(den) < 1e-12:
        return None
    return num / den


def measured_metrics(edited: Measured, baseline: Measured, reference: Measured | None,
                     reference_baseline: Measured | None) -> dict[str, float | None]:
    """Aggregates of `edited` (locality is against `baseline`), its fluency drift, and, with a
    reference, each metric's share kept against full precision. margin_kept is the share of the
    edit's margin change (edited minus baseline) that is left; efficacy_gen_gap is teacher-forced efficacy
    minus generated efficacy (what the probabilities claim and the generated answers do not show).
    Unlearning: `forget_metrics`."""
    if isinstance(edited.report, ForgetReport):
        out = forget_metrics(edited.report, baseline.report, None if reference is None else reference.report)  # type: ignore[arg-type]
        out.update(perplexity=edited.perplexity, baseline_perplexity=baseline.perplexity,
                   ppl_ratio=edited.perplexity / baseline.perplexity)
        return out
    agg = edited.report.aggregate()
    out: dict[str, float | None] = {m: agg.get(m) for m in METRICS + ("margin",)}
    base_margin = baseline.report.aggregate().get("margin")
    out["margin_change"] = None if out["margin"] is None or base_margin is None else out["margin"] - base_margin
    out["efficacy_gen_gap"] = None if out["efficacy"] is None or out["efficacy_gen"] is None \
        else out["efficacy"] - out["efficacy_gen"]
    out["perplexity"] = edited.perplexity
    out["baseline_perplexity"] = baseline.perplexity
    out["ppl_ratio"] = edited.perplexity / baseline.perplexity
    if reference is not None and reference_baseline is not None:
        ref = measured_metrics(reference, reference_baseline, None, None)
        for m in _KEPT:
            out[f"{m}_kept"] = _ratio(out[m], ref[m])
        out["margin_kept"] = _ratio(out["margin_change"], ref["margin_change"])
    return out


def rung_metrics(result: SurvivalResult, rung: RungResult) -> dict[str, float | None] | None:
    """A rung's metrics, or None when it was skipped."""
    if rung.status != "ok" or rung.edited is None or rung.baseline is None:
        return None
    out = measured_metrics(rung.edited, rung.baseline, result.reference, result.reference_baseline)
    out["bits_per_weight"] = rung.bits_per_weight
    if result.mode == "forget":
        return out
    ref_cases = result.reference.report.cases
    out["died"] = float(sum(1 for r, c in zip(ref_cases, rung.edited.report.cases) if r.efficacy and not c.efficacy))
    return out


def full_precision_metrics(result: SurvivalResult) -> dict[str, float | None]:
    return measured_metrics(result.reference, result.reference_baseline, None, None)


def all_rung_metrics(result: SurvivalResult) -> dict[str, dict[str, float | None] | None]:
    """Rung name -> metrics (None for skipped rungs), with full precision first."""
    out: dict[str, dict[str, float | None] | None] = {FULL_PRECISION: full_precision_metrics(result)}
    out.update({r.rung.name: rung_metrics(result, r) for r in result.rungs})
    return out


def case_rows(result: SurvivalResult) -> list[dict[str, Any]]:
    """Per case: its full-precision efficacy and margin, and per rung the same plus the shrink
    (unlearning: per fact, probability and known flag, and whether the rung brought it back)."""
    if result.mode == "forget":
        rungs = [(r.rung.name, r.edited.report) for r in result.rungs if r.status == "ok" and r.edited is not None]
        return forget_case_rows(result.requests, result.reference.report, rungs)  # type: ignore[arg-type]
    rows = []
    for i, req in enumerate(result.requests):
        ref = result.reference.report.cases[i]
        per_rung: dict[str, dict[str, Any]] = {}
        for r in result.rungs:
            if r.status != "ok" or r.edited is None:
                continue
            c = r.edited.report.cases[i]
            shrink = None if c.margin is None or ref.margin is None else ref.margin - c.margin
            per_rung[r.rung.name] = dict(_case_cells(c), margin_shrink=shrink,
                                         died=bool(ref.efficacy) and not bool(c.efficacy))
        rows.append({
            "case_id": req.case_id, "subject": req.subject, "prompt": req.prompt,
            "target_new": req.target_new, "ground_truth": req.ground_truth,
            FULL_PRECISION: _case_cells(ref),
            "rungs": per_rung,
        })
    return rows


def _case_cells(c: CaseResult) -> dict[str, Any]:
    """One case's metrics at one rung, teacher-forced and generated, and what the model answered."""
    return {"efficacy": c.efficacy, "efficacy_top1": c.efficacy_top1, "efficacy_gen": c.efficacy_gen,
            "generalization": c.generalization, "generalization_gen": c.generalization_gen, "locality": c.locality,
            "locality_gen": c.locality_gen, "margin": c.margin, "continuation": c.continuation,
            "chat_efficacy_gen": c.chat_efficacy_gen, "chat_generalization_gen": c.chat_generalization_gen,
            "chat_reply": c.chat_reply}


def to_json(result: SurvivalResult, gates: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The machine-readable report (schema `qedit.survival/2`)."""
    metrics = all_rung_metrics(result)
    rungs = []
    for r in result.rungs:
        rungs.append({
            "name": r.rung.name, "kind": r.rung.kind.value, "spec": r.rung.spec, "runtime": r.rung.runtime,
            "status": r.status, "reason": r.reason, "encoding": r.encoding, "computed_on": r.computed_on,
            "delta_norm": r.delta_norm, "verify_scale": r.verify_scale, "bits_per_weight": r.bits_per_weight,
            "size_bytes": r.size_bytes, "artifacts": r.artifacts, "built": r.built,
            "seconds": round(r.seconds, 2), "runner": None if r.edited is None else r.edited.report.runner,
            "metrics": metrics[r.rung.name],
            "recovered": [] if result.mode != "forget" or r.edited is None
            else recovered_facts(result.reference.report, r.edited.report),  # type: ignore[arg-type]
        })
    return {
        "schema": SCHEMA,
        "source": str(result.source), "source_sha256": result.source_sha256, "method": result.method,
        "n_cases": len(result.requests), "delta_norm": result.delta_norm, "versions": result.versions,
        "encoding": result.encoding, "mode": result.mode, "chat": result.chat,
        "full_precision": {"runtime": "torch", "runner": result.reference.report.runner,
                           "metrics": metrics[FULL_PRECISION]},
        "rungs": rungs,
        "cases": case_rows(result),
        "gates": gates or [],
    }

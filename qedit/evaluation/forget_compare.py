"""Unlearning compared across runtimes: per rung or output, the forget score (probability of the erased answers), the
recovery rate (share of facts whose answer is top-1 again), retain accuracy against the unedited
model at the same rung (and on held-out retain items, which the method never saw), and, by name, every
fact that quantization brought back; beside them the measures beyond the rank (`qedit.evaluation.forget_probes`:
truth ratio, share below the wrong answer, on the prompt and its paraphrases, and the sampled leak), each also as
its change against full precision."""
from __future__ import annotations

from typing import Any

from qedit.evaluation.forget import FactResult, ForgetReport

_OWN = ("forget_prob", "forget_prob_first", "recovery_rate", "retain_acc", "retain_kept", "forgotten",
        "truth_ratio", "below_wrong", "para_truth_ratio", "para_below_wrong", "sampled_leak")
_AGAINST_FP32 = ("truth_ratio", "below_wrong", "para_below_wrong", "sampled_leak")   # "<metric>_change": rung - fp32
FORGET_RUNG_METRICS = _OWN + ("baseline_retain_acc", "retain_acc_change", "recovery_change", "recovered",
                              "heldout_acc", "baseline_heldout_acc", "heldout_acc_change") \
    + tuple(f"{m}_change" for m in _AGAINST_FP32)


def forget_metrics(edited: ForgetReport, baseline: ForgetReport, reference: ForgetReport | None) -> dict[str, float | None]:
    """Aggregates of `edited`; retain metrics against `baseline` (the unedited model in the same runtime);
    with the full-precision `reference` (edited, torch): recovery_change (rung minus fp32, in points of
    the rate), recovered (facts forgotten at fp32 that are known again here) and, for truth_ratio, below_wrong,
    para_below_wrong and sampled_leak, `<metric>_change` (rung minus fp32)."""
    rebased = ForgetReport(edited.runner, edited.facts, edited.retain, edited.texts, baseline)
    agg = rebased.aggregate()
    out: dict[str, float | None] = {m: agg.get(m) for m in _OWN}
    base = baseline.aggregate()
    for key in ("retain_acc", "heldout_acc"):
        out[key] = agg.get(key)
        out[f"baseline_{key}"] = base.get(key)
        out[f"{key}_change"] = None if out[key] is None or base.get(key) is None \
            else out[key] - base[key]  # type: ignore[operator]
    out["recovery_change"] = out["recovered"] = None
    out.update({f"{m}_change": None for m in _AGAINST_FP32})
    if reference is not None:
        ref = reference.aggregate()
        for m, key in [("recovery_rate", "recovery_change")] + [(m, f"{m}_change") for m in _AGAINST_FP32]:
            if out[m] is not None and ref.get(m) is not None:
                out[key] = out[m] - ref[m]  # type: ignore[operator]
        out["recovered"] = float(len(recovered_facts(reference, edited)))
    return out


def recovered_facts(reference: ForgetReport, edited: ForgetReport) -> list[str]:
    """Names of the facts forgotten at full precision whose answer is top-1 again in `edited`."""
    return [e.name for r, e in zip(reference.facts, edited.facts) if not r.known and e.known]


def forget_case_rows(requests: list[Any], reference: ForgetReport, rungs: list[tuple[str, ForgetReport]]) -> list[dict[str, Any]]:
    """Per fact: full-precision probability, known flag, truth ratio, below_wrong and leaks (sampled continuations
    that start with the answer), and per rung the same plus `recovered`."""
    rows = []
    for i, ref in enumerate(reference.facts):
        per_rung = {name: dict(_fact_cells(rep.facts[i]), recovered=(not ref.known) and rep.facts[i].known)
                    for name, rep in rungs}
        rows.append({"case_id": ref.case_id, "name": ref.name, "prompt": ref.prompt, "answer": ref.answer,
                     "wrong": ref.wrong, "fp32": _fact_cells(ref), "rungs": per_rung})
    return rows


def _fact_cells(f: FactResult) -> dict[str, Any]:
    return {"prob": f.prob, "prob_first": f.prob_first, "known": f.known, "truth_ratio": f.truth_ratio,
            "below_wrong": f.below_wrong, "para_below_wrong": f.para_below_wrong, "leaks": f.leaks}

"""The survival ladder's parts that need no model: rungs, gates, metrics and report files."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest
from qedit.evaluation.gate import check_requirements, parse_requirement
from qedit.evaluation.metrics import CaseResult, EvalReport
from qedit.survival.measure import Measured, RungResult, SurvivalResult
from qedit.survival.metrics import SCHEMA, all_rung_metrics, to_json
from qedit.survival.report import table_lines, write_reports
from qedit.survival.rungs import DEFAULT_LADDER, RungKind, gguf_rung_names, parse_ladder


def test_default_ladder_parses_in_order():
    rungs = parse_ladder(DEFAULT_LADDER)
    assert [r.name for r in rungs] == DEFAULT_LADDER.split(",")
    assert all(r.kind is RungKind.GGUF for r in rungs)


def test_ladder_lora_and_repeats():
    rungs = parse_ladder("q4_k_m, Q2_K,Q4_K_M", lora="q4_k_m")
    assert [r.name for r in rungs] == ["Q4_K_M", "Q2_K", "LORA@Q4_K_M"]
    assert rungs[-1].kind is RungKind.GGUF_LORA and rungs[-1].spec == "Q4_K_M"


@pytest.mark.parametrize("text", ["Q4_K_X", "Q4_K_M,Q9", "LORA@Q7", ",,"])
def test_unknown_rung_lists_valid_ones(text):
    with pytest.raises(QeditError) as err:
        parse_ladder(text)
    if text != ",,":
        assert "Q4_K_M" in str(err.value) and "valid rungs" in str(err.value)
    assert "Q2_K" in gguf_rung_names()


def test_requirement_parsing():
    req = parse_requirement("q4_k_m:efficacy>=0.95", ["Q4_K_M"])
    assert (req.rung, req.metric, req.op, req.value) == ("Q4_K_M", "efficacy", ">=", 0.95)
    assert str(req) == "Q4_K_M:efficacy>=0.95"
    assert parse_requirement("Q4_K_M:ppl_ratio<1.05", ["Q4_K_M"]).holds(1.01)
    for bad, msg in (("Q4_K_M efficacy 0.9", "expected RUNG"), ("Q2_K:efficacy>=0.9", "not in the ladder"),
                     ("Q4_K_M:accuracy>=0.9", "unknown metric")):
        with pytest.raises(QeditError, match=msg):
            parse_requirement(bad, ["Q4_K_M"])


def test_check_requirements_pass_fail_and_skipped():
    reqs = [parse_requirement(t, ["A", "B"]) for t in ("A:efficacy>=0.9", "A:efficacy>=0.95", "B:efficacy>=0")]
    results = check_requirements(reqs, {"A": {"efficacy": 0.9}, "B": None})
    assert [r.passed for r in results] == [True, False, False]
    assert "not built" in results[2].reason


# ---- a synthetic result: 2 cases, full precision plus two rungs (one skipped) ----------------------

def _case(eff: float, margin: float, loc: float | None = 1.0) -> CaseResult:
    said = eff if margin >= 2 else 0.0                    # the generated answer: only a wide margin says it
    return CaseResult(case_id=None, subject="s", target_new="new", ground_truth="old", logp_new=margin - 1.0,
                      logp_true=-1.0, efficacy=eff, efficacy_top1=eff, generalization=eff, generalization_top1=eff,
                      locality=loc, locality_top1=loc, efficacy_gen=said, generalization_gen=said, locality_gen=loc,
                      continuation=" new |\ntown" if said else " old town")


def _measured(effs: list[float], margins: list[float], nll: float, loc: float | None = 1.0) -> Measured:
    return Measured(EvalReport({"runner": "fake"}, [_case(e, m, loc) for e, m in zip(effs, margins)]), nll, 100)


def _result() -> SurvivalResult:
    reqs = [EditRequest(prompt=f"P{i} is in", subject=f"P{i}", target_new="new", ground_truth="old", case_id=str(i))
            for i in range(2)]
    ok = RungResult(parse_ladder("Q4_K_M")[0], "ok", edited=_measured([1.0, 0.0], [1.0, -0.5], 210.0, loc=0.5),
                    baseline=_measured([0.0, 0.0], [-2.0, -2.0], 200.0), bits_per_weight=4.8, size_bytes=1000,
                    encoding="aware", computed_on="rung", delta_norm=1.25)
    skipped = RungResult(parse_ladder("Q2_K")[0], "skipped", reason="row length 100 does not fit")
    return SurvivalResult(source=Path("model.gguf"), source_sha256="ab" * 32, method="rome", requests=reqs,
                          reference=_measured([1.0, 1.0], [3.0, 2.0], 205.0, loc=1.0),
                          reference_baseline=_measured([0.0, 0.0], [-2.0, -2.0], 200.0, loc=None),
                          rungs=[ok, skipped], versions={"qedit": "test"})


def test_rung_metrics_ratios_to_full_precision():
    metrics = all_rung_metrics(_result())
    fp, q4 = metrics["fp32"], metrics["Q4_K_M"]
    assert fp["efficacy"] == 1.0 and fp["margin_change"] == pytest.approx(4.5)
    assert q4["efficacy"] == 0.5 and q4["efficacy_kept"] == 0.5
    assert q4["margin_change"] == pytest.approx(2.25) and q4["margin_kept"] == pytest.approx(0.5)
    assert q4["locality"] == 0.5
    assert (fp["efficacy_gen"], fp["efficacy_gen_gap"]) == (1.0, 0.0)
    assert (q4["efficacy_gen"], q4["efficacy_gen_gap"], q4["locality_gen"]) == (0.0, 0.5, 0.5)
    assert q4["ppl_ratio"] == pytest.approx(math.exp(2.1) / math.exp(2.0))
    assert q4["died"] == 1.0
    assert metrics["Q2_K"] is None


def test_json_schema_and_per_case_deaths():
    data = to_json(_result(), [{"requirement": "Q4_K_M:efficacy>=0.9", "actual": 0.5, "passed": False, "reason": ""}])
    assert data["schema"] == SCHEMA
    assert {"source", "source_sha256", "method", "n_cases", "versions", "full_precision", "rungs", "cases",
            "gates"} <= set(data)
    q4, q2 = data["rungs"]
    assert (q4["name"], q4["status"], q4["runtime"]) == ("Q4_K_M", "ok", "llama.cpp")
    assert q2["status"] == "skipped" and "row length" in q2["reason"] and q2["metrics"] is None
    died = {c["case_id"]: c["rungs"]["Q4_K_M"]["died"] for c in data["cases"]}
    assert died == {"0": False, "1": True}
    assert data["cases"][1]["rungs"]["Q4_K_M"]["margin_shrink"] == pytest.approx(2.5)
    json.dumps(data)  # serialisable


def test_report_files_and_table(tmp_path):
    data = to_json(_result())
    written = write_reports(tmp_path, data)
    names = {p.name for p in written}
    assert {"survival.json", "survival.csv", "cases.csv", "report.md", "report.html"} <= names
    assert json.loads((tmp_path / "survival.json").read_text())["schema"] == SCHEMA
    rows = list(csv.DictReader((tmp_path / "survival.csv").open()))
    assert [r["rung"] for r in rows] == ["fp32 (torch)", "Q4_K_M", "Q2_K"]
    assert rows[1]["efficacy"] == "0.5" and rows[2]["status"] == "skipped"
    cases = list(csv.DictReader((tmp_path / "cases.csv").open()))
    assert len(cases) == 4 and {c["rung"] for c in cases} == {"fp32", "Q4_K_M"}
    md = (tmp_path / "report.md").read_text()
    assert "| Q2_K | skipped: row length 100 does not fit |" in md and "-0.50 x" in md
    assert "Quantization-aware: at Q4_K_M (|dW| = 1.250) the edit was computed on the rung's unedited file" in md
    assert data["rungs"][0]["computed_on"] == "rung" and data["rungs"][1]["computed_on"] == "source"
    html = (tmp_path / "report.html").read_text()
    assert "<table" in html and "Q4_K_M" in html
    if "survival.png" in names:
        assert (tmp_path / "survival.png").read_bytes()[:4] == b"\x89PNG"
        assert "survival.png" in html
    lines = table_lines(data)
    assert any(line.startswith("Q2_K") and "skipped" in line for line in lines)
    assert any("died" in line for line in lines)


def test_eval_report_json_round_trip():
    report = _measured([1.0, 0.0], [1.0, -0.5], 210.0, loc=0.5).report
    again = EvalReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again.to_json() == report.to_json()

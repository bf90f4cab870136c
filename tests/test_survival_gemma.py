"""`qedit survival` end to end on the packaged Gemma 3 270M: artifacts, llama.cpp, reports, gates."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.real_model
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    from qedit.core.facts import demo_requests

    path = tmp_path_factory.mktemp("survival-facts") / "facts.jsonl"
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in demo_requests()[:3]))
    return path


@pytest.fixture(scope="module")
def edited(gemma_gguf, facts, tmp_path_factory):
    from qedit.cli import main

    out = tmp_path_factory.mktemp("survival-edit") / "edited"
    assert main(["edit", str(gemma_gguf), str(facts), "--method", "rome", "-o", str(out)]) == 0
    return out


def _run(gemma_gguf, facts, edited, report, ladder, *extra):
    from qedit.cli import main

    rc = main(["survival", str(gemma_gguf), str(facts), "--from-deltas", str(edited), "--ladder", ladder,
               "-o", str(report), *extra])
    return rc, json.loads((report / "survival.json").read_text())


def test_ladder_reports_gates_and_cache(gemma_gguf, facts, edited, tmp_path, capsys):
    report = tmp_path / "report"
    rc, data = _run(gemma_gguf, facts, edited, report, "Q8_0,Q2_K", "--lora", "Q4_K_M",
                    "--require", "Q8_0:efficacy>=0.6")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "require Q8_0:efficacy>=0.6: PASS" in out and "fp32 (torch)" in out
    # schema
    assert data["schema"] == "qedit.survival/2" and data["n_cases"] == 3 and data["method"] == "rome"
    assert data["versions"]["llama-cpp-python"] != "not installed"
    assert [r["name"] for r in data["rungs"]] == ["Q8_0", "Q2_K", "LORA@Q4_K_M"]
    fp = data["full_precision"]["metrics"]
    assert fp["efficacy"] >= 2 / 3 and fp["locality"] is not None
    for r in data["rungs"]:
        assert r["status"] == "ok", r["reason"]
        assert r["runtime"] == "llama.cpp" and r["runner"]["runner"] == "llama.cpp"
        m = r["metrics"]
        for key in ("efficacy", "generalization", "locality", "margin", "margin_kept", "efficacy_kept",
                    "perplexity", "baseline_perplexity", "ppl_ratio", "bits_per_weight", "died"):
            assert key in m
        assert 0.0 <= m["locality"] <= 1.0 and m["perplexity"] > 1.0
        assert all(p.endswith(".gguf") for p in r["artifacts"].values())
    by_name = {r["name"]: r for r in data["rungs"]}
    assert by_name["Q8_0"]["bits_per_weight"] > by_name["Q2_K"]["bits_per_weight"] > 2.0
    assert by_name["Q8_0"]["metrics"]["efficacy"] >= 2 / 3
    assert "lora" in by_name["LORA@Q4_K_M"]["artifacts"]
    assert by_name["LORA@Q4_K_M"]["runner"]["lora"].endswith(".lora.gguf")
    # the rounding-free rung keeps (nearly) the whole edit
    assert by_name["LORA@Q4_K_M"]["metrics"]["efficacy"] >= fp["efficacy"] - 1 / 3
    for case in data["cases"]:
        assert set(case["rungs"]) == {"Q8_0", "Q2_K", "LORA@Q4_K_M"}
        assert {"margin", "margin_shrink", "died"} <= set(case["rungs"]["Q2_K"])
    for name in ("survival.csv", "cases.csv", "report.md", "report.html", "survival.png"):
        assert (report / name).is_file(), name

    # A rerun with one more rung reuses every old artifact and builds only the new one; a gate
    # that falls short makes the exit status 1.
    artifacts = sorted((report / "artifacts").glob("*.gguf"))
    stamps = {p: p.stat().st_mtime_ns for p in artifacts}
    rc, data = _run(gemma_gguf, facts, edited, report, "Q8_0,Q4_K_M,Q2_K", "--lora", "Q4_K_M",
                    "--require", "Q8_0:margin>=1000", "--require", "Q8_0:efficacy>=0.6")
    out = capsys.readouterr().out
    assert rc == 1 and "require Q8_0:margin>=1000: FAIL" in out
    built = {r["name"]: r["built"] for r in data["rungs"]}
    # (the Q4_K_M baseline was built for the LoRA rung in the first run)
    assert built == {"Q8_0": [], "Q4_K_M": ["edited"], "Q2_K": [], "LORA@Q4_K_M": []}
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert [g["passed"] for g in data["gates"]] == [False, True]


def test_default_ladder_computes_the_edit_on_coarse_rungs_in_llama_cpp(gemma_gguf, facts, tmp_path, capsys):
    """Without --from-deltas the aware ladder computes the edit on the Q3_K_M rung's own unedited file and
    patches it there; --naive measures the full-precision edit quantized plainly. Run in llama.cpp."""
    from qedit.cli import main
    from qedit.converters.gguf.patch import read_manifests
    from qedit.converters.gguf.read import GGUFFile

    runs = {}
    for mode in ("aware", "naive"):
        report = tmp_path / mode
        argv = ["survival", str(gemma_gguf), str(facts), "--method", "memit", "--ladder", "Q8_0,Q3_K_M",
                "-o", str(report), "--artifacts", str(tmp_path / "artifacts")]
        assert main(argv + (["--naive"] if mode == "naive" else [])) == 0, capsys.readouterr().err
        runs[mode] = {r["name"]: r for r in json.loads((report / "survival.json").read_text())["rungs"]}
    aware, naive = runs["aware"], runs["naive"]
    assert aware["Q8_0"]["computed_on"] == naive["Q8_0"]["computed_on"] == naive["Q3_K_M"]["computed_on"] == "source"
    assert aware["Q3_K_M"]["computed_on"] == "rung" and aware["Q3_K_M"]["encoding"] == "aware"
    with GGUFFile(aware["Q3_K_M"]["artifacts"]["edited"]) as gf:   # what `qedit edit --quant Q3_K_M` records
        assert "exported at Q3_K_M" in read_manifests(gf)[-1]["info"]["computed_on"]
    assert aware["Q3_K_M"]["artifacts"]["baseline"] == naive["Q3_K_M"]["artifacts"]["baseline"]
    assert aware["Q3_K_M"]["delta_norm"] != pytest.approx(naive["Q3_K_M"]["delta_norm"], rel=1e-4)
    a, n = aware["Q3_K_M"]["metrics"], naive["Q3_K_M"]["metrics"]
    assert a["efficacy"] >= n["efficacy"] and a["margin_kept"] > n["margin_kept"], (a, n)

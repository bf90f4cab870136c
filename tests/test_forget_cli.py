"""`qedit forget` and the unlearning survival ladder on a tiny model: outputs as `edit` writes them,
forget-score gates at full precision and on the written artifact, per-rung recovery in the ladder's
report, and clear refusals when an edit method meets facts to forget or the other way round."""
from __future__ import annotations

import json

import pytest

from qedit.cli import main

FAST = ["--stats-samples", "16", "--method", "ga"]


def test_forget_writes_a_model_and_gates_on_the_forget_score(tiny_dirs, facts_file, tmp_path, capsys):
    from qedit.core.delta import MANIFEST_FILE

    out, js = tmp_path / "out", tmp_path / "m.json"
    assert main(["forget", str(tiny_dirs["llama"]), str(facts_file), "-o", str(out), *FAST, "--eval",
                 "--json", str(js), "--require", "fp32:forget_prob<=1"]) == 0
    text = capsys.readouterr().out
    assert "unlearned 3 fact(s) with ga" in text and "require fp32:forget_prob<=1: PASS" in text
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["method"] == "ga" and [f["answer"] for f in manifest["facts"]] == ["Paris", "basketball", "Japan"]
    data = json.loads(js.read_text())
    unedited, forgotten = data["unedited"]["aggregate"], data["fp32"]["aggregate"]
    assert forgotten["forget_prob"] <= unedited["forget_prob"]  # (the random tiny model knows none of them)
    assert data["metrics"]["fp32"]["forget_prob"] == pytest.approx(forgotten["forget_prob"])
    # beyond the rank: every fact has a target_new (its wrong answer) and a paraphrase, and is sampled 20 times
    assert forgotten["n_ratio"] == forgotten["n_paraphrased"] == forgotten["n_sampled"] == 3
    for key in ("truth_ratio", "below_wrong", "para_truth_ratio", "para_below_wrong", "sampled_leak"):
        assert data["metrics"]["fp32"][key] == pytest.approx(forgotten[key]) and f"{key}=" in text
    assert [f["wrong"] for f in data["fp32"]["facts"]] == ["Rome", "tennis", "Italy"]
    assert all(f["n_samples"] == 20 for f in data["unedited"]["facts"])
    # a gate that cannot hold: exit 1, the output is still written
    assert main(["forget", str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path / "o2"), *FAST,
                 "--require", "fp32:forget_prob<=0"]) == 1
    assert "FAIL" in capsys.readouterr().out and (tmp_path / "o2" / MANIFEST_FILE).is_file()


@pytest.mark.runtime
def test_forget_to_gptq_measures_the_written_checkpoint(tiny_dirs, facts_file, tmp_path, capsys):
    out, js = tmp_path / "g", tmp_path / "g.json"
    assert main(["forget", str(tiny_dirs["llama"]), str(facts_file), "-o", str(out), *FAST, "--format", "gptq",
                 "--group-size", "32", "--json", str(js), "--require", "output:recovered<=3"]) == 0
    data = json.loads(js.read_text())
    assert data["output"]["runner"]["runner"] in ("gptqmodel", "gptq-dequantized-torch")
    assert data["metrics"]["output"]["recovered"] is not None


@pytest.mark.parametrize("command, method, message", [
    ("forget", "memit", "edits facts; forget takes one of ga, kforget, npo, qforget"),
    ("edit", "npo", "unlearns facts; use `qedit forget"),
])
def test_methods_and_commands_must_match(tiny_dirs, facts_file, tmp_path, capsys, command, method, message):
    assert main([command, str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path / "x"),
                 "--stats-samples", "16", "--method", method]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_forget_refuses_unknown_gate_rungs_before_any_work(tiny_dirs, facts_file, tmp_path, capsys):
    assert main(["forget", str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path / "x"), *FAST,
                 "--require", "Q4_K_M:recovery_rate<=0.1"]) == 2
    assert "not in the ladder (fp32, output)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


HELD = [{"prompt": "The capital of France is", "answer": "Paris"}, {"prompt": "Lionel Messi plays", "answer": "soccer"}]


def _heldout_file(tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(h) + "\n" for h in HELD))
    return path


def test_forget_scores_heldout_items_apart(tiny_dirs, facts_file, tmp_path):
    js = tmp_path / "m.json"
    assert main(["forget", str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path / "out"), *FAST,
                 "--heldout", str(_heldout_file(tmp_path)), "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    for key in ("unedited", "fp32"):
        retain = data[key]["retain"]
        held = [r for r in retain if r["held_out"]]
        assert [(r["prompt"], r["answer"]) for r in held] == [(h["prompt"], h["answer"]) for h in HELD]
        agg = data[key]["aggregate"]
        assert agg["n_heldout"] == 2 and agg["n_retain"] == len(retain) - 2
        assert agg["heldout_acc"] == pytest.approx(sum(r["correct"] for r in held) / 2)
        assert agg["retain_acc"] == pytest.approx(sum(r["correct"] for r in retain if not r["held_out"]) / agg["n_retain"])
    fp32 = data["metrics"]["fp32"]
    assert fp32["heldout_acc_change"] == pytest.approx(fp32["heldout_acc"] - fp32["baseline_heldout_acc"])


@pytest.mark.runtime
def test_survival_of_unlearning_reports_recovery_per_rung(tiny_dirs, facts_file, tmp_path, capsys):
    report = tmp_path / "r"
    assert main(["survival", str(tiny_dirs["llama"]), str(facts_file), *FAST, "--ladder", "none", "--gptq", "4,2",
                 "--gptq-group-size", "32", "-o", str(report), "--require", "GPTQ-2:retain_acc_change>=-1",
                 "--heldout", str(_heldout_file(tmp_path)), "--require", "GPTQ-4:heldout_acc_change>=-1"]) == 0
    data = json.loads((report / "survival.json").read_text())
    assert all(r["metrics"]["baseline_heldout_acc"] is not None for r in data["rungs"])
    assert data["mode"] == "forget" and data["n_cases"] == 3
    fp32 = data["full_precision"]["metrics"]
    assert fp32["forget_prob"] is not None and fp32["recovery_rate"] is not None
    for rung in data["rungs"]:
        m = rung["metrics"]
        assert rung["status"] == "ok" and m["recovered"] == len(rung["recovered"])
        assert m["recovery_change"] == pytest.approx(m["recovery_rate"] - fp32["recovery_rate"])
    assert [c["name"] for c in data["cases"]] == ["Eiffel Tower -> Paris", "Michael Jordan -> basketball",
                                                  "Toyota -> Japan"]
    assert set(data["cases"][0]["rungs"]) == {"GPTQ-4", "GPTQ-2"}
    assert "recovery" in capsys.readouterr().out
    md = (report / "report.md").read_text()
    assert "facts to forget" in md and "P(answer) per fact" in md
    assert (report / "cases.csv").read_text().splitlines()[0] == ("rung,case_id,name,answer,wrong,prob,prob_first,known,recovered,"
                                                                 "truth_ratio,below_wrong,para_below_wrong,leaks")
    assert "leak" in md and "truth ratio" in md
    assert all(m["metrics"]["below_wrong"] is not None and m["metrics"]["sampled_leak"] is not None
               for m in data["rungs"])


def test_recovered_facts_are_named():
    """The per-rung flag: forgotten at full precision (not top-1) and top-1 again at the rung."""
    from qedit.evaluation.forget import FactResult, ForgetReport
    from qedit.evaluation.forget_compare import forget_metrics, recovered_facts

    def report(known: list[bool], probs: list[float]) -> ForgetReport:
        facts = [FactResult(str(i), f"s{i} -> a{i}", f"p{i}", f"a{i}", p, p, k) for i, (k, p) in enumerate(zip(known, probs))]
        return ForgetReport({"runner": "test"}, facts, [], [])

    ref = report([False, False, True], [0.01, 0.02, 0.5])
    rung = report([True, False, True], [0.4, 0.01, 0.6])
    base = report([True, True, True], [0.7, 0.8, 0.9])
    assert recovered_facts(ref, rung) == ["s0 -> a0"]
    m = forget_metrics(rung, base, ref)
    assert m["recovered"] == 1 and m["recovery_rate"] == pytest.approx(2 / 3)
    assert m["recovery_change"] == pytest.approx(2 / 3 - 1 / 3) and m["forgotten"] == pytest.approx(1 / 3)
    assert m["forget_prob"] == pytest.approx((0.4 + 0.01 + 0.6) / 3)


def test_set_overrides_method_settings(tiny_dirs, facts_file, tmp_path, capsys):
    from qedit.core.delta import MANIFEST_FILE

    out = tmp_path / "s"
    assert main(["forget", str(tiny_dirs["llama"]), str(facts_file), "-o", str(out), *FAST,
                 "--set", "lr=1e-5", "--set", "steps=3", "--set", "energy=none", "--set", "stop_forgotten=false"]) == 0
    config = json.loads((out / MANIFEST_FILE).read_text())["config"]
    assert (config["lr"], config["steps"], config["energy"], config["stop_forgotten"]) == (1e-5, 3, None, False)
    for bad, message in (("lrate=1", "has no setting 'lrate'; known:"), ("steps=many", "not a valid value for steps"),
                         ("lr", "expected KEY=VALUE")):
        assert main(["forget", str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path / "x"), *FAST,
                     "--set", bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_kforget_writes_a_gguf_edit_aware_with_its_keys(tiny_dirs, tmp_path, capsys):
    """kforget returns edit keys like an edit, so `forget --quant T` patches the quantized file edit-aware
    and records the keys (a later patch of the file protects them). The facts are the tiny model's own
    answers (test_forget_tiny.tiny_requests), so there is something to forget."""
    from conftest import make_tokenizer
    from test_forget_tiny import tiny_requests
    from test_gguf_export import _tokenizer_template

    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.keys import stored_edit_keys
    from qedit.converters.gguf.read import GGUFFile
    from qedit.converters.loading import load_model

    tok = make_tokenizer()
    template = _tokenizer_template(tmp_path / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    src = tmp_path / "tiny.gguf"
    export_gguf(tiny_dirs["llama"], src, "F32", template=template)
    facts_file = tmp_path / "known.jsonl"      # answers as the GGUF (its own tokenizer) gives them
    facts_file.write_text("".join(json.dumps(r.to_json()) + "\n" for r in tiny_requests(load_model(src))))
    out = tmp_path / "forgotten.gguf"
    assert main(["forget", str(src), str(facts_file), "--method", "kforget", "--set", "cov_weight=100",
                 "--stats-samples", "16", "--quant", "Q4_K_M", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kforget in" in text and "edit-aware: kept" in text, text
    with GGUFFile(out) as gf:
        manifest = json.loads(gf.fields["qedit.manifest"])
    assert manifest["method"] == "kforget" and manifest["encoding"]["path"] == "aware"
    keys = stored_edit_keys(out)
    assert sorted(keys) == manifest["layers"] and all(k.shape[0] == 3 for k in keys.values())

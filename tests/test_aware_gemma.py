"""Edit-aware patching of the packaged Gemma 3 270M Q4_K_M file against plain requantization.

Minimal ROME edits (scaled to a 1-nat margin) at layer 6, whose ffn_down the file stores as Q4_K:
patching requantizes it onto the grid it came from, where small edits lose much of their effect.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model
pytest.importorskip("llama_cpp")


def test_aware_patch_keeps_minimal_edits_that_plain_requantization_loses(gemma_gguf, tmp_path):
    from qedit.converters.gguf.aware import encoding_for
    from qedit.converters.gguf.patch import patch_gguf
    from qedit.converters.loading import load_model
    from qedit.core.facts import demo_requests
    from qedit.edit.compute import compute_edits
    from qedit.evaluation.metrics import evaluate
    from qedit.pipeline.jobs import make_config
    from qedit.runtimes.llama import LlamaCppRunner

    loaded = load_model(gemma_gguf)
    requests = demo_requests()[:3]
    cfg = make_config("rome", target_margin=1.0)
    outcome = compute_edits(loaded, requests, "rome", cfg)
    encoding = encoding_for(loaded, outcome.keys, cfg.stats)
    manifest = outcome.manifest(loaded)
    aware = patch_gguf(gemma_gguf, tmp_path / "aware.gguf", outcome.deltas, manifest, encoding=encoding)
    naive = patch_gguf(gemma_gguf, tmp_path / "naive.gguf", outcome.deltas, manifest)
    (t,) = aware.tensors
    assert t.name == "blk.6.ffn_down.weight" and t.type_after == "Q4_K" == t.type_before
    assert t.kept >= 0.98, t
    assert t.kept > t.kept_naive + 0.02, t          # the plain path loses a visible share
    assert naive.tensors[0].kept is None and aware.size_after == naive.size_after
    base = evaluate(LlamaCppRunner(gemma_gguf), requests)
    eff = {name: evaluate(LlamaCppRunner(tmp_path / f"{name}.gguf"), requests, baseline=base).aggregate()
           for name in ("aware", "naive")}
    assert eff["aware"]["efficacy"] >= eff["naive"]["efficacy"]
    assert eff["aware"]["margin"] > eff["naive"]["margin"], eff


def test_ten_minimal_edits_exported_at_q3_k_m_survive_in_llama_cpp(gemma_gguf, tmp_path, capsys):
    """`qedit edit SOURCE FACTS --quant Q3_K_M --set target_margin=2`: ten minimal MEMIT edits (four layers,
    one batch scaled down until its weakest fact has a 2-nat margin) computed on the model as exported at
    Q3_K_M and patched onto it edit-aware (and checked in llama.cpp, the default) keep at least 9 in llama.cpp;
    the same run shows what --naive (edit in full precision, fold, quantize) keeps."""
    from conftest import DATA

    from qedit.cli import main
    from qedit.core.facts import load_requests
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.llama import LlamaCppRunner

    data = DATA / "counterfact-dev.jsonl"
    if not data.is_file():
        pytest.skip(f"{data} is not here")
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(data.read_text().splitlines()[100:110]) + "\n")
    requests = load_requests(facts)
    kept = {}
    for mode in ("aware", "naive"):
        out = tmp_path / f"{mode}.Q3_K_M.gguf"
        argv = ["edit", str(gemma_gguf), str(facts), "--method", "memit", "--set", "target_margin=2",
                "--quant", "Q3_K_M", "-o", str(out)]
        assert main(argv + (["--naive"] if mode == "naive" else [])) == 0
        report = evaluate(LlamaCppRunner(out), requests)
        kept[mode] = (sum(c.efficacy for c in report.cases), report.aggregate()["margin"])
    text = capsys.readouterr().out
    writes = text.count("edit-aware: kept")             # the four MEMIT layers re-encoded edit-aware, per write
    assert writes >= 4 and writes % 4 == 0, writes      # of the default llama.cpp check, which ran:
    assert "nats in llama.cpp" in text.split("naive.Q3_K_M")[0]
    print(f"Q3_K_M, 10 MEMIT edits kept in llama.cpp (count, mean margin): {kept}")
    assert kept["aware"][0] >= 9, kept
    assert kept["aware"][0] >= kept["naive"][0] and kept["aware"][1] > kept["naive"][1], kept
    assert not list(tmp_path.glob(".*.gguf"))           # the unedited Q3_K_M export was removed

"""GGUF outputs of the CLI on the packaged Gemma 3 270M: export, --quant with --tensor-type, --as-lora."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.real_model
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def one_fact(tmp_path_factory):
    from qedit.core.facts import demo_requests

    path = tmp_path_factory.mktemp("one-fact") / "fact.jsonl"
    path.write_text(json.dumps(demo_requests()[0].to_json()) + "\n")
    return path


def _efficacy(path, facts, lora=None):
    from qedit.core.facts import load_requests
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.llama import LlamaCppRunner

    return evaluate(LlamaCppRunner(path, lora=lora), load_requests(facts)).aggregate()["efficacy"]


def test_export_reports_fallbacks_and_runs(gemma_gguf, tmp_path, capsys):
    from qedit.cli import main
    from qedit.converters.gguf.read import GGUFFile
    from qedit.runtimes.llama import LlamaCppRunner

    out = tmp_path / "gemma.Q2_K.gguf"
    assert main(["export", str(gemma_gguf), "-o", str(out), "--quant", "Q2_K"]) == 0
    text = capsys.readouterr().out
    assert "at Q2_K" in text and "fell back to another type, as llama.cpp does" in text and "row length 640" in text
    with GGUFFile(out) as gf:
        assert gf.fields["general.file_type"] == 10  # LLAMA_FTYPE_MOSTLY_Q2_K
    assert LlamaCppRunner(out).complete("The capital of France is", max_tokens=3).strip()


def test_edit_quant_with_tensor_type_and_as_lora(gemma_gguf, one_fact, tmp_path, capsys):
    from qedit.cli import main
    from qedit.converters.gguf.read import GGUFFile

    exported = tmp_path / "edited.Q8_0.gguf"
    assert main(["edit", str(gemma_gguf), str(one_fact), "--method", "rome", "-o", str(exported),
                 "--quant", "Q8_0", "--tensor-type", "blk.6.ffn_down.weight=F16"]) == 0
    text = capsys.readouterr().out
    assert "blk.6.ffn_down.weight=F16" in text
    with GGUFFile(exported) as gf:
        assert gf.tensors["blk.6.ffn_down.weight"].ggml_type.name == "F16"
        assert gf.tensors["blk.5.ffn_down.weight"].ggml_type.name == "Q8_0"
        assert json.loads(gf.fields["qedit.manifest"])["method"] == "rome"
    assert _efficacy(exported, one_fact) == 1.0

    adapter = tmp_path / "edit.lora.gguf"
    assert main(["edit", str(gemma_gguf), str(one_fact), "--method", "rome", "-o", str(adapter), "--as-lora"]) == 0
    assert "wrote LoRA adapter" in capsys.readouterr().out
    assert adapter.stat().st_size < 200_000
    assert _efficacy(gemma_gguf, one_fact) == 0.0
    assert _efficacy(gemma_gguf, one_fact, lora=adapter) == 1.0

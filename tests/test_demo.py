"""`qedit demo` end to end on the packaged Gemma 3 270M, writing the edited model."""
from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.real_model


def test_demo_edits_and_writes_loadable_model(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qedit.cli import main
    from qedit.core.delta import MANIFEST_FILE

    out = tmp_path / "edited"
    assert main(["demo", "--method", "rome", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "answers before editing" in text and "answers after editing" in text
    after = re.search(r"after : efficacy=([0-9.]+)", text)
    assert after is not None and float(after.group(1)) >= 0.8, text
    # The patched Q4_K_M file answers with the edits in llama.cpp.
    pytest.importorskip("llama_cpp")
    patched = re.search(r"llama\.cpp, patched Q4_K_M *: efficacy=([0-9.]+)", text)
    assert patched is not None and float(patched.group(1)) >= 0.8, text
    # ... and it ends with the survival table of its edits over the default ladder.
    table = text[text.index("survival of the edits across quantization"):]
    for rung in ("fp32 (torch)", "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"):
        assert re.search(rf"^{re.escape(rung)} +[0-9.-]", table, re.M), table
    # ... and says where its files are, and how big: the HF directory, the cache entries of the model.
    files = text[text.index("\nfiles:"):]
    assert f"{out}: " in files and "statistics" in files and "survival artifacts" in files, files
    # A GGUF source becomes an HF directory that transformers loads as it is.
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["source_kind"] == "gguf" and manifest["method"] == "rome" and len(manifest["facts"]) == 5
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    rome, paris = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("Rome", "Paris"))
    assert logits[rome] > logits[paris]

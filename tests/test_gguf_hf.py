"""GGUF export from an HF directory (qedit.converters.gguf.hf_config read by gguf_export), on tiny models: the
llama.cpp logits equal the torch ones, the vocabulary is built when there is no template, and deltas are
added before llama.cpp's conversion transforms. The real model's HF exports are in test_gguf_export."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_export import _delta, _llama_logits, _tokenizer_template

from qedit.core.errors import QeditError


def _tiny_variant(tiny_dirs, family: str, root: Path) -> Path:
    """The tiny model dir, or for "llama3": the tiny llama with llama3 rope scaling (weights linked)."""
    if family != "llama3":
        return tiny_dirs[family]
    out = root / "llama3"
    out.mkdir()
    for item in tiny_dirs["llama"].iterdir():
        (out / item.name).symlink_to(item) if item.suffix == ".safetensors" else shutil.copy(item, out / item.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.runtime
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "llama3"])
def test_tiny_hf_export_runs_in_llama_cpp_with_the_torch_logits(tiny_dirs, tmp_path, family):
    from conftest import make_tokenizer
    from transformers import AutoModelForCausalLM

    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.read import GGUFFile

    pytest.importorskip("llama_cpp")
    src = _tiny_variant(tiny_dirs, family, tmp_path)
    tok = make_tokenizer()
    template = _tokenizer_template(tmp_path / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    ids = [2, 40, 41, 12, 7, 60, 33, 90, 5]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()  # (len(ids), vocab)
    report = export_gguf(src, tmp_path / "tiny.gguf", "F32", template=template)
    assert report.source_kind == "hf" and report.copied == 0 and "vocab.gguf" in report.tokenizer
    got = _llama_logits(tmp_path / "tiny.gguf", ids)
    assert np.abs(got - want).max() < 5e-4 * np.abs(want).max(), family  # gemma3: ggml's GELU uses an F16 table
    with GGUFFile(tmp_path / "tiny.gguf") as gf:
        assert ("rope_freqs.weight" in gf.tensors) == (family == "llama3")
        assert ("output.weight" in gf.tensors) == (family != "gemma3")  # gemma3 ties its embeddings
    if family == "llama3":  # gguf_to_torch recovers the rope scaling from rope_freqs
        from qedit.converters.gguf.to_torch import build_config

        with GGUFFile(tmp_path / "tiny.gguf") as gf:
            assert build_config(gf).rope_parameters["rope_type"] == "llama3"
    q8 = export_gguf(src, tmp_path / "tiny_q8.gguf", "Q8_0", template=template)
    assert set(q8.tensor_types.values()) <= {"Q8_0", "F32"}
    assert (_llama_logits(tmp_path / "tiny_q8.gguf", ids).argmax(-1) == want.argmax(-1)).mean() >= 0.8


def _byte_level_dir(family: str, path: Path) -> tuple[Path, object]:
    """A tiny model with a byte-level BPE tokenizer (the kind Llama 3 and Qwen2 use), trained in-process."""
    from conftest import WORDS, byte_level_bpe, make_config
    from transformers import AutoModelForCausalLM

    fast = byte_level_bpe([" ".join(WORDS)] * 4, 300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(family, len(fast))).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path, (model, fast)


@pytest.mark.runtime
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_hf_export_without_a_template_builds_the_vocab(tiny_dirs, tmp_path, family):
    from qedit.converters.gguf.export import export_gguf

    llama_cpp = pytest.importorskip("llama_cpp")
    src, (model, tok) = _byte_level_dir(family, tmp_path / family)
    report = export_gguf(src, tmp_path / "tiny.gguf", "F32")
    assert report.tokenizer == "built from the directory"
    text = "The Eiffel Tower is located in the city of Paris"
    llm = llama_cpp.Llama(model_path=str(tmp_path / "tiny.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    ids = llm.tokenize(text.encode())
    assert ids == tok(text)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()  # (len(ids), vocab)
    assert np.abs(_llama_logits(tmp_path / "tiny.gguf", ids) - want).max() < 5e-4 * np.abs(want).max()
    with pytest.raises(QeditError, match="WordLevel|tokenizer"):  # no llama.cpp tokenizer reproduces WordLevel
        export_gguf(tiny_dirs[family], tmp_path / "wordlevel.gguf", "F16")
    assert not (tmp_path / "wordlevel.gguf").exists()


def test_hf_deltas_are_added_before_the_transforms(tiny_dirs, tmp_path):
    from conftest import make_tokenizer

    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.read import GGUFFile

    tok = make_tokenizer()
    template = _tokenizer_template(tmp_path / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    q = _delta("model.layers.1.self_attn.q_proj.weight", 64, 64, seed=3)
    down = _delta("model.layers.2.mlp.down_proj.weight", 64, 128, seed=4)
    base = export_gguf(tiny_dirs["llama"], tmp_path / "base.gguf", "F32", template=template)
    edited = export_gguf(tiny_dirs["llama"], tmp_path / "edited.gguf", "F32", template=template, deltas=[q, down])
    assert set(edited.edited) == {"blk.1.attn_q.weight", "blk.2.ffn_down.weight"} and base.edited == ()
    with GGUFFile(tmp_path / "base.gguf") as a, GGUFFile(tmp_path / "edited.gguf") as b:
        changed = {n for n in a.tensors if bytes(a.raw(n)) != bytes(b.raw(n))}
        assert changed == {"blk.1.attn_q.weight", "blk.2.ffn_down.weight"}
        diff = b.dequantize("blk.2.ffn_down.weight") - a.dequantize("blk.2.ffn_down.weight")  # (64, 128)
        assert np.allclose(diff, down.dense().numpy(), atol=1e-5)
        dq = b.dequantize("blk.1.attn_q.weight") - a.dequantize("blk.1.attn_q.weight")  # permuted rows
        assert np.allclose(np.sort(dq, axis=0), np.sort(q.dense().numpy(), axis=0), atol=1e-5)
    with pytest.raises(QeditError, match="does not have"):
        export_gguf(tiny_dirs["llama"], tmp_path / "x.gguf", "F32", template=template,
                    deltas=[_delta("model.layers.9.mlp.down_proj.weight", 64, 128)])

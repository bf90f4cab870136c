"""Edits as a GGUF LoRA adapter (qedit.converters.gguf.lora), applied by llama.cpp on the unedited base."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qedit.core.delta import LowRankDelta
from qedit.core.errors import QeditError

# A tiny gemma3-shaped base file: enough for name mapping and shape checks, no model behind it.
TINY_SHAPES = {  # GGUF name -> numpy shape (out, in)
    "token_embd.weight": (32, 8),
    "blk.0.ffn_down.weight": (8, 16),
    "blk.0.ffn_up.weight": (16, 8),
    "blk.1.ffn_down.weight": (8, 16),
    "blk.1.attn_output.weight": (8, 12),
}
DOWN0, UP0, DOWN1, ATTN1 = ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight",
                            "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight")


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    path = tmp_path / "tiny-base.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(2)
    for name, shape in TINY_SHAPES.items():
        writer.add_tensor(name, np.ones(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _delta(name: str, out_dim: int, in_dim: int, rank: int, scale: float = 1.0, seed: int = 0,
           a_mag: float = 1.0, b_mag: float = 1.0) -> LowRankDelta:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out_dim, rank, generator=g) * a_mag  # (out, r)
    b = torch.randn(rank, in_dim, generator=g) * b_mag   # (r, in)
    return LowRankDelta(name, int(name.split(".")[2]), a, b, scale)


def _expected(deltas: list[LowRankDelta]) -> dict[str, np.ndarray]:
    names = {DOWN0: "blk.0.ffn_down.weight", UP0: "blk.0.ffn_up.weight", DOWN1: "blk.1.ffn_down.weight",
             ATTN1: "blk.1.attn_output.weight"}
    out: dict[str, np.ndarray] = {}
    for d in deltas:
        dense = d.dense().double().numpy()  # (out, in)
        out[names[d.name]] = out.get(names[d.name], 0) + dense
    return out


@pytest.mark.parametrize("dtype, rtol", [("F32", 1e-5), ("F16", 2e-3)])
def test_adapter_reproduces_the_summed_deltas(tiny_base, tmp_path, dtype, rtol):
    from qedit.converters.gguf.lora import read_lora_deltas, write_lora_gguf

    deltas = [
        _delta(DOWN0, 8, 16, rank=2, scale=0.5, seed=1),
        _delta(UP0, 16, 8, rank=1, scale=-3.0, seed=2),
        _delta(DOWN0, 8, 16, rank=3, scale=2.0, seed=3),   # same weight: combined along the rank
        _delta(ATTN1, 8, 12, rank=1, seed=4, a_mag=1e4, b_mag=1e-8),  # unbalanced: F16 would lose b
    ]
    dst = tmp_path / f"edit.{dtype}.lora.gguf"
    report = write_lora_gguf(tiny_base, dst, deltas, {"method": "rome", "facts": [{"subject": "x"}]}, dtype=dtype)
    assert report.dtype == dtype and report.architecture == "gemma3" and report.size == dst.stat().st_size
    assert {t.name: (t.rank, t.stored_rank) for t in report.tensors} == {
        "blk.0.ffn_down.weight": (5, 5), "blk.0.ffn_up.weight": (1, 5), "blk.1.attn_output.weight": (1, 5)}
    assert report.tensors[0].hf_names == (DOWN0, DOWN0)
    got = read_lora_deltas(dst)
    want = _expected(deltas)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        err = np.abs(got[name] - w).max() / np.abs(w).max()
        assert err < rtol, (name, err)
    # Without balancing the components, b (1e-8) underflows F16 and attn_output comes back zero.
    assert np.abs(got["blk.1.attn_output.weight"]).max() > 0.5 * np.abs(want["blk.1.attn_output.weight"]).max()


def test_adapter_metadata_is_what_llama_cpp_checks(tiny_base, tmp_path):
    from qedit.converters.gguf.lora import write_lora_gguf
    from qedit.converters.gguf.patch import MANIFEST_KEY, read_manifests
    from qedit.converters.gguf.read import GGUFFile

    deltas = [_delta(DOWN0, 8, 16, rank=2, seed=1), _delta(DOWN1, 8, 16, rank=3, seed=2)]
    manifest = {"method": "memit", "facts": [{"subject": "Eiffel Tower"}], "layers": [0, 1]}
    dst = tmp_path / "edit.lora.gguf"
    report = write_lora_gguf(tiny_base, dst, deltas, manifest, dtype="f16")
    with GGUFFile(dst) as gf:
        assert gf.fields["general.type"] == "adapter"
        assert gf.fields["adapter.type"] == "lora"
        assert gf.fields["general.architecture"] == "gemma3"
        # llama.cpp scales by alpha / r with r = lora_b's ne[0]: alpha = the common rank gives exactly 1.
        assert gf.fields["adapter.lora.alpha"] == report.alpha == 3.0
        assert read_manifests(gf) == [manifest] and json.loads(gf.fields[MANIFEST_KEY]) == manifest
        assert "qedit.version" in gf.fields
        infos = {name: (info.shape, info.ggml_type.name) for name, info in gf.tensors.items()}
    # numpy order: lora_a (r, in) is ggml ne (in, r); lora_b (out, r) is ne (r, out)
    assert infos == {
        "blk.0.ffn_down.weight.lora_a": ((3, 16), "F16"), "blk.0.ffn_down.weight.lora_b": ((8, 3), "F16"),
        "blk.1.ffn_down.weight.lora_a": ((3, 16), "F16"), "blk.1.ffn_down.weight.lora_b": ((8, 3), "F16"),
    }


def test_bad_input_is_refused_and_nothing_is_written(tiny_base, tmp_path):
    from qedit.converters.gguf.lora import write_lora_gguf

    good = _delta(DOWN0, 8, 16, rank=1)
    dst = tmp_path / "out" / "edit.lora.gguf"
    cases = [
        ([_delta(DOWN0, 16, 8, rank=1)], "F32", dst,
         r"down_proj\.weight has shape \(16, 8\).*blk\.0\.ffn_down\.weight is \(8, 16\)"),
        ([good], "Q4_K", dst, r"dtype 'Q4_K' is not supported.*F32 or F16"),
        ([good], "F32", tiny_base, "refusing to write the output over its own input"),
        ([], "F32", dst, "no deltas"),
        ([_delta("model.layers.5.mlp.down_proj.weight", 8, 16, rank=1)], "F32", dst, "no GGUF tensor"),
        ([LowRankDelta("model.embed_tokens.weight", 0, torch.ones(32, 1), torch.ones(1, 8))], "F32", dst,
         "token_embd.weight"),
        ([_delta(DOWN0, 8, 16, rank=1, a_mag=float("nan"))], "F32", dst, "non-finite"),
        ([_delta(DOWN0, 8, 16, rank=1, a_mag=1e6, b_mag=1e6)], "F16", dst, "exceeds the F16 range"),
    ]
    before = tiny_base.read_bytes()
    for deltas, dtype, out, message in cases:
        with pytest.raises(QeditError, match=message):
            write_lora_gguf(tiny_base, out, deltas, {}, dtype=dtype)
    assert tiny_base.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [tiny_base.name]  # no output, no temp file


# ---- llama.cpp on the real Gemma 3 270M Q4_K_M ---------------------------------------------------

PROMPTS = ["The Eiffel Tower is located in the city of", "Michael Jordan plays the sport of"]
LAST_DOWN = "model.layers.17.mlp.down_proj.weight"


def _logits(path: Path, lora: Path | None = None) -> np.ndarray:
    """Next-token logits (positions of all PROMPTS, vocab) in llama.cpp, float64."""
    from qedit.runtimes.llama import LlamaCppRunner

    runner = LlamaCppRunner(path, lora=lora)
    return np.concatenate([runner._logits(runner.tokenizer(p)["input_ids"]) for p in PROMPTS]).astype(np.float64)


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    """Worst relative L2 distance over positions; x, y (positions, vocab)."""
    return float((np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1)).max())


@pytest.mark.real_model
@pytest.mark.parametrize("dtype, tol", [("F32", 1e-3), ("F16", 5e-3)])
def test_llama_cpp_applies_the_adapter_exactly(gemma_gguf, tmp_path, dtype, tol):
    """Adapter on the base == the deltas added to the weight, in llama.cpp.

    The weight is the last block's ffn_down, stored as F32 in both files: earlier blocks feed
    activations to quantized mat-muls (Q8 activations), where Gemma's outliers turn float rounding
    differences into percent-level logit changes; after the last ffn_down only the tied Q8_0 output
    remains. A wrong scale (alpha / r) or orientation would be off by far more than `tol`.
    """
    pytest.importorskip("llama_cpp")
    from qedit.converters.gguf.lora import write_lora_gguf
    from qedit.converters.gguf.patch import patch_gguf

    deltas = [_delta(LAST_DOWN, 640, 2048, rank=2, scale=0.5, seed=1, a_mag=0.05, b_mag=0.05),
              _delta(LAST_DOWN, 640, 2048, rank=1, scale=2.0, seed=2, a_mag=0.05, b_mag=0.05)]
    f32 = {LAST_DOWN: "F32"}
    files = {}
    for factor in (0.0, 0.9, 1.0):
        files[factor] = tmp_path / f"patched-{factor}.gguf"
        patch_gguf(gemma_gguf, files[factor], [d.scaled(factor) for d in deltas], {}, type_overrides=f32)
    adapter = tmp_path / "edit.lora.gguf"
    write_lora_gguf(gemma_gguf, adapter, deltas, {"method": "test"}, dtype=dtype)
    logits = {factor: _logits(path) for factor, path in files.items()}
    with_adapter = _logits(files[0.0], lora=adapter)
    assert _rel(with_adapter, logits[1.0]) < tol
    assert _rel(with_adapter, logits[0.9]) > 5 * tol   # the comparison can tell a 10% scale error
    assert _rel(logits[0.0], logits[1.0]) > 0.05        # and the edit does change the output


@pytest.fixture(scope="module")
def rome_adapter(gemma_gguf, tmp_path_factory):
    """ROME on the 5 demo facts (minutes on a CPU), once, written as an F32 adapter."""
    from qedit.converters.gguf.lora import write_lora_gguf
    from qedit.converters.loading import load_model
    from qedit.core.facts import demo_requests
    from qedit.edit.compute import compute_edits

    loaded = load_model(gemma_gguf)
    requests = demo_requests()
    outcome = compute_edits(loaded, requests, "rome")
    manifest = outcome.manifest(loaded)
    dst = tmp_path_factory.mktemp("lora") / "edit.lora.gguf"
    report = write_lora_gguf(gemma_gguf, dst, outcome.deltas, manifest)
    return dst, report, requests, manifest


@pytest.mark.real_model
def test_rome_edits_answer_in_llama_cpp_through_the_adapter(gemma_gguf, rome_adapter):
    """The issue's done-means: the unedited Q4_K_M file plus the adapter gives the edits."""
    pytest.importorskip("llama_cpp")
    from qedit.converters.gguf.patch import read_manifests
    from qedit.converters.gguf.read import GGUFFile
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.llama import LlamaCppRunner

    dst, report, requests, manifest = rome_adapter
    assert [t.name for t in report.tensors] == ["blk.6.ffn_down.weight"] and report.rank == len(requests)
    assert report.size < 100_000  # five rank-one edits: (640 + 2048) * 5 floats plus metadata
    with GGUFFile(dst) as gf:
        assert read_manifests(gf) == [json.loads(json.dumps(manifest, default=str))]
    before = evaluate(LlamaCppRunner(gemma_gguf), requests)
    runner = LlamaCppRunner(gemma_gguf, lora=dst)
    after = evaluate(runner, requests, baseline=before).aggregate()
    assert runner.describe()["lora"] == str(dst)
    assert before.aggregate()["efficacy"] <= 0.2 and before.aggregate()["efficacy_top1"] == 0.0
    assert after["efficacy"] >= 0.8, after
    assert after["efficacy_top1"] >= 0.6, after

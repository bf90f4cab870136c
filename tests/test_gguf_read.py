"""GGUFFile: equality with gguf-py's GGUFReader, dequantization, header byte ranges, and clear errors
on broken files."""
from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from qedit.converters.gguf.read import GGUFFile
from qedit.core.errors import QeditError

Q = gguf.GGMLQuantizationType


def _reader_fields(reader: gguf.GGUFReader) -> dict[str, tuple[object, tuple[int, int | None]]]:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue  # GGUFReader's synthetic version/count entries
        types = (int(field.types[0]), int(field.types[1]) if len(field.types) > 1 else None)
        out[name] = (field.contents(), types)
    return out


def _write_sample(path: Path, alignment: int = 64) -> dict[str, np.ndarray]:
    """A small GGUF with every value type and a mix of tensor types. Returns the float tensors."""
    import libgguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo 🙂")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, -1.25])
    w.add_array("t.arr_str", ["a", "", "ü", "▁the"])
    w.add_array("t.arr_bool", [True, False, True])
    w.add_key_value("t.arr_u8", [1, 2, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.add_array("t.arr_empty", [])
    rng = np.random.default_rng(0)
    names = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k")
    values = {name: rng.standard_normal((8, 256)).astype(np.float32) for name in names}
    values["vec"] = rng.standard_normal(7).astype(np.float32)
    w.add_tensor("vec", values["vec"])
    w.add_tensor("f32", values["f32"])
    w.add_tensor("f16", values["f16"].astype(np.float16))
    w.add_tensor("bf16", gguf.quants.quantize(values["bf16"], Q.BF16), raw_dtype=Q.BF16)
    for name, qtype in (("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)):
        w.add_tensor(name, gguf.quants.quantize(values[name], qtype), raw_dtype=qtype)
    for name, qtype in (("q4_k", Q.Q4_K), ("q6_k", Q.Q6_K)):
        w.add_tensor(name, libgguf.quantize_rows(values[name], qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


@pytest.fixture()
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.gguf"
    _write_sample(path)
    return path


def test_fields_and_tensors_equal_gguf_reader(sample: Path) -> None:
    reader = gguf.GGUFReader(sample)
    with GGUFFile(sample) as gf:
        expected = _reader_fields(reader)
        assert list(gf.fields) == list(expected)
        for key, (value, types) in expected.items():
            assert gf.fields[key] == value, key
            assert gf.field_types[key] == types, key
        assert gf.fields["t.str"] == "héllo 🙂" and gf.fields["t.arr_bool"] == [True, False, True]
        assert gf.version == 3 and gf.alignment == 64
        assert gf.data_offset == reader.data_offset and gf.data_offset % 64 == 0
        assert list(gf.tensors) == [t.name for t in reader.tensors]
        for t in reader.tensors:
            info = gf.tensors[t.name]
            assert info.ggml_type == t.tensor_type
            assert info.shape == tuple(int(d) for d in reversed(t.shape))
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            np.testing.assert_array_equal(gf.raw(t.name), t.data.reshape(-1).view(np.uint8))


def test_header_byte_ranges_tile_the_header(sample: Path) -> None:
    blob = sample.read_bytes()
    with GGUFFile(sample) as gf:
        assert gf.kv_offset == 24
        ranges = list(gf.field_ranges.values())
        assert ranges[0][0] == gf.kv_offset and ranges[-1][1] == gf.kv_end_offset
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        start, end = gf.field_ranges["t.str"]
        assert blob[start + 8 : start + 8 + 5] == b"t.str"
        assert gf.tensor_info_offset == gf.kv_end_offset < gf.tensor_info_end_offset <= gf.data_offset
        assert blob[gf.tensor_info_offset + 8 : gf.tensor_info_offset + 11] == b"vec"


def test_dequantize_matches_gguf_py(sample: Path) -> None:
    with GGUFFile(sample) as gf:
        for name, info in gf.tensors.items():
            got = gf.dequantize(name)
            assert got.dtype == np.float32 and got.shape == info.shape
            raw = np.asarray(gf.raw(name)).reshape(info.shape[0] if len(info.shape) > 1 else 1, -1)
            want = gguf.quants.dequantize(raw, info.ggml_type).reshape(info.shape)
            np.testing.assert_array_equal(got, want, err_msg=name)
        values = _write_sample(sample.parent / "again.gguf")
        np.testing.assert_array_equal(gf.dequantize("f32"), values["f32"])
        assert np.abs(gf.dequantize("q4_k") - values["q4_k"]).max() < 0.5


def test_raw_is_a_zero_copy_read_only_view(sample: Path) -> None:
    gf = GGUFFile(sample)
    first, second = gf.raw("q8_0"), gf.raw("q8_0")
    assert first.dtype == np.uint8 and first.nbytes == gf.tensors["q8_0"].nbytes
    assert np.shares_memory(first, second) and not first.flags.writeable
    gf.close()
    assert first.sum() >= 0  # views outlive close()
    with pytest.raises(QeditError, match="closed"):
        gf.raw("q8_0")


# ---- broken files -------------------------------------------------------------------------------


def _patched(src: Path, dst: Path, offset: int, fmt: str, value: int) -> Path:
    blob = bytearray(src.read_bytes())
    struct.pack_into(fmt, blob, offset, value)
    dst.write_bytes(bytes(blob))
    return dst


def test_not_gguf_and_empty(tmp_path: Path) -> None:
    zip_like = tmp_path / "model.gguf"
    zip_like.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(QeditError, match=r"model\.gguf: not a GGUF file \(magic b'PK\\x03\\x04'\)"):
        GGUFFile(zip_like)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(QeditError, match="empty"):
        GGUFFile(tmp_path / "empty.gguf")
    with pytest.raises(QeditError, match="no such GGUF file"):
        GGUFFile(tmp_path / "missing.gguf")


def test_every_truncation_is_a_qedit_error(sample: Path, tmp_path: Path) -> None:
    blob = sample.read_bytes()
    with GGUFFile(sample) as gf:
        data_end = max(info.offset + info.nbytes for info in gf.tensors.values())
        header_end = gf.tensor_info_end_offset
    cut = tmp_path / "cut.gguf"
    for n in list(range(0, header_end + 1)) + [data_end - 1, data_end - 1000]:
        cut.write_bytes(blob[:n])
        with pytest.raises(QeditError, match="cut.gguf"):
            GGUFFile(cut)
    cut.write_bytes(blob[: data_end - 1])
    with pytest.raises(QeditError, match="truncated tensor data"):
        GGUFFile(cut)


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(sample: Path, tmp_path: Path, version: int) -> None:
    with pytest.raises(QeditError, match=f"unsupported GGUF version {version}"):
        GGUFFile(_patched(sample, tmp_path / "v.gguf", 4, "<I", version))


def test_corrupt_header_values(sample: Path, tmp_path: Path) -> None:
    with GGUFFile(sample) as gf:
        key_start = gf.field_ranges["t.u8"][0]
        arr_start = gf.field_ranges["t.arr_str"][0]
        info = gf.tensor_info_offset  # first tensor: "vec", 1 dim
    bad = tmp_path / "bad.gguf"
    cases = [
        (key_start + 8 + 4, "<I", 99, "unknown value type 99"),  # value type of t.u8
        (key_start, "<Q", 2**62, "truncated GGUF header"),  # key length
        (arr_start + 8 + 9 + 4 + 4, "<Q", 2**60, "absurd length"),  # array count of t.arr_str
        (arr_start + 8 + 9 + 4, "<I", 42, "unknown element type 42"),
        (8, "<Q", 2**40, "absurd tensor count"),
        (16, "<Q", 2**40, "absurd key-value count"),
        (info + 8 + 3, "<I", 5, "5 dimensions"),
        (info + 8 + 3 + 4 + 8, "<I", 99, "unknown ggml type 99"),
        (info + 8 + 3 + 4 + 8 + 4, "<Q", 7, "not a multiple of the alignment"),
    ]
    for offset, fmt, value, message in cases:
        with pytest.raises(QeditError, match=message):
            GGUFFile(_patched(sample, bad, offset, fmt, value))


def test_bad_alignment(tmp_path: Path) -> None:
    path = tmp_path / "a.gguf"
    _write_sample(path, alignment=64)
    with GGUFFile(path) as gf:
        start, end = gf.field_ranges["general.alignment"]
    with pytest.raises(QeditError, match="general.alignment is 48"):
        GGUFFile(_patched(path, tmp_path / "b.gguf", end - 4, "<I", 48))


def test_random_header_corruption_never_raises_anything_else(sample: Path, tmp_path: Path) -> None:
    blob = sample.read_bytes()
    with GGUFFile(sample) as gf:
        header_end = gf.tensor_info_end_offset
    rng = np.random.default_rng(1)
    bad = tmp_path / "fuzz.gguf"
    for _ in range(300):
        mutated = bytearray(blob)
        for pos in rng.integers(4, header_end, size=rng.integers(1, 4)):
            mutated[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(mutated))
        try:
            GGUFFile(bad).close()
        except QeditError:
            pass


# ---- the real Gemma 3 270M file -----------------------------------------------------------------


@pytest.mark.real_model
def test_gemma_header_fast_and_equal_to_gguf_reader(gemma_gguf: Path) -> None:
    start = time.perf_counter()
    gf = GGUFFile(gemma_gguf)
    assert time.perf_counter() - start < 1.0
    reader = gguf.GGUFReader(gemma_gguf)  # ~13 s
    assert gf.architecture == "gemma3"
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        types = (int(field.types[0]), int(field.types[1]) if len(field.types) > 1 else None)
        assert gf.field_types[key] == types, key
        if field.types[0] != gguf.GGUFValueType.ARRAY:
            assert gf.fields[key] == field.contents(), key
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(gf.fields["tokenizer.ggml.tokens"]) == len(tokens.data) == 262144
    for i in (0, 1, 2, 3, 106, 1000, 262143):
        assert gf.fields["tokenizer.ggml.tokens"][i] == tokens.contents(i)
    scores = reader.fields["tokenizer.ggml.scores"]
    np.testing.assert_array_equal(np.array(gf.fields["tokenizer.ggml.scores"], dtype=np.float32), scores.contents())
    assert gf.fields["tokenizer.ggml.token_type"] == reader.fields["tokenizer.ggml.token_type"].contents()
    assert [(t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in reader.tensors] == [
        (i.name, i.ggml_type, i.offset, i.nbytes) for i in gf.tensors.values()
    ]
    assert all(gf.tensors[t.name].shape == tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors)
    assert gf.data_offset == reader.data_offset
    q = gf.tensors["blk.0.ffn_down.weight"]
    np.testing.assert_array_equal(
        gf.dequantize(q.name), gguf.quants.dequantize(np.asarray(gf.raw(q.name)).reshape(q.shape[0], -1), q.ggml_type)
    )

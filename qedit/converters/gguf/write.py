"""One streaming GGUF writer, shared by the patcher and the exporter.

A file is written in one pass: the fixed header, the key-value entries (each already encoded: either
copied byte for byte from a source file's memmap, or encoded here by `encode_kv`), the tensor-info
section (offsets computed up front from each tensor's shape and type geometry), then the tensor data,
produced lazily one tensor at a time and aligned to the file's alignment. Peak memory is about one
tensor (less when a producer yields row chunks). Output goes to a temp file beside `dst` that is
renamed into place, so an error or an interrupt leaves nothing behind.

Also here, the pieces files are built from: entries copied from a source (`copied_kvs`), tensors
copied (`source_tensor`) or encoded anew in row chunks (`encoded_tensor`, `reencoded_tensor` with
deltas added), and an HF export's tokenizer entries (`tokenizer_kvs`).
"""
from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Union

import gguf
import numpy as np

from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.rows import TensorReader
from qedit.converters.gguf.vocab import vocab_kvs
from qedit.core.delta import MANIFEST_FILE
from qedit.core.errors import QeditError
from qedit.core.files import atomic_path
from qedit.core.model import fingerprint_source
from qedit.kernels import registry

if TYPE_CHECKING:
    from qedit.core.delta import LowRankDelta

log = logging.getLogger(__name__)

VT = gguf.GGUFValueType
_COPY_CHUNK = 1 << 24  # bytes per write when copying a large array or memmap slice
_ENCODE_VALUES = 1 << 22  # float32 values per row chunk when encoding (16 MB)
ENCODE_CHUNK_BYTES = 4 * _ENCODE_VALUES
_SCALAR_FORMATS: dict[VT, str] = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[VT, str] = {
    VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
    VT.FLOAT32: "<f4", VT.BOOL: "<u1", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8",
}

Chunk = Union[bytes, bytearray, memoryview, np.ndarray]
TensorData = Union[Chunk, Iterable[Chunk]]
RowReader = Callable[[int, int], np.ndarray]  # (lo, hi) -> float32 rows (hi - lo, n_cols)


@dataclass(frozen=True)
class KVEntry:
    """One encoded key-value entry: key length, key, value type, value (exactly as in the file)."""

    key: str
    data: bytes | np.ndarray  # bytes, or a uint8 memmap slice of a source file

    def __post_init__(self) -> None:
        if not self.key:
            raise QeditError("KVEntry.key: must be a non-empty metadata key")
        if isinstance(self.data, np.ndarray) and (self.data.dtype != np.uint8 or self.data.ndim != 1):
            raise QeditError(f"KVEntry {self.key!r}: data must be bytes or a 1-D uint8 array")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its header facts, and a callable producing its encoded bytes when its turn comes.

    `produce()` returns bytes / a uint8 (or any C-contiguous) array / a memmap slice, or an iterable of
    those (row chunks); the bytes in total must be exactly `nbytes`.
    """

    name: str
    shape: tuple[int, ...]  # numpy order: (rows, cols) for a 2-D weight, ggml ne reversed
    ggml_type: gguf.GGMLQuantizationType
    produce: Callable[[], TensorData]

    def __post_init__(self) -> None:
        if not self.name:
            raise QeditError("TensorSpec.name: must be a non-empty tensor name")
        if not isinstance(self.ggml_type, gguf.GGMLQuantizationType):
            raise QeditError(f"TensorSpec {self.name!r}: ggml_type must be a gguf.GGMLQuantizationType")
        tensor_nbytes(self.name, self.shape, self.ggml_type)  # validates shape against the block size

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.name, self.shape, self.ggml_type)


def tensor_nbytes(name: str, shape: Sequence[int], ggml_type: gguf.GGMLQuantizationType) -> int:
    """Encoded size of a tensor of numpy-order `shape` in `ggml_type`, from the type's block geometry."""
    dims = tuple(int(d) for d in shape)
    if not dims or len(dims) > 4 or any(d <= 0 for d in dims):
        raise QeditError(f"tensor {name!r}: shape {dims} must have 1 to 4 positive dimensions")
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    if dims[-1] % block_size:
        raise QeditError(f"tensor {name!r}: row length {dims[-1]} is not a multiple of the {ggml_type.name} "
                         f"block size {block_size}; choose another type")
    return int(np.prod(dims, dtype=np.int64)) // block_size * type_size


def _string_bytes(text: str | bytes) -> bytes:
    raw = text if isinstance(text, bytes) else text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_array(key: str, values: Sequence[object], sub_type: VT) -> bytes:
    head = struct.pack("<IQ", int(sub_type), len(values))
    if sub_type == VT.STRING:
        if not all(isinstance(v, (str, bytes)) for v in values):
            raise QeditError(f"metadata {key!r}: a string array must hold only str (or bytes) values")
        return head + b"".join(_string_bytes(v) for v in values)  # type: ignore[arg-type]
    if sub_type not in _NUMPY_DTYPES:
        raise QeditError(f"metadata {key!r}: arrays of {sub_type.name} are not supported")
    dtype = np.dtype(_NUMPY_DTYPES[sub_type])
    arr = np.asarray(values)
    if arr.ndim != 1 and len(values):
        raise QeditError(f"metadata {key!r}: array values must be a flat sequence of scalars")
    if arr.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.dtype.kind not in "iub" or arr.min() < info.min or arr.max() > info.max:
            raise QeditError(f"metadata {key!r}: values do not fit {sub_type.name} [{info.min}, {info.max}]")
    return head + arr.astype(dtype).tobytes()


def encode_kv(key: str, value: object, vtype: VT | int, sub_type: VT | int | None = None) -> KVEntry:
    """Encode one metadata entry: `vtype` is its GGUF value type, `sub_type` the element type of an ARRAY."""
    try:
        vtype = VT(vtype)
        sub = VT(sub_type) if sub_type is not None else None
    except ValueError:
        raise QeditError(f"metadata {key!r}: unknown GGUF value type {vtype!r}/{sub_type!r}") from None
    if vtype == VT.STRING:
        if not isinstance(value, (str, bytes)):
            raise QeditError(f"metadata {key!r}: expected a string, got {type(value).__name__}")
        body = _string_bytes(value)
    elif vtype == VT.ARRAY:
        if sub is None or sub == VT.ARRAY:
            raise QeditError(f"metadata {key!r}: an array needs a scalar or string element type")
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
            raise QeditError(f"metadata {key!r}: expected a sequence for an array, got {type(value).__name__}")
        body = _encode_array(key, value, sub)  # type: ignore[arg-type]
    else:
        if isinstance(value, (str, bytes)) or (vtype != VT.BOOL and isinstance(value, bool)):
            raise QeditError(f"metadata {key!r}: expected a number for {vtype.name}, got {value!r}")
        try:
            body = struct.pack(_SCALAR_FORMATS[vtype], value)
        except (struct.error, TypeError):
            raise QeditError(f"metadata {key!r}: {value!r} does not fit {vtype.name}") from None
    return KVEntry(key, _string_bytes(key) + struct.pack("<I", int(vtype)) + body)


def copied_kvs(gf: GGUFFile, keys: Iterable[str]) -> list[KVEntry]:
    """Entries of `gf`, as their exact source bytes (memmap slices: nothing is decoded or copied yet)."""
    src_map = np.memmap(gf.path, mode="r", dtype=np.uint8)  # (file_size,)
    out = []
    for key in keys:
        if key not in gf.field_ranges:
            raise QeditError(f"{gf.path.name}: no metadata key {key!r} to copy")
        lo, hi = gf.field_ranges[key]
        out.append(KVEntry(key, src_map[lo:hi]))
    return out


def source_tensor(gf: GGUFFile, name: str) -> Callable[[], TensorData]:
    """A producer that copies tensor `name` of `gf` unchanged, read with pread a chunk at a time (through the
    memory map, a copy of the whole file would stay in the resident set)."""

    def produce() -> Iterator[np.ndarray]:
        reader = TensorReader(gf)
        try:
            yield from reader.chunks(name, _COPY_CHUNK)
        finally:
            reader.close()

    return produce


def encoded_chunks(
    name: str,
    read_rows: RowReader,
    n_rows: int,
    n_cols: int,
    ggml_type: gguf.GGMLQuantizationType,
    importance: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """A tensor encoded in `ggml_type` a row chunk at a time (uint8 (chunk, row_bytes) each), so that
    only one chunk of float32 rows exists at once. Rows are independent in every ggml quantizer, so
    the bytes equal those of one whole-tensor call. `importance` is float32 (n_cols,) or None."""

    step = max(1, _ENCODE_VALUES // n_cols)
    for lo in range(0, n_rows, step):
        rows = read_rows(lo, min(n_rows, lo + step))  # (chunk, n_cols) float32
        try:
            data = registry.quantize_tensor(rows, ggml_type, importance)  # uint8 (chunk, row_bytes)
        except QeditError as exc:
            raise QeditError(f"tensor {name!r}: cannot encode it as {ggml_type.name}: {exc}") from None
        yield data


def encoded_tensor(name: str, shape: tuple[int, ...], ggml_type: gguf.GGMLQuantizationType,
                   make_reader: Callable[[], RowReader], importance: np.ndarray | None = None) -> TensorSpec:
    """A tensor encoded anew when the writer reaches it: `make_reader()` loads what it needs then (freed
    once the tensor is written) and returns a row reader; rows are encoded one chunk at a time."""
    n_cols = int(shape[-1])
    n_rows = int(np.prod(shape, dtype=np.int64)) // n_cols
    return TensorSpec(name, tuple(shape), ggml_type,
                      lambda: encoded_chunks(name, make_reader(), n_rows, n_cols, ggml_type, importance))


def reencoded_tensor(gf: GGUFFile, name: str, ggml_type: gguf.GGMLQuantizationType,
                     deltas: Sequence[LowRankDelta] = (), importance: np.ndarray | None = None) -> TensorSpec:
    """Tensor `name` of `gf` dequantized, plus the summed dW of `deltas` (each (out, in) = (rows, cols),
    already checked against it), re-encoded in `ggml_type`."""

    info = gf.info(name)
    n_cols = info.shape[-1]
    n_rows = int(np.prod(info.shape, dtype=np.int64)) // n_cols

    def make_reader() -> RowReader:
        change = sum(d.dense() for d in deltas).detach().cpu().numpy().reshape(n_rows, n_cols) if deltas else None
        reader = TensorReader(gf)   # pread: nothing of the file stays in the resident set

        def read(lo: int, hi: int) -> np.ndarray:
            rows = reader.rows(name, lo, hi)  # (hi - lo, n_cols)
            if change is not None:
                rows += change[lo:hi]  # change: (n_rows, n_cols) float32
            return rows

        return read

    return encoded_tensor(name, info.shape, ggml_type, make_reader, importance)


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _tensor_info(spec: TensorSpec, rel_offset: int) -> bytes:
    ne = tuple(reversed(spec.shape))  # ggml order: ne[0] is the row length
    return (_string_bytes(spec.name) + struct.pack(f"<I{len(ne)}Q", len(ne), *ne)
            + struct.pack("<IQ", int(spec.ggml_type), rel_offset))


def _as_bytes(chunk: Chunk) -> memoryview:
    if isinstance(chunk, np.ndarray):
        flat = np.ascontiguousarray(chunk).reshape(-1)
        return memoryview(flat.view(np.uint8))
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return memoryview(chunk).cast("B")
    raise QeditError(f"a tensor producer returned {type(chunk).__name__}; expected bytes or a numpy array")


def _chunks(data: TensorData) -> Iterator[memoryview]:
    if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
        view = _as_bytes(data)
        for lo in range(0, len(view), _COPY_CHUNK):
            yield view[lo:lo + _COPY_CHUNK]
        return
    for chunk in data:
        yield _as_bytes(chunk)


def _write_tensor(fh: BinaryIO, spec: TensorSpec, planned: int) -> None:
    written = 0
    for view in _chunks(spec.produce()):
        written += len(view)
        if written > planned:
            break
        fh.write(view)
    if written != planned:
        got = f"more than {planned}" if written > planned else str(written)
        raise QeditError(f"tensor {spec.name!r}: produced {got} bytes but {spec.ggml_type.name} {spec.shape} "
                         f"needs exactly {planned}; the encoder and the header disagree, nothing was written")


def _check_unique(kvs: Sequence[KVEntry], tensors: Sequence[TensorSpec]) -> None:
    for what, names in (("metadata key", [kv.key for kv in kvs]), ("tensor name", [t.name for t in tensors])):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise QeditError(f"GGUF writer: duplicate {what} {name!r}")
            seen.add(name)


def write_gguf(
    dst: Path,
    kvs: Sequence[KVEntry],
    tensors: Sequence[TensorSpec],
    *,
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT,
    version: int = 3,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> int:
    """Write a GGUF file atomically; returns its size in bytes.

    `alignment` must match a `general.alignment` entry in `kvs` when there is one (32 otherwise).
    `on_tensor` is called after each tensor is written (for progress bars).
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise QeditError(f"GGUF writer: alignment {alignment} must be a positive power of two")
    if version not in (2, 3):
        raise QeditError(f"GGUF writer: version {version} is not writable; use 3")
    _check_unique(kvs, tensors)
    planned = [t.nbytes for t in tensors]
    offsets, rel = [], 0
    for size in planned:
        offsets.append(rel)
        rel = _align(rel + size, alignment)
    dst = Path(dst)
    with atomic_path(dst) as tmp, open(tmp, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)))
        for kv in kvs:
            fh.writelines(_chunks(kv.data))
        fh.writelines(_tensor_info(spec, offset) for spec, offset in zip(tensors, offsets, strict=True))
        fh.write(b"\0" * (_align(fh.tell(), alignment) - fh.tell()))
        data_start = fh.tell()
        for spec, offset, size in zip(tensors, offsets, planned, strict=True):
            fh.write(b"\0" * (data_start + offset - fh.tell()))
            _write_tensor(fh, spec, size)
            if on_tensor is not None:
                on_tensor(spec)
        fh.write(b"\0" * (_align(fh.tell(), alignment) - fh.tell()))  # as llama.cpp: the last tensor is padded too
        size = fh.tell()
    log.debug("wrote %s: %d entries, %d tensors, %d bytes", dst, len(kvs), len(tensors), size)
    return size


# ---- tokenizer metadata for an export from an HF directory ------------------------------------------


def _edited_from_gguf(directory: Path) -> Path | None:
    """The GGUF a qedit output directory was edited from, if it still exists unchanged (sha256)."""

    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QeditError(f"{path}: not valid JSON ({exc}); the qedit output is corrupt") from None
    if not isinstance(info, dict) or info.get("source_kind") != "gguf" or not info.get("source"):
        return None
    source = Path(info["source"])
    source = source if source.is_absolute() or source.is_file() else directory / source
    if source.is_file() and fingerprint_source(source) == info.get("source_sha256"):
        return source
    log.warning("%s: source GGUF %s is missing or changed; building the tokenizer from the directory", path, source)
    return None


def tokenizer_kvs(directory: Path, arch: str, template: Path | None, n_vocab: int) -> tuple[list[KVEntry], str]:
    """tokenizer.* entries, copied byte for byte from a GGUF when there is one, else built by gguf_vocab."""
    source = Path(template) if template is not None else _edited_from_gguf(directory)
    if source is not None:
        with GGUFFile(source) as tf:
            tokens = tf.fields.get("tokenizer.ggml.tokens")
            if not isinstance(tokens, list):
                raise QeditError(f"{source}: has no tokenizer.ggml.tokens; give a GGUF model with a tokenizer")
            entries, n_tokens = copied_kvs(tf, [k for k in tf.fields if k.startswith("tokenizer.")]), len(tokens)
        where = f"copied from {source}"
    else:
        entries, n_tokens = [], -1
        for key, value, vtype, *sub in vocab_kvs(directory, arch):
            entries.append(encode_kv(key, value, vtype, sub[0] if sub else None))
            n_tokens = len(value) if key == "tokenizer.ggml.tokens" else n_tokens
        where = "built from the directory"
    if n_tokens != n_vocab:
        raise QeditError(f"{source or directory}: the tokenizer has {n_tokens} tokens but token_embd has {n_vocab} "
                         "rows; llama.cpp needs them equal (is the template another model's?)")
    return entries, where

"""A minimal, fast GGUF v2/v3 reader: the whole header in one pass, tensor bytes as zero-copy memmap views.

gguf-py's `GGUFReader` builds a numpy object per array element, which is slow on a 262k-token
vocabulary. This reader walks the key-value section with `struct` and decodes string arrays in a
tight loop (numeric arrays go through `np.frombuffer`), so the Gemma 3 270M header parses quickly
(benchmarks/RESULTS.md, "Loading a GGUF"). It keeps what a later writer or patcher needs: every
field's GGUF value type, and the byte ranges of the key-value section, of the tensor-info section and of each field.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import gguf
import numpy as np

from qedit.core.errors import QeditError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
_HEADER_BYTES = 24  # magic u32, version u32, tensor count u64, kv count u64

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# GGUF value type id -> (numpy dtype, struct format) of the fixed-size scalar types
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<u1", "<B"), 1: ("<i1", "<b"), 2: ("<u2", "<H"), 3: ("<i2", "<h"),
    4: ("<u4", "<I"), 5: ("<i4", "<i"), 6: ("<f4", "<f"), 7: ("<u1", "<?"),
    10: ("<u8", "<Q"), 11: ("<i8", "<q"), 12: ("<f8", "<d"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7

# split GGUFs (llama.cpp's gguf-split): "<name>-00001-of-00003.gguf", 1-based in the name, 0-based in split.no
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
_SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")

# tensor types stored as plain values; everything else is blocks for libgguf
_PLAIN_DTYPES: dict[int, str] = {0: "<f4", 1: "<f2", 24: "<i1", 25: "<i2", 26: "<i4", 27: "<i8", 28: "<f8"}
_BF16 = 30


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: where its bytes are and how they are encoded."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: reversed ggml ne, so (rows, cols) for a 2-D weight
    offset: int  # absolute byte offset in the file
    nbytes: int
    shard: int = 0  # index of the file holding it, for a split GGUF (0: the file opened)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file; every failure becomes a QeditError."""

    def __init__(self, buf: memoryview, size: int, label: str) -> None:
        self.buf, self.size, self.label, self.pos = buf, size, label, 0

    def fail(self, what: str) -> QeditError:
        return QeditError(f"{self.label}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated GGUF header: {what} at byte {self.pos} needs {n} bytes but the file has "
                f"{self.size}; the file is incomplete or corrupt, re-download or re-export it"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} is not valid UTF-8 ({err.reason}); the file is corrupt") from None


class GGUFFile:
    """A GGUF file opened read-only: parsed header plus a numpy memmap of the whole file.

    Use as `with GGUFFile(path) as gf: ...` or plainly; `close()` drops the mapping (views already
    handed out by `raw()` keep it alive until they are freed).
    """

    def __init__(self, path: str | os.PathLike[str], _shard: int | None = None) -> None:
        self.path = Path(path)
        self._label = self.path.name
        if not self.path.is_file():
            raise QeditError(f"{self.path}: no such GGUF file; check the path")
        try:
            size = self.path.stat().st_size
            head = self.path.read_bytes()[:4] if size < _HEADER_BYTES else b""
            self._map: np.memmap | None = np.memmap(self.path, mode="r", dtype=np.uint8) if size else None
        except OSError as err:
            raise QeditError(f"{self.path}: cannot read GGUF file ({err.strerror})") from None
        if size == 0:
            raise QeditError(f"{self._label}: the file is empty; expected a llama.cpp .gguf model")
        if size < _HEADER_BYTES:
            if head != GGUF_MAGIC[: len(head)]:
                raise self._not_gguf(head)
            raise QeditError(f"{self._label}: truncated GGUF file ({size} bytes, the fixed header alone is 24)")
        self.file_size = size
        self.fields: dict[str, object] = {}
        self.field_types: dict[str, tuple[int, int | None]] = {}
        self.field_ranges: dict[str, tuple[int, int]] = {}  # key -> [start, end) bytes of the whole KV entry
        self.tensors: dict[str, TensorInfo] = {}
        self._parse(_Cursor(memoryview(self._map), size, self._label))
        self._maps: list[np.memmap | None] = [self._map]
        self.shards: list[Path] = [self.path]
        self.split: dict[str, object] = {}  # split.* keys of a split file (not in `fields`: outputs are one file)
        if _shard is None and self.fields.get(SPLIT_COUNT, 1) != 1:
            self._read_shards()

    # ---- split files ------------------------------------------------------------------------------

    def _read_shards(self) -> None:
        """Merge the tensor tables of a split GGUF's shards (`name-00001-of-00003.gguf`, as llama.cpp's loader
        does): every shard is a whole GGUF whose tensor offsets are its own; the metadata is in the first one."""
        self.split = {k: self.fields.pop(k) for k in list(self.fields) if k.startswith("split.")}
        count, index, total = self.split.get(SPLIT_COUNT), self.split.get(SPLIT_NO), self.split.get(SPLIT_TENSORS)
        match = _SPLIT_NAME.match(self.path.name)
        if not isinstance(count, int) or count < 1 or match is None or int(match[3]) != count:
            raise QeditError(f"{self._label}: split.count is {count!r} but the name is not "
                             f"'<name>-00001-of-{count if isinstance(count, int) else 0:05d}.gguf'; keep the shards' "
                             "names as gguf-split wrote them")
        if index != 0:
            raise QeditError(f"{self._label}: shard {index + 1 if isinstance(index, int) else index} of a split "
                             f"GGUF; give the first shard, {match[1]}-00001-of-{count:05d}.gguf")
        for i in range(1, count):
            shard_path = self.path.with_name(f"{match[1]}-{i + 1:05d}-of-{count:05d}.gguf")
            if not shard_path.is_file():
                raise QeditError(f"{shard_path}: shard {i + 1} of {count} of {self._label} is missing; all the "
                                 "shards must sit together")
            shard = GGUFFile(shard_path, _shard=i)
            if shard.fields.get(SPLIT_NO) != i or shard.fields.get(SPLIT_COUNT) != count:
                raise QeditError(f"{shard_path.name}: split.no/split.count are {shard.fields.get(SPLIT_NO)!r}/"
                                 f"{shard.fields.get(SPLIT_COUNT)!r}, expected {i}/{count}; the shards do not belong "
                                 "together")
            for name, info in shard.tensors.items():
                if name in self.tensors:
                    raise QeditError(f"{shard_path.name}: tensor {name!r} is also in an earlier shard; the shards "
                                     "do not belong together")
                self.tensors[name] = dataclasses.replace(info, shard=i)
            self._maps.append(shard._map)
            self.shards.append(shard_path)
        if total is not None and total != len(self.tensors):
            raise QeditError(f"{self._label}: split.tensors.count is {total} but the {count} shards hold "
                             f"{len(self.tensors)} tensors; a shard is incomplete")

    def _not_gguf(self, head: bytes) -> QeditError:
        return QeditError(
            f"{self._label}: not a GGUF file (magic {head!r}); expected a llama.cpp .gguf model"
        )

    # ---- header parsing -------------------------------------------------------------------------

    def _parse(self, cur: _Cursor) -> None:
        magic = bytes(cur.buf[:4])
        if magic != GGUF_MAGIC:
            raise self._not_gguf(magic)
        cur.pos = 4
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = " (it looks big-endian, which is not supported)" if swapped in SUPPORTED_VERSIONS else ""
            raise cur.fail(
                f"unsupported GGUF version {version}{hint}; only versions 2 and 3 are read, "
                "re-convert the model with a current llama.cpp"
            )
        self.version = version
        tensor_count = cur.u64("tensor count")
        kv_count = cur.u64("key-value count")
        if kv_count * 13 > cur.size - cur.pos:  # a key-value entry takes at least 13 bytes
            raise cur.fail(f"absurd key-value count {kv_count} for a {cur.size}-byte file; the header is corrupt")
        self.kv_offset = cur.pos
        for index in range(kv_count):
            start = cur.pos
            key = cur.string(f"key of metadata entry {index}")
            if key in self.fields:
                raise cur.fail(f"duplicate metadata key {key!r}; the header is corrupt")
            vtype = cur.u32(f"value type of {key!r}")
            value, elem_type = self._read_value(cur, vtype, key)
            self.fields[key], self.field_types[key] = value, (vtype, elem_type)
            self.field_ranges[key] = (start, cur.pos)
        self.kv_end_offset = self.tensor_info_offset = cur.pos
        self.alignment = self._read_alignment(cur)
        if tensor_count * 24 > cur.size - cur.pos:  # a tensor-info entry takes at least 24 bytes
            raise cur.fail(f"absurd tensor count {tensor_count} for a {cur.size}-byte file; the header is corrupt")
        seen: set[str] = set()
        rel_infos = [self._read_tensor_info(cur, index, seen) for index in range(tensor_count)]
        self.tensor_info_end_offset = cur.pos
        align = self.alignment
        self.data_offset = (cur.pos + align - 1) // align * align
        for name, ggml_type, shape, rel_offset, nbytes in rel_infos:
            if rel_offset % align:
                raise cur.fail(f"tensor {name!r} has offset {rel_offset}, not a multiple of the alignment {align}")
            offset = self.data_offset + rel_offset
            if offset + nbytes > cur.size:
                raise cur.fail(
                    f"truncated tensor data: {name!r} needs bytes {offset}..{offset + nbytes} but the file "
                    f"has {cur.size}; the file is incomplete, re-download or re-export it"
                )
            self.tensors[name] = TensorInfo(name, ggml_type, shape, offset, nbytes)
        logger.debug("%s: GGUF v%d, %d fields, %d tensors", self._label, version, kv_count, tensor_count)

    def _read_value(self, cur: _Cursor, vtype: int, key: str) -> tuple[object, int | None]:
        """One value of type `vtype`; returns (python value, array element type or None)."""
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype][1]
            width = struct.calcsize(fmt)
            cur.need(width, f"value of {key!r}")
            (value,) = struct.unpack_from(fmt, cur.buf, cur.pos)
            cur.pos += width
            return value, None
        if vtype == _STRING:
            return cur.string(f"value of {key!r}"), None
        if vtype != _ARRAY:
            raise cur.fail(f"metadata key {key!r} has unknown value type {vtype}; the header is corrupt")
        elem_type = cur.u32(f"element type of array {key!r}")
        count = cur.u64(f"length of array {key!r}")
        min_width = np.dtype(_SCALARS[elem_type][0]).itemsize if elem_type in _SCALARS else 8
        if elem_type not in _SCALARS and elem_type not in (_STRING, _ARRAY):
            raise cur.fail(f"array {key!r} has unknown element type {elem_type}; the header is corrupt")
        if count * min_width > cur.size - cur.pos:
            raise cur.fail(f"absurd length {count} for array {key!r}; the header is corrupt or truncated")
        if elem_type in _SCALARS:
            dtype = _SCALARS[elem_type][0]
            values = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos)
            cur.pos += count * min_width
            return (values.astype(bool) if elem_type == _BOOL else values).tolist(), elem_type
        if elem_type == _STRING:
            return self._read_strings(cur, count, key), elem_type
        return [self._read_value(cur, _ARRAY, f"{key}[{i}]")[0] for i in range(count)], elem_type

    @staticmethod
    def _read_strings(cur: _Cursor, count: int, key: str) -> list[str]:
        """The hot loop for vocabularies: no per-element method calls beyond unpack and decode."""
        buf, size, pos = cur.buf, cur.size, cur.pos
        unpack = _U64.unpack_from
        out: list[str] = [""] * count
        try:
            for i in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                end = pos + n
                if end > size:
                    raise IndexError
                out[i] = str(buf[pos:end], "utf-8")
                pos = end
        except (struct.error, IndexError):
            cur.pos = pos
            raise cur.fail(f"truncated GGUF header: string array {key!r} runs past the end of the file") from None
        except UnicodeDecodeError:
            raise cur.fail(f"entry {i} of string array {key!r} is not valid UTF-8; the file is corrupt") from None
        cur.pos = pos
        return out

    def _read_alignment(self, cur: _Cursor) -> int:
        align = self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise cur.fail(f"general.alignment is {align!r}; it must be a positive power of two")
        return align

    @staticmethod
    def _read_tensor_info(
        cur: _Cursor, index: int, seen: set[str]
    ) -> tuple[str, gguf.GGMLQuantizationType, tuple[int, ...], int, int]:
        """(name, type, numpy-order shape, offset relative to the data section, byte size)."""
        name = cur.string(f"name of tensor {index}")
        if name in seen:
            raise cur.fail(f"duplicate tensor name {name!r}; the header is corrupt")
        seen.add(name)
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows at most {GGML_MAX_DIMS}")
        ne = [cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        type_id = cur.u32(f"type of tensor {name!r}")
        rel_offset = cur.u64(f"offset of tensor {name!r}")
        try:
            ggml_type = gguf.GGMLQuantizationType(type_id)
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {name!r} has unknown ggml type {type_id}; the file is corrupt or too new") from None
        n_elems = 1
        for dim in ne:
            n_elems *= dim
        if block_size > 1 and (not ne or ne[0] % block_size):
            raise cur.fail(
                f"tensor {name!r} has impossible shape {tuple(ne)} for type {ggml_type.name} "
                f"(block size {block_size}); the header is corrupt"
            )
        return name, ggml_type, tuple(reversed(ne)), rel_offset, n_elems // block_size * type_size

    # ---- access ---------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        """`general.architecture`, e.g. "gemma3"."""
        arch = self.fields.get("general.architecture")
        if not isinstance(arch, str):
            raise QeditError(f"{self._label}: metadata has no string general.architecture; not a model file")
        return arch

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise QeditError(f"{self._label}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's encoded bytes as a read-only uint8 memmap view (no copy)."""
        info = self.info(name)
        mapped = self._maps[info.shard]
        if mapped is None:
            raise QeditError(f"{self._label}: the GGUFFile was closed; open it again to read tensors")
        return mapped[info.offset : info.offset + info.nbytes]

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy order. F32 tensors come back as a read-only view."""
        info = self.info(name)
        if info.ggml_type == gguf.GGMLQuantizationType.F32:
            return self.raw(name).view(np.float32).reshape(info.shape)  # shape: info.shape
        out = np.empty(info.shape, dtype=np.float32)
        self.dequantize_into(name, out)
        return out

    def dequantize_into(self, name: str, out: np.ndarray) -> None:
        """Decode the tensor into `out`, a C-contiguous float32 array of `info.shape` elements."""
        info = self.info(name)
        n_elems = int(np.prod(info.shape, dtype=np.int64))
        if out.dtype != np.float32 or out.size != n_elems or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of {n_elems} elements")
        decode_into(info.ggml_type, self.raw(name), out, info.shape[-1], f"{self._label}: {name!r}")

    def close(self) -> None:
        """Drop the file mapping; later `raw()` calls raise. Existing views stay valid."""
        self._map = None
        self._maps = [None] * len(self._maps)

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.fields)} fields, {len(self.tensors)} tensors)"


def decode_into(ggml_type: gguf.GGMLQuantizationType, raw: np.ndarray, out: np.ndarray, n_per_row: int,
                what: str) -> None:
    """Decode whole rows of `n_per_row` values, `raw` (uint8) of `ggml_type`, into `out` (C-contiguous float32)."""
    type_id, flat = int(ggml_type), out.reshape(-1)  # (n_elems,), a view since out is contiguous
    if type_id in _PLAIN_DTYPES:
        flat[...] = raw.reshape(-1).view(_PLAIN_DTYPES[type_id])
    elif type_id == _BF16:
        flat.view(np.uint32)[...] = raw.reshape(-1).view("<u2").astype(np.uint32) << 16
    elif flat.size:
        import libgguf  # native dequantizer, imported only when a quantized tensor is read

        n_rows = flat.size // n_per_row
        try:
            libgguf.dequantize_rows_into_raw(type_id, raw.reshape(n_rows, -1), flat, n_rows, n_per_row)
        except ValueError as err:
            raise QeditError(f"{what}: cannot dequantize {ggml_type.name} data: {err}") from None

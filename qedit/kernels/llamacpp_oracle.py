"""Verification only: run llama.cpp's own quantizer (llama-cpp-python) on a GGUF file.

The golden tests and the kernel benchmark compare qedit's registry with this oracle. qedit never
uses it to produce outputs (the registry is the only quantization path). llama_cpp is imported
when a function runs, so this module imports without it.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qedit.core.errors import QeditError


@dataclass(frozen=True)
class MetaValue:
    """One GGUF key/value as GGUFWriter.add_key_value wants it."""

    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None

    def __post_init__(self) -> None:
        if self.vtype == gguf.GGUFValueType.ARRAY and self.sub_type is None:
            raise QeditError("MetaValue.sub_type: an ARRAY value needs the element type")


def metadata_from_reader(reader: gguf.GGUFReader, *, skip_prefixes: tuple[str, ...] = ()) -> dict[str, MetaValue]:
    """Key/values of an opened GGUF, minus the GGUF.* header fields and any skipped prefixes."""
    out: dict[str, MetaValue] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith(skip_prefixes):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        out[key] = MetaValue(field.contents(), main, sub)
    return out


def write_f32_gguf(path: Path, arch: str, metadata: Mapping[str, MetaValue], tensors: Mapping[str, np.ndarray]) -> None:
    """Write a GGUF with `metadata` and float32 tensors (numpy shapes), atomically.

    general.architecture comes from `arch`; general.file_type is set to ALL_F32.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch)
        for key, meta in metadata.items():
            if key in ("general.architecture", "general.file_type"):
                continue
            writer.add_key_value(key, meta.value, meta.vtype, meta.sub_type)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        for name, array in tensors.items():
            if array.dtype != np.float32:
                raise QeditError(f"write_f32_gguf: tensor {name!r} is {array.dtype}, expected float32")
            writer.add_tensor(name, np.ascontiguousarray(array))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def llama_quantize(
    src: Path,
    dst: Path,
    ftype: gguf.LlamaFileType,
    *,
    pure: bool = False,
    nthread: int = 0,
    importance: Mapping[str, np.ndarray] | None = None,
) -> float:
    """llama_model_quantize(src -> dst) for `ftype`; returns the wall time in seconds.

    importance: tensor name -> float32 (n_cols,) imatrix passed to llama.cpp as its imatrix data.
    """
    import llama_cpp  # optional dependency, verification only

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.pure = pure
    params.nthread = nthread
    keep: list[Any] = []  # ctypes buffers must outlive the call
    if importance:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (name, vec) in enumerate(importance.items()):
            data = np.ascontiguousarray(vec, dtype=np.float32)
            keep += [data, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = data.size
        entries[len(importance)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    start = time.perf_counter()
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    elapsed = time.perf_counter() - start
    if status != 0:
        raise QeditError(f"llama_model_quantize {src} -> {dst} ({ftype.name}) failed with status {status}; "
                         "see llama.cpp's log above")
    return elapsed


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored in a GGUF file."""

    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (..., n_rows, n_cols)
    data: np.ndarray  # uint8, flat


def read_raw_tensors(path: Path) -> dict[str, RawTensor]:
    """Every tensor of a GGUF file, as raw bytes (copied, so the file can be deleted)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = RawTensor(gguf.GGMLQuantizationType(int(t.tensor_type)), shape,
                                np.array(t.data, copy=True).view(np.uint8).reshape(-1))
    return out

"""Low-level row quantization backed by libgguf (byte-identical to llama.cpp's ggml quantizers).

Everything here works on validated, C-contiguous arrays; validation and error messages live in
`qedit.kernels.registry`. Nobody outside `qedit.kernels` should import this module: the registry is
the single place where qedit quantizes.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import gguf
import libgguf
import numpy as np

GGMLQuantizationType = gguf.GGMLQuantizationType

# Storage types are plain element arrays; libgguf cannot dequantize them, numpy does it.
STORAGE_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
)

# Below this many values per worker, thread start-up costs more than it saves.
_MIN_VALUES_PER_THREAD = 1 << 16


def block_geometry(ggml_type: GGMLQuantizationType) -> tuple[int, int]:
    """(values per block, bytes per block) from gguf-py's size table (the same table as ggml's)."""
    return gguf.GGML_QUANT_SIZES[ggml_type]


def libgguf_row_bytes(ggml_type: GGMLQuantizationType, n_cols: int) -> int:
    """libgguf's own row size, 0 when it cannot encode rows of this length (used to cross-check)."""
    return int(libgguf.row_size(int(ggml_type), int(n_cols)))


def default_threads() -> int:
    """Worker threads to use when the caller does not say: one per CPU the process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _row_chunks(n_rows: int, n_cols: int, n_threads: int) -> list[tuple[int, int]]:
    """Split rows [0, n_rows) into at most n_threads contiguous [start, stop) ranges."""
    by_size = max(1, (n_rows * n_cols) // _MIN_VALUES_PER_THREAD)
    n_chunks = max(1, min(n_threads, n_rows, by_size))
    bounds = np.linspace(0, n_rows, n_chunks + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def quantize_rows(
    ggml_type: GGMLQuantizationType,
    rows: np.ndarray,
    importance: np.ndarray | None,
    row_bytes: int,
    n_threads: int,
) -> np.ndarray:
    """Encode validated rows.

    rows: float32 (n_rows, n_cols), C-contiguous, finite; n_cols a multiple of the block size.
    importance: float32 (n_cols,) or None (llama.cpp imatrix: per input column, mean of squared
    activations). Rows are independent in every ggml quantizer, so splitting them across threads
    gives the same bytes as one call. Returns uint8 (n_rows, row_bytes).
    """
    n_rows, n_cols = rows.shape
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)  # (n_rows, row_bytes)
    if n_rows == 0:
        return out
    chunks = _row_chunks(n_rows, n_cols, n_threads)

    def encode(chunk: tuple[int, int]) -> None:
        start, stop = chunk
        libgguf.quantize_rows_into_raw(
            int(ggml_type), rows[start:stop], out[start:stop], stop - start, n_cols, importance
        )

    if len(chunks) == 1:
        encode(chunks[0])
    else:  # libgguf releases the GIL while it encodes
        with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
            list(pool.map(encode, chunks))
    return out


def dequantize_rows(ggml_type: GGMLQuantizationType, raw: np.ndarray, n_cols: int) -> np.ndarray:
    """Decode validated raw rows: uint8 (n_rows, row_bytes), C-contiguous -> float32 (n_rows, n_cols)."""
    n_rows = raw.shape[0]
    if ggml_type == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(n_rows, n_cols).copy()
    if ggml_type == GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(n_rows, n_cols).astype(np.float32)
    if ggml_type == GGMLQuantizationType.BF16:
        # bf16 is the top half of an f32: widen each uint16 to the high 16 bits.
        halves = raw.view(np.uint16).reshape(n_rows, n_cols)  # (n_rows, n_cols)
        return (halves.astype(np.uint32) << 16).view(np.float32)
    out = np.empty((n_rows, n_cols), dtype=np.float32)  # (n_rows, n_cols)
    if n_rows:
        libgguf.dequantize_rows_into_raw(int(ggml_type), raw, out, n_rows, n_cols)
    return out

"""GGUF tensor data read with pread, never through the file's memory map: whole tensors, row ranges, rows by
index and byte chunks for copying.

Pages touched through a memory map stay in the process's resident set until unmapped, so copying or decoding
a 7 GB file through its map grows the RSS by 7 GB. A pread copies into a buffer of the caller's size instead;
the kernel's page cache keeps the file's pages outside the process. Every row of a GGUF tensor is
independently decodable (its blocks never span rows), so a row range or a set of rows (an embedding's looked-up
tokens, a chunk of the LM head) is decoded without the rest of the tensor.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from qedit.converters.gguf.read import GGUFFile, TensorInfo, decode_into
from qedit.core.memory import pread_into

COPY_CHUNK = 1 << 24  # bytes per pread when copying a tensor


class TensorReader:
    """pread access to the tensors of `gf` (every shard of a split file). `close()` closes the descriptors."""

    def __init__(self, gf: GGUFFile) -> None:
        self.gf = gf
        self._fds: list[int] = [os.open(path, os.O_RDONLY) for path in gf.shards]

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    def geometry(self, name: str) -> tuple[TensorInfo, int, int, int]:
        """(info, n_rows, n_cols, bytes per row) of tensor `name`."""
        info = self.gf.info(name)
        n_cols = int(info.shape[-1])
        n_rows = int(np.prod(info.shape, dtype=np.int64)) // n_cols
        return info, n_rows, n_cols, info.nbytes // max(1, n_rows)

    def raw_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """The encoded rows [lo, hi) of `name`: uint8 (hi - lo, row_bytes), a fresh buffer."""
        info, n_rows, _, row_bytes = self.geometry(name)
        if not 0 <= lo <= hi <= n_rows:
            raise IndexError(f"{name}: rows [{lo}, {hi}) out of range (it has {n_rows})")
        out = np.empty((hi - lo, row_bytes), dtype=np.uint8)                 # (hi - lo, row_bytes)
        if hi > lo:
            pread_into(self._fds[info.shard], memoryview(out).cast("B"), info.offset + lo * row_bytes)
        return out

    def _decoded(self, name: str, raw: np.ndarray) -> np.ndarray:
        """Encoded rows (n, row_bytes) of `name` -> float32 (n, n_cols), in a buffer from torch's allocator: aligned as
        every torch tensor is, so that a product over a decoded matrix takes the same kernel path (and gives the
        same bits) whichever way the matrix was decoded."""
        info, _, n_cols, _ = self.geometry(name)
        out = torch.empty((raw.shape[0], n_cols), dtype=torch.float32, device="cpu").numpy()   # (n, n_cols), host
        decode_into(info.ggml_type, raw, out, n_cols, f"{self.gf.path.name}: {name!r}")
        return out

    def rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of `name` decoded: float32 (hi - lo, n_cols)."""
        return self._decoded(name, self.raw_rows(name, lo, hi))

    def row_ids(self, name: str, ids: Sequence[int]) -> np.ndarray:
        """Rows `ids` (sorted, distinct) of `name` decoded: float32 (len(ids), n_cols). Runs of consecutive ids are
        read with one pread each."""
        *_, row_bytes = self.geometry(name)
        parts, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                parts.append(self.raw_rows(name, ids[start], ids[i - 1] + 1))
                start = i
        raw = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.empty((0, row_bytes), np.uint8)
        return self._decoded(name, raw)

    def tensor(self, name: str) -> np.ndarray:
        """The whole tensor decoded: float32 of its numpy-order shape."""
        info, n_rows, _, _ = self.geometry(name)
        return self.rows(name, 0, n_rows).reshape(info.shape)

    def chunks(self, name: str, size: int = COPY_CHUNK) -> Iterator[np.ndarray]:
        """The tensor's encoded bytes, `size` bytes at a time (one reused buffer: write each chunk before the next)."""
        info = self.gf.info(name)
        buffer = np.empty(min(size, info.nbytes), dtype=np.uint8)
        for lo in range(0, info.nbytes, size):
            view = buffer[: min(size, info.nbytes - lo)]
            pread_into(self._fds[info.shard], memoryview(view).cast("B"), info.offset + lo)
            yield view


def same_tensor_data(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when two GGUF files hold the same tensors (names, types, shapes and bytes), whatever their
    metadata: e.g. a Q4_K_M export of a Q4_K_M file, whose every tensor is copied. Compared a chunk at a time
    with pread (through the memory maps both files would end up in the resident set)."""
    with GGUFFile(a) as fa, GGUFFile(b) as fb:
        if fa.tensors.keys() != fb.tensors.keys():
            return False
        for name, info in fa.tensors.items():
            other = fb.tensors[name]
            if (info.ggml_type, info.shape) != (other.ggml_type, other.shape):
                return False
        ra, rb = TensorReader(fa), TensorReader(fb)
        try:
            return all(np.array_equal(x, y) for name in fa.tensors
                       for x, y in zip(ra.chunks(name), rb.chunks(name)))
        finally:
            ra.close()
            rb.close()

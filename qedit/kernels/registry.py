"""The quant-type registry: THE single place where qedit turns float32 weights into GGUF bytes.

Keys are `gguf.GGMLQuantizationType` (the GGUF type ids). Every entry is a frozen `QuantKernel` that
knows its block geometry and whether it uses an importance vector, and encodes/decodes rows
byte-identically to llama.cpp (via libgguf).

Importance vectors follow llama.cpp's imatrix semantics: one float per input column (n_cols), the
mean of the squared activations that column sees. `None` means "no imatrix", which in llama.cpp is
NOT the same as all-ones (several types then use their reference quantizer). A later edit-aware
scheme only has to compute a different vector and pass it through `quantize_tensor`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from qedit.core.errors import QeditError
from qedit.kernels import gguf_quants
from qedit.kernels.gguf_quants import GGMLQuantizationType

logger = logging.getLogger(__name__)

T = GGMLQuantizationType

# type -> does its ggml quantizer read an importance vector? (checked against libgguf in the tests)
_USES_IMPORTANCE: MappingProxyType[GGMLQuantizationType, bool] = MappingProxyType({
    T.F32: False, T.F16: False, T.BF16: False,
    T.Q8_0: False,
    T.Q4_0: True, T.Q4_1: True, T.Q5_0: True, T.Q5_1: True,
    T.Q2_K: True, T.Q3_K: True, T.Q4_K: True, T.Q5_K: True, T.Q6_K: True,
    T.IQ4_NL: True, T.IQ4_XS: True,
})

# llama.cpp's tensor_type_fallback: what to use when n_cols is not a multiple of the block size.
_FALLBACK: MappingProxyType[GGMLQuantizationType, GGMLQuantizationType] = MappingProxyType({
    T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
})


def supported_types() -> tuple[GGMLQuantizationType, ...]:
    """Every type the registry can quantize and dequantize, in GGUF id order."""
    return tuple(sorted(_USES_IMPORTANCE))


def as_type(ggml_type: GGMLQuantizationType | int | str, what: str = "ggml_type") -> GGMLQuantizationType:
    """Accept a GGMLQuantizationType, its integer id or its name ("Q4_K", case-insensitive)."""
    if isinstance(ggml_type, str):
        try:
            return T[ggml_type.strip().upper()]
        except KeyError:
            raise QeditError(f"{what}: unknown GGML type name {ggml_type!r}; use one of "
                             f"{', '.join(t.name for t in supported_types())}") from None
    try:
        return T(int(ggml_type))
    except (ValueError, TypeError):
        raise QeditError(f"{what}: {ggml_type!r} is not a GGUF type id") from None


@dataclass(frozen=True)
class QuantKernel:
    """One GGUF tensor type: block geometry plus llama.cpp-exact quantize/dequantize."""

    ggml_type: GGMLQuantizationType
    block_size: int  # values per block
    type_size: int  # bytes per block
    uses_importance: bool  # whether `importance` changes the output

    def __post_init__(self) -> None:
        if not isinstance(self.ggml_type, GGMLQuantizationType):
            raise QeditError(f"QuantKernel.ggml_type: expected gguf.GGMLQuantizationType, got {self.ggml_type!r}")
        if self.ggml_type not in _USES_IMPORTANCE:
            raise QeditError(f"QuantKernel.ggml_type: {self.ggml_type.name} is not in the registry")
        if (self.block_size, self.type_size) != gguf_quants.block_geometry(self.ggml_type):
            raise QeditError(
                f"QuantKernel.block_size/type_size: ({self.block_size}, {self.type_size}) does not match "
                f"the GGUF size table {gguf_quants.block_geometry(self.ggml_type)} for {self.ggml_type.name}"
            )

    @property
    def name(self) -> str:
        return self.ggml_type.name

    def fits(self, n_cols: int) -> bool:
        """True when rows of n_cols values can be stored in this type."""
        return n_cols > 0 and n_cols % self.block_size == 0

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one encoded row of n_cols values."""
        self._check_n_cols(n_cols, "n_cols")
        return n_cols // self.block_size * self.type_size

    def quantize(
        self,
        rows: np.ndarray,
        importance: np.ndarray | None = None,
        *,
        n_threads: int | None = None,
    ) -> np.ndarray:
        """rows float32 (n_rows, n_cols), importance float32 (n_cols,) | None -> uint8 (n_rows, row_bytes).

        The input is never modified. Raises QeditError on a wrong dtype/shape, non-finite values, or
        an n_cols that is not a multiple of the block size (see `resolve_type` for the fallback).
        """
        if not isinstance(rows, np.ndarray) or rows.dtype != np.float32:
            got = rows.dtype if isinstance(rows, np.ndarray) else type(rows).__name__
            raise QeditError(f"quantize {self.name}: rows must be a float32 numpy array, got {got}; "
                             "convert with .astype(np.float32)")
        if rows.ndim != 2:
            raise QeditError(f"quantize {self.name}: rows must be 2-D (n_rows, n_cols), got shape {rows.shape}; "
                             "reshape it or use quantize_tensor")
        n_cols = rows.shape[1]
        self._check_n_cols(n_cols, "rows.shape[1]")
        if not _all_finite(rows):
            raise QeditError(f"quantize {self.name}: rows contain NaN or Inf; fix the weights before quantizing")
        weights = self._check_importance(importance, n_cols)
        if n_threads is not None and n_threads < 1:
            raise QeditError(f"quantize {self.name}: n_threads must be >= 1, got {n_threads}")
        threads = gguf_quants.default_threads() if n_threads is None else n_threads
        src = np.ascontiguousarray(rows)  # (n_rows, n_cols)
        return gguf_quants.quantize_rows(self.ggml_type, src, weights, self.row_bytes(n_cols), threads)

    def dequantize(self, raw: np.ndarray | bytes | bytearray | memoryview, shape: Sequence[int]) -> np.ndarray:
        """raw uint8 (n_rows, row_bytes) or flat bytes -> float32 array of `shape` (last dim = n_cols)."""
        dims = check_shape(shape, f"dequantize {self.name}")
        n_cols = dims[-1]
        self._check_n_cols(n_cols, "shape[-1]")
        n_rows = int(np.prod(dims[:-1], dtype=np.int64))
        if isinstance(raw, (bytes, bytearray, memoryview)):
            raw = np.frombuffer(raw, dtype=np.uint8)
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
            got = raw.dtype if isinstance(raw, np.ndarray) else type(raw).__name__
            raise QeditError(f"dequantize {self.name}: raw must be a uint8 numpy array or bytes, got {got}")
        row_bytes = self.row_bytes(n_cols)
        if raw.size != n_rows * row_bytes or (raw.ndim > 1 and raw.shape[-1] != row_bytes):
            raise QeditError(
                f"dequantize {self.name}: raw has shape {raw.shape} ({raw.size} bytes) but shape {dims} needs "
                f"{n_rows} rows of {row_bytes} bytes; check the tensor's type and shape"
            )
        rows = np.ascontiguousarray(raw).reshape(n_rows, row_bytes)  # (n_rows, row_bytes)
        return gguf_quants.dequantize_rows(self.ggml_type, rows, n_cols).reshape(dims)

    def _check_n_cols(self, n_cols: int, field: str) -> None:
        if n_cols <= 0:
            raise QeditError(f"{self.name}: {field} must be positive, got {n_cols}")
        if n_cols % self.block_size:
            raise QeditError(
                f"{self.name}: {field} = {n_cols} is not a multiple of the block size {self.block_size}; "
                "pick a type with resolve_type() or quantize_with_fallback()"
            )

    def _check_importance(self, importance: np.ndarray | None, n_cols: int) -> np.ndarray | None:
        if importance is None:
            return None
        if not isinstance(importance, np.ndarray) or importance.dtype != np.float32:
            got = importance.dtype if isinstance(importance, np.ndarray) else type(importance).__name__
            raise QeditError(f"quantize {self.name}: importance must be a float32 numpy array, got {got}")
        if importance.shape != (n_cols,):
            raise QeditError(f"quantize {self.name}: importance must have shape ({n_cols},) (one value per "
                             f"input column), got {importance.shape}")
        if not _all_finite(importance) or (importance < 0).any():
            raise QeditError(f"quantize {self.name}: importance must be finite and >= 0 "
                             "(mean of squared activations per column)")
        if not self.uses_importance:
            logger.debug("%s ignores the importance vector", self.name)
            return None
        return np.ascontiguousarray(importance)


def _all_finite(values: np.ndarray) -> bool:
    """No NaN/Inf anywhere."""
    return bool(np.isfinite(values).all())


def check_shape(shape: Sequence[int], where: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError:
        raise QeditError(f"{where}: shape must be a sequence of ints, got {shape!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise QeditError(f"{where}: shape must be non-empty with positive sizes, got {dims}")
    return dims


def get_kernel(ggml_type: GGMLQuantizationType | int | str) -> QuantKernel:
    """The registry entry for a GGUF type (enum member, integer id or name)."""
    qtype = as_type(ggml_type)
    if qtype not in _USES_IMPORTANCE:
        raise QeditError(f"ggml_type: {qtype.name} is not supported by qedit's quantizer; use one of "
                         f"{', '.join(t.name for t in supported_types())}")
    block_size, type_size = gguf_quants.block_geometry(qtype)
    return QuantKernel(qtype, block_size, type_size, _USES_IMPORTANCE[qtype])


def resolve_type(
    requested: GGMLQuantizationType | int | str,
    n_cols: int,
    *,
    tensor_name: str = "",
) -> tuple[GGMLQuantizationType, str | None]:
    """The type llama.cpp would actually store for rows of n_cols values: (type, reason or None).

    Like llama.cpp's tensor_type_fallback: 256-blocks fall back to a 32-block type (Q2_K/Q3_K -> Q4_0,
    Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL), and anything that still does not fit
    becomes F16. A fallback is logged (INFO) and its reason returned, for the caller to report.
    """
    kernel = get_kernel(requested)
    if n_cols <= 0:
        raise QeditError(f"resolve_type: n_cols must be positive, got {n_cols}")
    if kernel.fits(n_cols):
        return kernel.ggml_type, None
    actual = _FALLBACK.get(kernel.ggml_type, kernel.ggml_type)
    if not get_kernel(actual).fits(n_cols):
        actual = T.F16
    label = f"{tensor_name}: " if tensor_name else ""
    reason = (f"{label}row length {n_cols} is not a multiple of {kernel.block_size} "
              f"(required by {kernel.name}); falling back to {actual.name}")
    logger.info("%s", reason)
    return actual, reason


@dataclass(frozen=True)
class QuantizedTensor:
    """Encoded rows plus the type they are actually in (may differ from the requested type)."""

    ggml_type: GGMLQuantizationType
    data: np.ndarray  # uint8 (n_rows, row_bytes)
    fallback_reason: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ggml_type, GGMLQuantizationType):
            raise QeditError(f"QuantizedTensor.ggml_type: expected GGMLQuantizationType, got {self.ggml_type!r}")
        if not isinstance(self.data, np.ndarray) or self.data.dtype != np.uint8 or self.data.ndim != 2:
            raise QeditError("QuantizedTensor.data: expected a 2-D uint8 array (n_rows, row_bytes)")


def _as_rows(weight: np.ndarray, where: str) -> np.ndarray:
    """weight (..., n_cols) -> view (n_rows, n_cols); 1-D tensors become one row."""
    if not isinstance(weight, np.ndarray):
        raise QeditError(f"{where}: weight must be a numpy array, got {type(weight).__name__}")
    if weight.ndim == 0 or weight.size == 0:
        raise QeditError(f"{where}: weight must have at least one dimension and one value, got shape {weight.shape}")
    return weight.reshape(-1, weight.shape[-1])


def quantize_tensor(
    weight: np.ndarray,
    ggml_type: GGMLQuantizationType | int | str,
    importance: np.ndarray | None = None,
    *,
    n_threads: int | None = None,
) -> np.ndarray:
    """weight float32 (..., n_cols) -> uint8 (n_rows, row_bytes) in exactly `ggml_type`.

    Strict: a row length that does not fit the type raises QeditError (use quantize_with_fallback
    to get llama.cpp's fallback, which also tells you which type you got).
    """
    kernel = get_kernel(ggml_type)
    return kernel.quantize(_as_rows(weight, f"quantize_tensor {kernel.name}"), importance, n_threads=n_threads)


def quantize_with_fallback(
    weight: np.ndarray,
    requested: GGMLQuantizationType | int | str,
    importance: np.ndarray | None = None,
    *,
    tensor_name: str = "",
    n_threads: int | None = None,
) -> QuantizedTensor:
    """Like quantize_tensor, but falls back the way llama.cpp does when n_cols does not fit."""
    rows = _as_rows(weight, f"quantize_with_fallback {tensor_name}".rstrip())
    actual, reason = resolve_type(requested, rows.shape[1], tensor_name=tensor_name)
    data = get_kernel(actual).quantize(rows, importance, n_threads=n_threads)
    return QuantizedTensor(actual, data, reason)


def dequantize_tensor(
    raw: np.ndarray | bytes | bytearray | memoryview,
    ggml_type: GGMLQuantizationType | int | str,
    shape: Sequence[int],
) -> np.ndarray:
    """raw GGUF tensor bytes of `ggml_type` -> float32 array of `shape` (numpy order, last dim = row)."""
    return get_kernel(ggml_type).dequantize(raw, shape)

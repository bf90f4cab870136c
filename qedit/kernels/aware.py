"""Edit-aware quantization of one edited tensor.

When a quantized GGUF is patched, the edited tensor Wt = W0 + dW (W0 dequantized from the file) is
requantized to the grid W0 came from, and a small dW largely rounds back to W0. `quantize_edited`
chooses the values of the same block format so that the quantized weight keeps Wt's outputs at the
edit keys K (n, in), with three mechanisms that can be switched on and off one by one (and a fourth, off):

1. Importance (llama.cpp imatrix semantics, one weight per input column): diag(C) + lambda * sum_i k_i^2,
   each term normalised to mean 1 over the columns, so `key_weight` = lambda is the keys' share
   against the whole key covariance C (the identity when no C is given).
2. GPTQ-style error feedback inside the block format. GGUF blocks are independent along a row, so a
   column slab W[:, j:j+B] (B = the block size) quantized as its own matrix gives exactly the bytes
   of those blocks in the full row. Slabs are quantized in order and each slab's error is pushed onto
   the columns not yet quantized with the upper Cholesky factor of H^-1, H = C + lambda K^T K (both
   normalised as above), in GPTQ's lazy batches. The row bytes are the slab bytes side by side.
3. Quantization in the loop: after quantizing, the residual at the keys R = (Wt - Wq) K^T gets the
   least-norm correction D with D K^T = R, which is added to the running pre-quantization weight (not
   to the quantized one, where small corrections round back); requantize, up to `loop_rounds` times,
   stop once the share kept is within `tol` of 1, and keep the best round. The norm is H's by default,
   D = R (K H^-1 K^T)^-1 K H^-1 (the least damage to outputs on the key distribution); "euclid" gives
   R (K K^T + eps I)^-1 K, which does more damage to the outputs on the key distribution than H's norm
   (what each mechanism keeps, and the output error: benchmarks/RESULTS.md, "The encoding on one tensor").

4. Keeping the file's blocks (a patch; off by default): given the bytes W0 came from, each block of the
   result is the file's own block wherever that represents the running target at least as well (error
   weighted by diag(C) + lambda * k^2). The K-quant searches do not map deq(bytes) back to the same
   bytes: a zero edit re-encoded plainly already changes some of the edited tensors' weights and flips the
   top-1 answer of a few unrelated prompts in llama.cpp. With this a zero edit gives the file's bytes back,
   but for real edits it moves only slightly fewer weights, the loop needs more rounds on coarse grids,
   and locality was no better (benchmarks/RESULTS.md, "The locality noise floor").

The output is the bytes of the requested type; llama.cpp reads them unchanged.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qedit.core.errors import QeditError
from qedit.kernels.gguf_quants import GGMLQuantizationType
from qedit.kernels.registry import QuantKernel, get_kernel

log = logging.getLogger(__name__)

T = GGMLQuantizationType

# Types whose ggml quantizer, when given an importance vector, weighs each value with the mean square
# of the WHOLE row (sigma2 in quantize_row_q4_0_impl & co.); every other type uses its own block only.
# A slab of these types is padded so that the quantizer sees the row's sigma2 (see pad_to_sigma2).
ROW_SIGMA_TYPES: frozenset[GGMLQuantizationType] = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1})
_LAZY_BATCH = 256  # columns per GPTQ lazy batch (rounded up to a multiple of the block size)
LOOP_METRICS = ("hessian", "euclid")
_PAD_SEARCH = 256  # neighbouring floats tried each way for the pad's last value
_FINITE_CHUNK = 1 << 22  # elements per finiteness check of an input matrix


@dataclass(frozen=True)
class AwareConfig:
    """How `quantize_edited` chooses the quantized values."""

    key_weight: float = 0.1       # lambda: the edit keys' weight against the key covariance C (both mean-1)
    importance: bool = True       # pass diag(C) + lambda * sum_i k_i^2 as the quantizer's imatrix
    error_feedback: bool = True   # GPTQ-style slab-by-slab error feedback with H = C + lambda K^T K
    loop_rounds: int = 6          # requantizations with an accumulated correction at the keys; 0 = off
    loop_metric: str = "hessian"  # the correction's norm: "hessian" (least output damage, H) or "euclid"
    tol: float = 0.005            # stop the loop once |1 - kept| <= tol
    damp: float = 0.01            # GPTQ damping, a share of mean(diag(H)) added to H's diagonal
    keep_blocks: bool = False     # with the file's bytes (a patch): keep each block that fits at least as well

    def __post_init__(self) -> None:
        for name in ("importance", "error_feedback", "keep_blocks"):
            if not isinstance(getattr(self, name), bool):
                raise QeditError(f"AwareConfig.{name}: must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.loop_rounds, int) or isinstance(self.loop_rounds, bool) or self.loop_rounds < 0:
            raise QeditError(f"AwareConfig.loop_rounds: must be an integer >= 0 (0 = no loop), "
                             f"got {self.loop_rounds!r}")
        checks = (("key_weight", 0.0, math.inf), ("tol", 0.0, 1.0), ("damp", 0.0, 1.0))
        for name, low, high in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise QeditError(f"AwareConfig.{name}: must be a finite number in [{low}, {high}], got {value!r}")
        if self.loop_metric not in LOOP_METRICS:
            raise QeditError(f"AwareConfig.loop_metric: must be one of {LOOP_METRICS}, got {self.loop_metric!r}")
        if (self.error_feedback or self.loop_metric == "hessian") and self.damp <= 0:
            raise QeditError("AwareConfig.damp: must be > 0 when H is used (error_feedback or loop_metric 'hessian')")


@dataclass(frozen=True)
class AwareResult:
    """The encoded tensor and how much of the edit it keeps along the keys."""

    data: np.ndarray                 # uint8 (out, row_bytes): the GGUF tensor bytes
    ggml_type: GGMLQuantizationType
    kept: float                      # share of the intended output change along the keys kept
    kept_naive: float                # the same for plain requantization of Wt (no importance)
    rounds: int                      # loop rounds run (requantizations after the first)
    residual: float                  # ||(Wt - Wq) K^T|| / ||(Wt - W0) K^T||
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.data, np.ndarray) or self.data.dtype != np.uint8 or self.data.ndim != 2:
            raise QeditError("AwareResult.data: expected a 2-D uint8 array (out, row_bytes)")
        if not isinstance(self.ggml_type, GGMLQuantizationType):
            raise QeditError(f"AwareResult.ggml_type: expected a GGMLQuantizationType, got {self.ggml_type!r}")


def kept_share(w0: np.ndarray, w_target: np.ndarray, w_quant: np.ndarray, keys: np.ndarray) -> float:
    """<(Wq - W0) K^T, (Wt - W0) K^T> / ||(Wt - W0) K^T||^2; NaN when Wt - W0 is zero at the keys.

    w0, w_target, w_quant (out, in); keys (n, in).
    """
    k = np.asarray(keys, dtype=np.float64)                                     # (n, in)
    base = np.asarray(w0, dtype=np.float64)                                    # (out, in)
    want = (np.asarray(w_target, dtype=np.float64) - base) @ k.T               # (out, n)
    got = (np.asarray(w_quant, dtype=np.float64) - base) @ k.T                 # (out, n)
    denom = float(np.sum(want * want))
    return float(np.sum(got * want) / denom) if denom > 0 else float("nan")


def edit_importance(keys: np.ndarray, cov: np.ndarray | None, key_weight: float) -> np.ndarray:
    """keys (n, in), cov (in, in) | None -> float32 (in,): diag(C)/mean + lambda * sum_i k_i^2 / mean."""
    k = np.asarray(keys, dtype=np.float64)                                     # (n, in)
    n_in = k.shape[1]
    diag = np.ones(n_in) if cov is None else np.clip(np.diag(cov).astype(np.float64), 0.0, None)
    energy = np.sum(k * k, axis=0)                                             # (in,)
    out = diag / max(float(diag.mean()), 1e-30) + key_weight * energy / max(float(energy.mean()), 1e-30)
    return out.astype(np.float32)


def edit_hessian(keys: np.ndarray, cov: np.ndarray | None, key_weight: float, damp: float) -> np.ndarray:
    """keys (n, in), cov (in, in) | None -> float64 (in, in): H = C/mean(diag C) + lambda K^T K/mean(diag K^T K),
    plus damp * mean(diag H) on the diagonal. Its diagonal is `edit_importance` (before damping). C may be
    float32: H is summed in float64 from it without a float64 copy of C."""
    k = np.asarray(keys, dtype=np.float64)                                     # (n, in)
    n_in = k.shape[1]
    if cov is None:
        h = np.eye(n_in)                                                       # (in, in)
    else:  # 0.5 (C + C^T) / mean(diag C), in place: one (in, in) float64 matrix besides C
        h = np.add(cov, cov.T, dtype=np.float64)                               # (in, in)
        h *= 0.5
        h /= max(float(np.mean(np.diag(cov).astype(np.float64))), 1e-30)
    # + lambda K^T K / mean(diag K^T K), a band of rows at a time: no second (in, in) matrix
    step = max(1, _FINITE_CHUNK // n_in)
    diag = np.concatenate([np.diag(k[:, i:i + step].T @ k[:, i:i + step]) for i in range(0, n_in, step)])  # (in,)
    scale = max(float(np.mean(diag)), 1e-30)
    for i in range(0, n_in, step):
        band = k[:, i:i + step].T @ k                                          # (step, in)
        band *= key_weight
        band /= scale
        h[i:i + step] += band
    h[np.diag_indices(n_in)] += damp * float(np.mean(np.diag(h)))
    return h


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Symmetric positive definite H (in, in) float64 -> upper-triangular U with U^T U = H^-1 (GPTQ's Hinv factor),
    computed in H's own memory: H is overwritten, and U is returned as a (Fortran-ordered) view of it.

    LAPACK works on column-major matrices; H's transpose is one, and is H. Factor, inverse and the inverse's factor
    each replace the one before in place, so one covariance-sized matrix is held, and the bits are those of the
    out-of-place sequence (L of H, H^-1 = L^-T L^-1 symmetric as LAPACK gives it, U of that)."""
    import torch

    if h.dtype != np.float64 or not h.flags.c_contiguous or not h.flags.writeable:
        raise QeditError("inverse_cholesky_upper: H must be a writable C-contiguous float64 array")
    col = torch.from_numpy(h).mT                                               # (in, in) column-major, H's memory
    info = torch.zeros((), dtype=torch.int32)
    torch.linalg.cholesky_ex(col, out=(col, info))                             # H = L L^T
    if int(info) == 0:
        torch.cholesky_inverse(col, out=col)                                   # H^-1
        torch.linalg.cholesky_ex(col, upper=True, out=(col, info))             # H^-1 = U^T U
    if int(info) != 0:
        raise QeditError("cov: the Hessian C + lambda K^T K is not positive definite; give a covariance that is "
                         "symmetric positive semi-definite, or raise AwareConfig.damp")
    return h.T                                                                 # U, a view of H's memory


def correction_basis(keys: np.ndarray, u: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """keys (n, in), u (in, in) upper factor of H^-1 or None -> G (in, n), (K G + eps I)^-1 (n, n).

    The loop's correction for a residual R (out, n) at the keys is R (K G + eps I)^-1 G^T: with G = H^-1 K^T
    it is the change of least tr(D H D^T), the least damage to outputs on the key distribution (the
    direction of C^-1 k, as in ROME's own update); with u None (G = K^T) it is the least Euclidean norm.
    """
    g = keys.T.copy() if u is None else u.T @ (u @ keys.T)                     # (in, n)
    gram = keys @ g                                                            # (n, n)
    gram = 0.5 * (gram + gram.T)
    eps = 1e-8 * float(np.trace(gram)) / gram.shape[0] + 1e-300
    return g, np.linalg.inv(gram + eps * np.eye(gram.shape[0]))


def row_sigma2(rows: np.ndarray) -> np.ndarray:
    """rows float32 (out, in) -> float32 (out,): mean square of each row, summed in order in float32
    exactly as ggml's quantize_row_q4_0_impl (& Q4_1, Q5_0, Q5_1) computes its sigma2."""
    total = np.cumsum(rows * rows, axis=1, dtype=np.float32)[:, -1]           # (out,) sequential float32 sum
    return (total / np.float32(rows.shape[1])).astype(np.float32)


def pad_to_sigma2(slab: np.ndarray, sigma2: np.ndarray, block: int) -> np.ndarray:
    """slab float32 (out, B), sigma2 float32 (out,) -> float32 (out, B + P), B + P a power of two.

    The pad (P - 1 equal values and one tuned value per row) makes `row_sigma2` of each padded row equal
    `sigma2` bit for bit (searched over the last value's neighbouring floats), so the quantizer weighs
    the slab's blocks exactly as it would inside the full row.
    """
    n_out, width = slab.shape
    s_slab = np.cumsum(slab * slab, axis=1, dtype=np.float32)[:, -1].astype(np.float64)   # (out,)
    sig = sigma2.astype(np.float64)
    need = np.where(sig > 0, s_slab / np.maximum(sig, 1e-300), 0.0) - width    # pad columns the slab needs
    # B + P a power of two: then sum / (B + P) is exact, so every float32 sigma2 is reachable
    pad = 2 ** math.ceil(math.log2(width + max(float(need.max()) * 1.05 + 2, block))) - width
    target = sig * (width + pad)                                               # (out,) wanted float32 sum
    rows = np.empty((n_out, width + pad), dtype=np.float32)                    # (out, B + P)
    rows[:, :width] = slab
    rows[:, width:-1] = np.sqrt(np.clip((target * (1 - 2.0 ** -6) - s_slab) / (pad - 1), 0, None))[:, None]
    head = np.cumsum(rows[:, :-1] * rows[:, :-1], axis=1, dtype=np.float32)[:, -1]  # (out,) float32
    last = np.sqrt(np.clip(target - head.astype(np.float64), 0, None)).astype(np.float32)  # (out,)
    steps = np.concatenate([[0], np.repeat(np.arange(1, _PAD_SEARCH + 1), 2) * np.tile([1, -1], _PAD_SEARCH)])
    cand = (last[:, None] + steps[None, :] * np.spacing(last)[:, None]).astype(np.float32)  # (out, tries)
    cand = np.abs(cand)
    sums = head[:, None] + cand * cand                                         # (out, tries) float32 ops
    hit = (sums / np.float32(width + pad)).astype(np.float32) == sigma2[:, None]
    pick = np.where(hit.any(axis=1), hit.argmax(axis=1), 0)                    # first hit, nearest the estimate
    rows[:, -1] = cand[np.arange(n_out), pick]
    if not hit.any(axis=1).all():
        log.debug("pad_to_sigma2: %d of %d rows only approximately match", int((~hit.any(axis=1)).sum()), n_out)
    return rows


def _encode_slab(kernel: QuantKernel, slab: np.ndarray, importance: np.ndarray | None,
                 sigma2: np.ndarray | None, n_threads: int | None) -> np.ndarray:
    """slab float32 (out, B) -> uint8 (out, B / block * type_size), the bytes these blocks get in the full row.

    For ROW_SIGMA_TYPES with importance, `sigma2` (out,) is `row_sigma2` of the full rows: the slab is
    padded to that sigma2 (pad_to_sigma2) and the pad's bytes are dropped.
    """
    if sigma2 is None or importance is None:
        return kernel.quantize(np.ascontiguousarray(slab), importance, n_threads=n_threads)
    rows = pad_to_sigma2(slab, sigma2, kernel.block_size)                      # (out, B + P)
    width = slab.shape[1]
    weights = np.concatenate([importance, np.ones(rows.shape[1] - width, dtype=np.float32)])  # (B + P,)
    data = kernel.quantize(rows, weights, n_threads=n_threads)
    return data[:, : width // kernel.block_size * kernel.type_size]


@dataclass(frozen=True)
class KeepBlocks:
    """The file's bytes of W0 (uint8 (out, row_bytes)) and the per-column error weights (in,) that decide,
    block by block, whether a new encoding replaces them."""

    original: np.ndarray
    weights: np.ndarray

    def merge(self, kernel: QuantKernel, data: np.ndarray, target: np.ndarray, col0: int = 0) -> np.ndarray:
        """data uint8 (out, nb * type_size) encoding target (out, nb * block) from column `col0` -> the same
        bytes with each block replaced by the file's where its weighted squared error is not larger."""
        n_out, width = target.shape
        nb, bs, ts = width // kernel.block_size, kernel.block_size, kernel.type_size
        b0 = col0 // bs * ts
        old = self.original[:, b0: b0 + nb * ts]                               # (out, nb * ts)
        w = self.weights[col0: col0 + width]                                   # (width,)

        def err(raw: np.ndarray) -> np.ndarray:
            d = kernel.dequantize(raw, (n_out, width)).astype(np.float64) - target  # (out, width)
            return (d * d * w).reshape(n_out, nb, bs).sum(axis=2)               # (out, nb)

        keep = err(old) <= err(data)                                           # (out, nb)
        if not keep.any():
            return data
        out = data.reshape(n_out, nb, ts).copy()
        out[keep] = old.reshape(n_out, nb, ts)[keep]
        return out.reshape(n_out, nb * ts)


def gptq_encode(kernel: QuantKernel, p: np.ndarray, u: np.ndarray, importance: np.ndarray | None,
                n_threads: int | None = None, keep: KeepBlocks | None = None) -> np.ndarray:
    """GPTQ in the block format: p float64 (out, in) target, u (in, in) upper factor of H^-1 -> uint8 rows.

    Slabs of one block width are quantized left to right; each slab's error E (out, B) is pushed onto
    the later columns as W[:, R] -= (E U_SS^-1) U_SR (applied lazily per batch of columns). With `keep`,
    each slab's blocks are merged with the file's before its error is taken.
    """
    n_out, n_in = p.shape
    width = kernel.block_size if kernel.block_size > 1 else n_in               # float types: one slab
    batch = max(width, _LAZY_BATCH // width * width)
    w = p.copy()                                                               # (out, in) working weights
    row_global = kernel.ggml_type in ROW_SIGMA_TYPES and importance is not None
    parts: list[np.ndarray] = []
    for b0 in range(0, n_in, batch):
        b1 = min(b0 + batch, n_in)
        scaled = np.empty((n_out, b1 - b0))                                    # (out, batch): E U_SS^-1 per slab
        for j in range(b0, b1, width):
            s = slice(j, j + width)
            sigma2 = row_sigma2(w.astype(np.float32)) if row_global else None  # (out,)
            imp = None if importance is None else np.ascontiguousarray(importance[s])
            data = _encode_slab(kernel, w[:, s].astype(np.float32), imp, sigma2, n_threads)
            if keep is not None:
                data = keep.merge(kernel, data, w[:, s], j)
            parts.append(data)
            err = w[:, s] - kernel.dequantize(data, (n_out, width))            # (out, B)
            if not np.isfinite(err).all():
                raise QeditError(f"w0 + dw: columns {j}..{j + width - 1} overflow {kernel.name}'s float16 "
                                 "block scales; the weights are too large for this type")
            e_scaled = np.linalg.solve(u[s, s].T, err.T).T                     # (out, B) = err U_SS^-1
            scaled[:, j - b0: j - b0 + width] = e_scaled
            if j + width < b1:
                w[:, j + width: b1] -= e_scaled @ u[s, j + width: b1]
        if b1 < n_in:
            w[:, b1:] -= scaled @ u[b0:b1, b1:]
    return np.concatenate(parts, axis=1)


def _matrix(value: Any, name: str, rows: int | None = None, cols: int | None = None, widen: bool = True) -> np.ndarray:
    """A finite 2-D float array (as float64 when `widen`, else as it is), else QeditError naming `name`."""
    if not isinstance(value, np.ndarray) or value.ndim != 2 or not np.issubdtype(value.dtype, np.floating):
        got = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise QeditError(f"{name}: expected a 2-D float numpy array, got {got}")
    if (rows is not None and value.shape[0] != rows) or (cols is not None and value.shape[1] != cols):
        want = f"({rows if rows is not None else 'n'}, {cols if cols is not None else '?'})"
        raise QeditError(f"{name}: expected shape {want}, got {value.shape}; w0 and dw are (out, in) in GGUF numpy "
                         "order, keys (n, in), cov (in, in)")
    step = max(1, _FINITE_CHUNK // max(1, value.shape[1]))   # rows per check: no mask of the whole matrix
    if value.size == 0 or not all(np.isfinite(value[i:i + step]).all() for i in range(0, value.shape[0], step)):
        raise QeditError(f"{name}: must be non-empty and finite (no NaN or Inf)")
    return value.astype(np.float64, copy=False) if widen else value   # read only: used as it is where it can be


def quantize_edited(w0: np.ndarray, dw: np.ndarray, keys: np.ndarray, ggml_type: GGMLQuantizationType | int | str,
                    *, cov: np.ndarray | None = None, cfg: AwareConfig = AwareConfig(),
                    original: np.ndarray | None = None, n_threads: int | None = None) -> AwareResult:
    """Quantize Wt = w0 + dw to `ggml_type` so that Wq keeps Wt's outputs at `keys`.

    w0, dw (out, in) float in GGUF numpy order (blocks run along `in`); keys (n, in); cov (in, in) = E[k k^T]
    of the layer or None (identity); original: the file's bytes of w0 in `ggml_type` (uint8 (out, row_bytes))
    when the tensor is patched, whose blocks are kept where they fit as well (cfg.keep_blocks).
    Returns the bytes (out, row_bytes) and the share of dW K^T kept.
    """
    kernel = get_kernel(ggml_type)
    if not isinstance(cfg, AwareConfig):
        raise QeditError(f"cfg: expected an AwareConfig, got {type(cfg).__name__}")
    base = _matrix(w0, "w0")                                                   # (out, in)
    n_out, n_in = base.shape
    change = _matrix(dw, "dw", n_out, n_in)                                    # (out, in)
    k = _matrix(keys, "keys", None, n_in)                                      # (n, in)
    c = None if cov is None else _matrix(cov, "cov", n_in, n_in, widen=False)  # (in, in), float32 or float64
    if c is not None and (np.diag(c).min() < 0 or np.diag(c).max() <= 0):
        raise QeditError("cov: must be E[k k^T] of the layer's keys, with a non-negative, non-zero diagonal; "
                         "pass qedit.core.stats.key_covariance's matrix or None")
    if not kernel.fits(n_in):
        raise QeditError(f"w0: rows of {n_in} values do not fit {kernel.name} (block size {kernel.block_size}); "
                         "pick the type with qedit.kernels.resolve_type first")
    keep = None
    if original is not None and cfg.keep_blocks:
        if not isinstance(original, np.ndarray) or original.dtype != np.uint8 \
                or original.shape != (n_out, kernel.row_bytes(n_in)):
            got = f"{original.dtype} {original.shape}" if isinstance(original, np.ndarray) else type(original).__name__
            raise QeditError(f"original: expected the {kernel.name} bytes of w0, uint8 ({n_out}, "
                             f"{kernel.row_bytes(n_in)}), got {got}")
        keep = KeepBlocks(original, edit_importance(k, c, cfg.key_weight).astype(np.float64))
    start = time.perf_counter()
    target = base + change                                                     # (out, in) Wt
    want = change @ k.T                                                        # (out, n) intended change at the keys
    del base, change                                                           # Wt and its change at the keys suffice
    want_norm = float(np.linalg.norm(want))

    def score(data: np.ndarray) -> tuple[float, float, np.ndarray]:
        """kept, residual and R = (Wt - Wq) K^T (out, n) of encoded bytes."""
        wq = kernel.dequantize(data, (n_out, n_in)).astype(np.float64)         # (out, in)
        res = (target - wq) @ k.T                                              # (out, n)
        if want_norm == 0:
            return float("nan"), float("nan"), res
        return float(np.sum((want - res) * want)) / want_norm ** 2, float(np.linalg.norm(res)) / want_norm, res

    kept_naive, residual_naive, _ = score(kernel.quantize(target.astype(np.float32), None, n_threads=n_threads))
    imp = edit_importance(k, c, cfg.key_weight) if cfg.importance and kernel.uses_importance else None
    width = kernel.block_size if kernel.block_size > 1 else n_in
    rounds = cfg.loop_rounds if want_norm > 0 else 0
    if want_norm == 0:
        log.warning("quantize_edited: dw is zero at the keys, nothing to keep; the loop is skipped")
    feedback = cfg.error_feedback and n_in > width
    u = None  # without C, H's correction equals the Euclidean one: no factor needed for the loop alone
    if feedback or (rounds and cfg.loop_metric == "hessian" and c is not None):
        u = inverse_cholesky_upper(edit_hessian(k, c, cfg.key_weight, cfg.damp))  # (in, in)
    g, gram_inv = correction_basis(k, u if cfg.loop_metric == "hessian" else None) if rounds else (None, None)

    def encode(p: np.ndarray) -> np.ndarray:
        if feedback:
            return gptq_encode(kernel, p, u, imp, n_threads, keep)
        data = kernel.quantize(p.astype(np.float32), imp, n_threads=n_threads)
        return data if keep is None else keep.merge(kernel, data, p)

    p = target.copy()                                                 # (out, in) running pre-quantization weight
    history: list[float] = []
    best: tuple[float, float, np.ndarray, int] | None = None
    ran = 0
    for r in range(rounds + 1):
        data = encode(p)
        kept, residual, res = score(data)
        history.append(kept)
        if best is None or abs(1.0 - kept) < abs(1.0 - best[0]):
            best = (kept, residual, data, r)
        ran = r
        if r == rounds or abs(1.0 - kept) <= cfg.tol:
            break
        p += (res @ gram_inv) @ g.T                                            # (out, n) (n, n) (n, in)
    assert best is not None
    kept, residual, data, best_round = best
    seconds = time.perf_counter() - start
    log.info("quantize_edited %s (%d, %d), %d key(s): kept %.4f (naive %.4f) after %d round(s) in %.2f s",
             kernel.name, n_out, n_in, k.shape[0], kept, kept_naive, ran, seconds)
    info = {"kept_history": history, "best_round": best_round, "residual_naive": residual_naive,
            "importance": imp is not None, "error_feedback": feedback, "slab_width": width,
            "loop_metric": cfg.loop_metric, "n_keys": int(k.shape[0]), "seconds": seconds,
            "kept_blocks": keep is not None}
    return AwareResult(data, kernel.ggml_type, kept, kept_naive, ran, residual, info)

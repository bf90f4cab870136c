"""GPTQ (Frantar et al., 2022) on one weight matrix: a pure tensor function, no model plumbing.

`gptq_quantize(weight (out, in), hessian (in, in), cfg)` quantizes the columns one at a time in
the order given by the Hessian (act-order, `desc_act`) or the natural order, and pushes each
column's rounding error onto the columns not yet quantized with the upper Cholesky factor of H^-1
(in lazy batches of `block_size` columns). H = 2/n X^T X over the calibration inputs x (n, in) of
the layer (`HessianAccumulator`). The factorisation of H is most of the cost for a 2048-column layer;
`prepare_hessian` does it once for several weights quantized with the same H.

Grid: per output row and group of `group_size` input columns (-1: the whole row) a scale s and an
integer zero point z with w ~ s * (q - z), q in [0, 2^bits - 1]. Symmetric grids use
z = 2^(bits-1); asymmetric ones z = round(-min / s). Scales are rounded to float16 before any
rounding, because the checkpoint stores them as float16; the dequantized weight returned is
exactly what `dequantize_codes` gives for the stored codes, scales, zeros and g_idx.

Edit-aware Hessian: with edit keys K (n, in) and `key_weight` lambda, H' = H / mean(diag H) +
lambda K^T K / mean(diag K^T K) (each term normalised to mean diagonal 1, as in
`qedit.kernels.aware`), so the solver keeps W k close at the keys of the edit.

Bit packing (the GPTQ checkpoint layout, shared by 2, 3, 4 and 8 bits) is a little-endian bit
stream of 32-bit words: value i takes bits [i*bits, (i+1)*bits) of the stream, word j bits
[32j, 32j + 32). `qweight` packs along the input axis, `qzeros` along the output axis.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from qedit.core.errors import QeditError

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
_MIN_SCALE = 2.0 ** -14        # smallest normal float16; smaller scales would flush to zero when stored
_MAX_DAMP = 1.0


@dataclass(frozen=True)
class GPTQConfig:
    """Settings of the GPTQ solver (names as in GPTQModel's quantize_config)."""

    bits: int = 4
    group_size: int = 128        # input columns per scale/zero; -1 = one group per row
    sym: bool = True
    desc_act: bool = False       # act-order: quantize columns by decreasing diag(H)
    damp_percent: float = 0.05   # added to diag(H), as a share of its mean (GPTQModel 7.6 default)
    damp_auto_increment: float = 0.01  # added to damp_percent while H + damp is not positive definite
    block_size: int = 128        # lazy-batch width of the error feedback
    key_weight: float = 1.0      # lambda of the edit-aware Hessian (used only when keys are given)

    def __post_init__(self) -> None:
        for name in ("bits", "group_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise QeditError(f"GPTQConfig.{name}: must be an integer, got {value!r}")
        if self.bits not in BITS:
            raise QeditError(f"GPTQConfig.bits: {self.bits} is out of range; GPTQ supports {', '.join(map(str, BITS))} bits")
        if self.group_size not in GROUP_SIZES:
            raise QeditError(f"GPTQConfig.group_size: {self.group_size} is out of range; "
                             f"use -1 (per row) or one of {', '.join(map(str, GROUP_SIZES[1:]))}")
        for name in ("sym", "desc_act"):
            if not isinstance(getattr(self, name), bool):
                raise QeditError(f"GPTQConfig.{name}: must be True or False, got {getattr(self, name)!r}")
        for name, low, high in (("damp_percent", 0.0, _MAX_DAMP), ("damp_auto_increment", 0.0, _MAX_DAMP),
                                ("key_weight", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise QeditError(f"GPTQConfig.{name}: must be a finite number in [{low}, {high}], got {value!r}")
        if self.damp_percent <= 0:
            raise QeditError("GPTQConfig.damp_percent: must be > 0 (H + damp must be invertible); try 0.01")
        if self.block_size < 1:
            raise QeditError(f"GPTQConfig.block_size: must be >= 1, got {self.block_size}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def check_shape(self, out_features: int, in_features: int, where: str = "weight") -> None:
        if out_features < 1 or in_features < 1:
            raise QeditError(f"{where}: empty weight ({out_features} x {in_features})")
        if self.group_size != -1 and in_features % self.group_size:
            raise QeditError(f"{where}: group_size {self.group_size} does not divide in_features {in_features}; "
                             f"choose a group size that divides it, or -1")


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """One quantized weight. Codes and dequantized weight in math orientation (out, in)."""

    codes: torch.Tensor       # (out, in) int32 in [0, 2^bits - 1]
    scales: torch.Tensor      # (n_groups, out) float16
    zeros: torch.Tensor       # (n_groups, out) int32 in [0, 2^bits - 1] (the "v2" zero point, no offset)
    g_idx: torch.Tensor       # (in,) int32: the group of each input column
    dequant: torch.Tensor     # (out, in) float32 == dequantize_codes(codes, scales, zeros, g_idx)
    loss: float               # GPTQ's sum (w - q)^2 / d^2 / 2 over the matrix
    damp: float               # the damp_percent that made H positive definite
    seconds: float


class HessianAccumulator:
    """Running H = 2/n sum x x^T (float64) over calibration inputs of one layer."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """x (..., in): every row is one token's input. Products in float64: activations with outlier
        features (Gemma) lose the small directions of H in float32, which raises the 4-bit perplexity."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)   # (tokens, in)
        if rows.shape[1] != self.sum.shape[0]:
            raise QeditError(f"HessianAccumulator: inputs have {rows.shape[1]} features, expected {self.sum.shape[0]}")
        self.sum += rows.t() @ rows
        self.count += rows.shape[0]

    def result(self) -> torch.Tensor:
        """(in, in) float64."""
        if self.count == 0:
            raise QeditError("HessianAccumulator: no calibration inputs reached this layer")
        return self.sum * (2.0 / self.count)


def edit_aware_hessian(hessian: torch.Tensor, keys: torch.Tensor, key_weight: float) -> torch.Tensor:
    """H (in, in), keys (n, in) -> H/mean(diag H) + key_weight * K^T K / mean(diag K^T K), float64."""
    h = hessian.double()
    k = keys.detach().double().cpu()                                             # (n, in)
    if k.dim() != 2 or k.shape[1] != h.shape[0]:
        raise QeditError(f"edit keys: expected (n, {h.shape[0]}), got {tuple(k.shape)}")
    gram = k.t() @ k                                                             # (in, in)
    h = h / max(float(h.diagonal().mean()), 1e-30)
    return h + key_weight * gram / max(float(gram.diagonal().mean()), 1e-30)


def _group_params(w: torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, cols) -> scale (out,) float32 holding float16 values, zero (out,) float32 integers."""
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if cfg.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / cfg.maxq).clamp(min=_MIN_SCALE).half().float()
    if cfg.sym:
        zero = torch.full_like(scale, float((cfg.maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, cfg.maxq)
    return scale, zero


def _hinv_upper(h: torch.Tensor, cfg: GPTQConfig, where: str, mean: float) -> tuple[torch.Tensor, float]:
    """SPD-ish H (in, in) float64 -> (upper U with U^T U = (H + damp * mean I)^-1, damp used).

    With R the reversal permutation and R (H + damp) R = L L^T, U = R L^-1 R: one Cholesky and one
    triangular inverse, instead of inverting H and factoring the inverse."""
    n = h.shape[0]
    rev = torch.arange(n - 1, -1, -1)
    damp = cfg.damp_percent
    while True:
        hd = h[rev][:, rev]
        hd.diagonal().add_(damp * mean)
        lower, info = torch.linalg.cholesky_ex(hd)                             # (in, in) float64
        if int(info) == 0:
            l_inv = torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
            upper = l_inv[rev][:, rev]
            if bool(torch.isfinite(upper).all()):
                return upper, damp
        if cfg.damp_auto_increment <= 0 or damp + cfg.damp_auto_increment > _MAX_DAMP:
            raise QeditError(f"{where}: the Hessian is not positive definite even with damp_percent={damp:.4f}; "
                             "give more calibration text or raise damp_percent")
        damp += cfg.damp_auto_increment
        log.warning("%s: Hessian not positive definite, retrying with damp_percent=%.4f", where, damp)


def _solve(wt: torch.Tensor, hinv: torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The GPTQ column loop on the transposed weight wt (in, out) (changed in place), columns in order.

    Returns codes (in, out), scales (G, out), zeros (G, out) float32, and the loss. Rows of wt are
    contiguous, so each error feed-forward is one contiguous rank-one update."""
    n_in, n_out = wt.shape
    gs = n_in if cfg.group_size == -1 else cfg.group_size
    scales = torch.zeros(n_in // gs, n_out)
    zeros = torch.zeros(n_in // gs, n_out)
    codes = torch.zeros(n_in, n_out)
    loss = 0.0
    scale = zero = torch.zeros(n_out)
    for i1 in range(0, n_in, cfg.block_size):
        i2 = min(i1 + cfg.block_size, n_in)
        w1 = wt[i1:i2]                                                         # (B, out), a view
        err = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # group parameters from the columns as they are now (after earlier feedback)
                g = col // gs
                scale, zero = _group_params(wt[col:col + gs].t(), cfg)
                scales[g], zeros[g] = scale, zero
            q = torch.clamp(torch.round(w1[i] / scale) + zero, 0, cfg.maxq)    # (out,)
            codes[col] = q
            e = err[i]
            torch.div(w1[i] - scale * (q - zero), h1[i, i], out=e)
            w1[i:].addr_(h1[i, i:], e, alpha=-1.0)                             # feed the error forward
        loss += float((err * err).sum()) / 2
        wt[i2:] -= hinv[i1:i2, i2:].t() @ err
    return codes, scales, zeros, loss


@dataclass(frozen=True)
class PreparedHessian:
    """What the solver needs from H, computed once (`prepare_hessian`): the column order, the dead
    columns (zero diagonal), and the upper Cholesky factor of the damped inverse in that order. Every
    weight quantized with the same Hessian and config can reuse it."""

    n_in: int
    perm: torch.Tensor        # (in,) int64: the column order (act-order or natural)
    dead: torch.Tensor        # (in,) bool: columns no calibration input reached (quantized as 0)
    upper: torch.Tensor       # (in, in) float32: U with U^T U = (H[perm][:, perm] + damp)^-1
    damp: float
    seconds: float


@torch.no_grad()
def prepare_hessian(hessian: torch.Tensor, cfg: GPTQConfig, edit_keys: torch.Tensor | None = None,
                    where: str = "weight") -> PreparedHessian:
    """H (in, in), plus edit keys (n, in) with weight cfg.key_weight, -> the solver's factor (float64 math)."""
    start = time.perf_counter()
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise QeditError(f"{where}: the Hessian must be square (in, in), got shape {tuple(hessian.shape)}")
    h = hessian.detach().to(device="cpu", dtype=torch.float64).clone()        # (in, in)
    h = 0.5 * (h + h.t())
    damp_base = float(h.diagonal().mean())
    if edit_keys is not None and cfg.key_weight > 0:
        h = edit_aware_hessian(h, edit_keys, cfg.key_weight)
        damp_base = 1.0   # damping stays relative to the calibration part (mean diagonal 1 after normalising)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    n_in = h.shape[0]
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if cfg.desc_act else torch.arange(n_in)
    u, damp = _hinv_upper(h[perm][:, perm], cfg, where, damp_base)
    return PreparedHessian(n_in, perm, dead, u.float(), damp, time.perf_counter() - start)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, cfg: GPTQConfig,
                  edit_keys: torch.Tensor | None = None, where: str = "weight") -> GPTQResult:
    """Quantize weight (out, in) with H (in, in); edit_keys (n, in) make the Hessian edit-aware.

    `hessian` may be a `PreparedHessian` (from `prepare_hessian` with the same cfg, keys included),
    which skips the factorisation; edit_keys must then be None."""
    start = time.perf_counter()
    if weight.dim() != 2:
        raise QeditError(f"{where}: expected a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    cfg.check_shape(n_out, n_in, where)
    w = weight.detach().to(device="cpu", dtype=torch.float32).clone()          # (out, in)
    if not torch.isfinite(w).all():
        raise QeditError(f"{where}: weight has NaN or infinite values; cannot quantize it")
    if isinstance(hessian, PreparedHessian):
        if edit_keys is not None:
            raise QeditError(f"{where}: give the edit keys to prepare_hessian, not with a prepared Hessian")
        prep = hessian
    else:
        if tuple(hessian.shape) != (n_in, n_in):
            raise QeditError(f"{where}: Hessian has shape {tuple(hessian.shape)}, expected ({n_in}, {n_in})")
        prep = prepare_hessian(hessian, cfg, edit_keys, where)
    if prep.n_in != n_in:
        raise QeditError(f"{where}: the prepared Hessian is for {prep.n_in} input columns, the weight has {n_in}")
    w[:, prep.dead] = 0.0
    codes, scales, zeros, loss = _solve(w[:, prep.perm].t().contiguous(), prep.upper, cfg)   # codes (in, out)
    inv = torch.argsort(prep.perm)
    gs = n_in if cfg.group_size == -1 else cfg.group_size
    codes = codes[inv].t().to(torch.int32).contiguous()                       # (out, in), original column order
    g_idx = (torch.arange(n_in) // gs)[inv].to(torch.int32)                   # group of each original column
    scales16, zeros_i = scales.half(), zeros.to(torch.int32)
    dq = dequantize_codes(codes, scales16, zeros_i, g_idx)
    return GPTQResult(codes, scales16, zeros_i, g_idx, dq, loss, prep.damp, time.perf_counter() - start)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """codes (out, in), scales (G, out), zeros (G, out), g_idx (in,) -> weight (out, in) float32."""
    gi = g_idx.long()
    s = scales.float()[gi].t()                                                 # (out, in)
    z = zeros.float()[gi].t()                                                  # (out, in)
    return s * (codes.float() - z)


def rtn_quantize(weight: torch.Tensor, cfg: GPTQConfig, where: str = "weight") -> GPTQResult:
    """Round-to-nearest on the same grid (H = I, no act-order): the baseline GPTQ improves on."""
    n_in = weight.shape[1]
    plain = GPTQConfig(cfg.bits, cfg.group_size, cfg.sym, False, cfg.damp_percent, cfg.damp_auto_increment,
                       cfg.block_size, 0.0)
    # With H = I the Cholesky factor of H^-1 is diagonal, so no error is fed forward.
    return gptq_quantize(weight, torch.eye(n_in, dtype=torch.float64), plain, where=where)


# ---- bit packing (checkpoint layout) ----

def _stream_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values (n, m) ints in [0, 2^bits) -> (n * bits / 32, m) int32, packed along axis 0."""
    n, m = values.shape
    if (n * bits) % 32:
        raise QeditError(f"cannot pack {n} {bits}-bit values into 32-bit words; the packed axis must be a multiple of 32")
    v = values.to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((v[:, None, :] >> shifts[None, :, None]) & 1).reshape(n * bits // 32, 32, m)   # (words, 32, m)
    words = (stream << torch.arange(32, dtype=torch.int64)[None, :, None]).sum(dim=1)       # (words, m)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _stream_unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """(w, m) int32 -> (w * 32 / bits, m) int32, the inverse of `_stream_pack`."""
    wd, m = words.shape
    if (wd * 32) % bits:
        raise QeditError(f"{wd} packed words do not hold a whole number of {bits}-bit values")
    u = words.to(torch.int64) & 0xFFFFFFFF
    stream = (u[:, None, :] >> torch.arange(32, dtype=torch.int64)[None, :, None]) & 1      # (w, 32, m)
    stream = stream.reshape(wd * 32 // bits, bits, m)
    return (stream << torch.arange(bits, dtype=torch.int64)[None, :, None]).sum(dim=1).to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (out, in) -> qweight (in * bits / 32, out) int32."""
    return _stream_pack(codes.t(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight (in * bits / 32, out) -> codes (out, in) int32."""
    return _stream_unpack(qweight, bits).t().contiguous()


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros (G, out) -> qzeros (G, out * bits / 32) int32 (no offset: see `v1_offset_qzeros`)."""
    return _stream_pack(zeros.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros (G, out * bits / 32) -> zeros (G, out) int32."""
    return _stream_unpack(qzeros.t().contiguous(), bits).t().contiguous()


def v1_offset_qzeros(qzeros: torch.Tensor, bits: int, sign: int) -> torch.Tensor:
    """Convert packed zeros between GPTQ v2 (z) and v1 (z - 1) storage; sign=-1: v2 -> v1, +1: v1 -> v2.

    For 2, 4 and 8 bits the offset is applied to each 32-bit word as a whole (a 0 zero point borrows
    from its neighbour), exactly as GPTQModel converts, so every zero point survives the round trip.
    3-bit fields straddle words, so there the offset is applied to each field modulo 8 (GPTQModel's rule).
    """
    if bits == 3:
        z = unpack_qzeros(qzeros, bits)
        return pack_qzeros((z + sign) & 0x7, bits)
    per_word = 32 // bits
    ones = sum(1 << (bits * k) for k in range(per_word))                      # 0x11111111 for 4 bits
    words = (qzeros.to(torch.int64) + sign * ones) & 0xFFFFFFFF
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)

"""Shared edit math: regularised solves, null-space projectors, SVD truncation; a product with a matrix read in
row chunks (a streamed LM head) and the inverse-CDF draw of tokens from logits.

Solves run in float64: key covariances of LLM MLPs are badly conditioned. Where: on the device of the tensor a
function names as its primary input (the keys of a solve, the matrix of a decomposition), when that device computes
in float64 (the CPU and CUDA do); on a device without float64 (Apple's MPS) on the CPU (`float64_device`), and the
results stay there. The other inputs are moved to that device.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

_DRAW_BLOCK = 1024  # vocabulary block of the two-level inverse-CDF draw
_BAND = 1 << 22     # elements per band of rows when a product is added to a matrix in place
_NO_FLOAT64 = frozenset({"mps"})  # device types without float64 arithmetic
_CPU = torch.device("cpu")


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 work on tensors of `device` runs: that device, or the CPU when it has no float64 (MPS)."""
    device = torch.device(device)
    return _CPU if device.type in _NO_FLOAT64 else device


def wide(t: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """`t` in float64 on `device` (default: t's own), or on the CPU when that device has no float64."""
    return t.to(device=float64_device(t.device if device is None else device), dtype=torch.float64)


def solve_spd(a: torch.Tensor, b: torch.Tensor, jitter: float = 1e-6,
              rebuild: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Solve a x = b for symmetric positive (semi)definite a (d, d), b (d, k), in float64.

    A singular a (e.g. a key covariance from fewer tokens than dimensions, whose null-space
    eigenvalues come out as +-1e-9 rounding noise) gets a ridge of `jitter` times its mean
    diagonal, grown tenfold until the Cholesky factorisation succeeds. Inverting the rounding
    noise instead (a plain least-squares solve) returns vectors dominated by that noise.

    `rebuild`: `a` is then a float64 matrix the caller gives up, exactly symmetric; it is factored in its own
    memory (one (d, d) matrix instead of two, the same bits), and `rebuild()` makes it again for a retry.
    """
    a64 = wide(a)
    b64 = wide(b, a64.device)
    scale = float(a64.diagonal().abs().mean().clamp(min=torch.finfo(torch.float64).tiny))
    ridge = 0.0
    while ridge <= 1.0:
        if rebuild is None:
            shifted = a64 if ridge == 0 else a64 + ridge * scale * torch.eye(a64.shape[0], dtype=torch.float64,
                                                                             device=a64.device)
            chol, info = torch.linalg.cholesky_ex(shifted)
        else:   # LAPACK factors column-major matrices: a's transpose is one, and is a
            if ridge > 0:
                a64 = wide(rebuild())
                a64.diagonal().add_(ridge * scale)
            chol, info = a64.mT, torch.zeros((), dtype=torch.int32, device=a64.device)
            torch.linalg.cholesky_ex(chol, out=(chol, info))
        if int(info) == 0:
            return _cholesky_solve(chol, b64)
        ridge = jitter if ridge == 0 else ridge * 10.0
    return torch.linalg.lstsq(a64 if rebuild is None else wide(rebuild()), b64).solution


def _cholesky_solve(lower: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x with L L^T x = b, lower L (d, d), b (d, k): two triangular solves, which work on L where it is (the bits
    of torch.cholesky_solve, without the copy of L it makes)."""
    return torch.linalg.solve_triangular(lower.mT, torch.linalg.solve_triangular(lower, b, upper=False), upper=True)


def shrink(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """cov + ridge * mean(diag cov) * I in float64: a covariance estimated from fewer tokens than it
    has well-sampled directions is near-singular, and its inverse blows up exactly the directions the
    sample saw least."""
    c64 = wide(cov)
    if ridge <= 0:
        return c64
    scale = float(c64.diagonal().mean())
    out = c64.clone() if c64 is cov else c64    # a copy of its own: added to in place, no identity matrix made
    out.diagonal().add_(ridge * scale)
    return out


def rank_one_update(cov: torch.Tensor, key: torch.Tensor, residual: torch.Tensor,
                    ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's closed form: the rank-one dW = u v^T with dW k = residual and minimal C-weighted change.

    cov (d_in, d_in), key (d_in,), residual (d_out,) -> u (d_out, 1), v (1, d_in), both float64, on the key's
    device. `ridge` shrinks C towards a multiple of I first (see `shrink`).
    """
    k64 = wide(key)
    src = cov.to(k64.device)
    c64 = shrink(src, ridge)                                                      # (d_in, d_in) float64
    own = c64 is not src    # a matrix of its own (widened or shrunk): factored in place, rebuilt for a retry
    cinv_k = solve_spd(c64, k64[:, None], rebuild=(lambda: shrink(src, ridge)) if own else None)[:, 0]  # (d_in,)
    del c64
    denom = torch.dot(cinv_k, k64)
    return wide(residual, k64.device)[:, None], (cinv_k / denom)[None, :]


def batch_update(keys: torch.Tensor, residuals: torch.Tensor, cov_term: torch.Tensor | Callable[[], torch.Tensor],
                 projector: torch.Tensor | None = None, l2: float = 0.0) -> torch.Tensor:
    """MEMIT / AlphaEdit least squares, returned as dW (d_out, d_in), float64.

    keys (n, d_in), residuals (n, d_out), cov_term (d_in, d_in): the covariance weight on
    preserved keys (MEMIT: lambda*C; AlphaEdit: keys of earlier edits).
    Without projector: dW = R^T K (cov_term + K^T K)^-1   (MEMIT).
    With projector P:  dW = R^T K P ((cov_term + K^T K) P + l2 I)^-1   (AlphaEdit: dW K0 = 0).
    Runs on the keys' device (see the module's docstring). `cov_term` may be a function making it afresh as a
    float64 matrix on that device (MEMIT's prior): K^T K and l2 are then added to it in place and it is factored
    in place (one covariance-sized matrix instead of three, the same bits).
    """
    k64 = wide(keys)
    r64 = wide(residuals, k64.device)
    d_in = k64.shape[1]

    def lhs_of(c64: torch.Tensor) -> torch.Tensor:
        """c64 + K^T K + l2 I, in place (K^T K a band of rows at a time) when c64 is not cov_term itself."""
        if c64 is cov_term:
            gram = c64 + k64.t() @ k64                     # (d_in, d_in)
        else:
            gram, step = c64, max(1, _BAND // d_in)
            for i in range(0, d_in, step):                 # the same bits as the whole product added at once
                gram[i:i + step] += k64[:, i:i + step].t() @ k64                    # (step, d_in)
        gram.add_(0.0)                                     # the same bits as a sum with l2 I (-0.0 included)
        gram.diagonal().add_(l2)
        return gram

    if callable(cov_term):
        if projector is not None:
            raise ValueError("batch_update: a cov_term function is for the solve without a projector")
        made = lambda: lhs_of(wide(cov_term(), k64.device))  # noqa: E731
        return solve_spd(made(), k64.t() @ r64, rebuild=made).t()    # dW^T = lhs^-1 K^T R -> (d_in, d_out)
    if projector is None:
        lhs = lhs_of(wide(cov_term, k64.device))
        # dW^T = lhs^-1 K^T R  -> (d_in, d_out)
        return solve_spd(lhs, k64.t() @ r64).t()
    gram = wide(cov_term, k64.device) + k64.t() @ k64     # (d_in, d_in)
    p = wide(projector, k64.device)
    lhs = p @ gram + l2 * torch.eye(d_in, dtype=torch.float64, device=k64.device)  # not symmetric: general solve
    return torch.linalg.solve(lhs, p @ k64.t() @ r64).t()


def null_space_projector(cov: torch.Tensor, threshold: float = 1e-2, relative: bool = False) -> torch.Tensor:
    """Projector onto the span of eigenvectors of cov (d, d) with eigenvalue below threshold.

    relative=True compares eigenvalues with threshold * the largest one.
    """
    evals, evecs = torch.linalg.eigh(wide(cov))
    return projector_from_eigh(evals, evecs, threshold, relative)


def projector_from_eigh(evals: torch.Tensor, evecs: torch.Tensor, threshold: float = 1e-2,
                        relative: bool = False) -> torch.Tensor:
    """null_space_projector from an eigendecomposition already made: evals (d,), evecs (d, d)."""
    cut = threshold * float(evals.max()) if relative else threshold
    vecs = wide(evecs)
    basis = vecs[:, (evals < cut).to(vecs.device)]        # (d, k)
    return basis @ basis.t()


def svd_truncate(mat: torch.Tensor, rank: int | None = None, energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best low-rank factors a (out, r), b (r, in) of mat (out, in), float32.

    rank: keep that many singular values; energy: keep the fewest that hold this share of
    the squared Frobenius norm (0 < energy <= 1). With neither, keep all nonzero ones.
    """
    if rank is not None and rank < 1:
        raise ValueError("rank must be >= 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError("energy must be in (0, 1]")
    u, s, vh = torch.linalg.svd(wide(mat), full_matrices=False)
    if rank is None:
        if energy is not None:
            cum = torch.cumsum(s**2, 0) / torch.clamp((s**2).sum(), min=1e-300)
            rank = int(torch.searchsorted(cum, torch.tensor([energy - 1e-12], dtype=cum.dtype, device=cum.device))) + 1
        else:
            rank = max(1, int((s > s[0] * 1e-7).sum())) if s.numel() else 1
    rank = min(rank, s.numel())
    a = (u[:, :rank] * s[:rank]).float()
    b = vh[:rank].float()
    return a, b


def chunked_linear(hidden: torch.Tensor, read: Callable[[int, int], torch.Tensor], n_rows: int, chunk: int,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """hidden (..., d) @ W^T (..., n_rows), W read `chunk` rows at a time by read(lo, hi) -> (hi - lo, d) and never
    held whole; the products in `dtype` (default: hidden's)."""
    x = hidden if dtype is None else hidden.to(dtype)
    out = x.new_empty(*x.shape[:-1], n_rows)                                          # (..., n_rows)
    for lo in range(0, n_rows, chunk):
        hi = min(n_rows, lo + chunk)
        w = read(lo, hi)                                                               # (hi - lo, d)
        out[..., lo:hi] = torch.nn.functional.linear(x, w if dtype is None else w.to(dtype))
    return out


def draw_tokens(logits: torch.Tensor, generator: torch.Generator, banned: Sequence[int] = ()) -> torch.Tensor:
    """One token per row from softmax(logits) (rows, vocab), by inverse CDF; returns (rows, 1) int64.

    Two levels: cumulative block masses pick a block of the vocabulary, then a cumulative sum
    inside that block picks the token, so one pass of block sums is the only full-width scan.
    The uniform draws come from `generator` on its own device (the CPU's: the same draws wherever the logits
    are) and the token ids are returned on the logits' device; the cumulative sums are float64, so on a
    device without float64 (MPS) the draw runs on the CPU.
    """
    work = float64_device(logits.device)
    if work != logits.device:
        return draw_tokens(logits.to(work), generator, banned).to(logits.device)
    probs = torch.softmax(logits.float(), dim=-1)                              # (rows, vocab), a new tensor
    rows, vocab = probs.shape
    banned = [t for t in banned if 0 <= t < vocab]
    if banned:
        probs[:, banned] = 0.0
    full = vocab // _DRAW_BLOCK
    masses = probs[:, : full * _DRAW_BLOCK].view(rows, full, _DRAW_BLOCK).sum(-1)  # (rows, full)
    if full * _DRAW_BLOCK < vocab:
        masses = torch.cat([masses, probs[:, full * _DRAW_BLOCK:].sum(-1, keepdim=True)], dim=1)
    cum = masses.double().cumsum(-1)                                           # (rows, n_blocks)
    u = torch.rand((rows, 1), generator=generator, device=generator.device, dtype=torch.float64)
    u = u.to(probs.device) * cum[:, -1:]
    b = torch.searchsorted(cum, u, right=True).clamp_(max=cum.shape[1] - 1)    # (rows, 1) block index
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(u))
    offsets = torch.arange(_DRAW_BLOCK, device=probs.device)
    cols = b * _DRAW_BLOCK + offsets                                           # (rows, block)
    chosen = probs.gather(1, cols.clamp(max=vocab - 1)) * (cols < vocab)       # (rows, block)
    j = torch.searchsorted(chosen.double().cumsum(-1), u - before, right=True)  # (rows, 1)
    last = torch.where(chosen > 0, offsets, -1).amax(-1, keepdim=True)         # rounding may overshoot the block
    return b * _DRAW_BLOCK + torch.minimum(j, last)

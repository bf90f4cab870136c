"""qedit.kernels.aware: slab decomposition of the block formats, edit-aware quantization of a patched
tensor (kept share along the edit keys, ablation of each mechanism, damage elsewhere) and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qedit.core.errors import QeditError
from qedit.kernels import dequantize_tensor, get_kernel, quantize_tensor
from qedit.kernels.aware import (
    ROW_SIGMA_TYPES,
    AwareConfig,
    edit_hessian,
    edit_importance,
    gptq_encode,
    inverse_cholesky_upper,
    kept_share,
    pad_to_sigma2,
    quantize_edited,
    row_sigma2,
)

SLAB_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL"]
LOW_TYPES = ["Q4_K", "Q3_K", "Q2_K"]
ONLY = {  # each mechanism alone (importance alone only helps with a strong key weight, see the report)
    "importance": AwareConfig(key_weight=100.0, error_feedback=False, loop_rounds=0),
    "error_feedback": AwareConfig(importance=False, loop_rounds=0),
    "loop": AwareConfig(importance=False, error_feedback=False),
}


def _rows(n_rows: int = 32, n_cols: int = 1024, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian rows with outliers, a zero row, a tiny row; and a skewed importance vector (n_cols,)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)              # (rows, cols)
    w[rng.random(w.shape) < 0.003] *= 10
    w[3] = 0
    w[5] *= 1e-3
    w[7, : n_cols // 2] = 0
    importance = (rng.random(n_cols) ** 3 * 10).astype(np.float32)            # (cols,)
    return w, importance


def _edit_case(qtype: str, on_grid: bool = True, seed: int = 0, n_out: int = 256, n_in: int = 1024,
               frac: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A patched tensor like Gemma's layer 6 at a quarter of a ROME edit's strength: W0 (out, in) on the grid
    of `qtype` (dequantized) or Gaussian; activations with 1% loud columns, their covariance C (in, in),
    4 keys near the edit key k* (4, in); dW = a (C^-1 k*)^T with rms `frac` of a rounding step (ROME's
    full-strength edits on Gemma are 0.45-0.75 steps); and held-out activations X (in, 256)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_out, n_in)).astype(np.float32)                 # (out, in)
    q = dequantize_tensor(quantize_tensor(g, qtype, n_threads=1), qtype, g.shape)
    step = math.sqrt(12.0 * float(np.mean((q - g) ** 2)))                      # one rounding step (uniform error)
    w0 = q if on_grid else g
    scale = np.exp(0.3 * rng.standard_normal(n_in))                            # (in,) activation scale per column
    scale[rng.permutation(n_in)[: n_in // 100]] *= rng.uniform(5, 30, n_in // 100)  # 1% loud columns, as in MLPs
    z = rng.standard_normal((2048, n_in)) * scale                              # (samples, in) activations
    cov = z.T @ z / len(z)                                                     # (in, in)
    kstar = rng.standard_normal(n_in) * scale                                  # (in,) the edit key, one more sample
    keys = (kstar + 0.3 * rng.standard_normal((4, n_in)) * scale).astype(np.float32)  # (4, in) keys near k*
    dw = np.outer(rng.standard_normal(n_out), np.linalg.solve(cov, kstar))     # (out, in) rank one, ROME's C^-1 k*
    dw *= frac * step / math.sqrt(float(np.mean(dw ** 2)))
    held_out = (rng.standard_normal((256, n_in)) * scale).T                    # (in, 256)
    return w0, dw.astype(np.float32), keys, cov, held_out


# --- the slab decomposition -------------------------------------------------------------------

@pytest.mark.parametrize("qtype", SLAB_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_slab_bytes_equal_whole_row_bytes(qtype: str, weighted: bool) -> None:
    kernel = get_kernel(qtype)
    w, importance = _rows(n_cols=1024 if kernel.block_size == 256 else 640)
    imp = importance if weighted else None
    whole = kernel.quantize(w, imp, n_threads=1)                               # (rows, row_bytes)
    sigma2 = row_sigma2(w) if weighted and kernel.ggml_type in ROW_SIGMA_TYPES else None
    parts = []
    for j in range(0, w.shape[1], kernel.block_size):
        slab = np.ascontiguousarray(w[:, j:j + kernel.block_size])            # (rows, B)
        piece = None if imp is None else np.ascontiguousarray(imp[j:j + kernel.block_size])
        if sigma2 is None:
            parts.append(kernel.quantize(slab, piece, n_threads=1))
        else:  # the quantizer weighs by the whole row's mean square: pad the slab to it
            padded = pad_to_sigma2(slab, sigma2, kernel.block_size)            # (rows, B + P)
            assert np.array_equal(row_sigma2(padded), sigma2)
            extra = np.ones(padded.shape[1] - slab.shape[1], dtype=np.float32)
            parts.append(kernel.quantize(padded, np.concatenate([piece, extra]), n_threads=1)[:, :kernel.type_size])
    assert np.array_equal(np.concatenate(parts, axis=1), whole)


@pytest.mark.parametrize("qtype", sorted(t.name for t in ROW_SIGMA_TYPES))
def test_row_sigma_types_need_the_padding(qtype: str) -> None:
    """Plain slabs do NOT reproduce these types with an importance vector (sigma2 is per row in ggml);
    if this fails, libgguf changed and ROW_SIGMA_TYPES should shrink."""
    kernel = get_kernel(qtype)
    w, importance = _rows(n_cols=640)
    whole = kernel.quantize(w, importance, n_threads=1)
    parts = [kernel.quantize(np.ascontiguousarray(w[:, j:j + 32]), np.ascontiguousarray(importance[j:j + 32]),
                             n_threads=1) for j in range(0, 640, 32)]
    assert not np.array_equal(np.concatenate(parts, axis=1), whole)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q4_K", "Q2_K", "F16"])
def test_gptq_without_coupling_is_plain_quantization(qtype: str) -> None:
    """With a diagonal H nothing is pushed onto later columns: the slab encoder equals quantize_tensor."""
    w, importance = _rows()
    kernel = get_kernel(qtype)
    got = gptq_encode(kernel, w.astype(np.float64), np.eye(w.shape[1]), importance, n_threads=1)
    assert np.array_equal(got, kernel.quantize(w, importance, n_threads=1))


def test_gptq_error_feedback_lowers_the_hessian_error() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 512)).astype(np.float32)                      # (out, in)
    mix = rng.standard_normal((512, 512)) / math.sqrt(512) + np.eye(512)
    x = rng.standard_normal((4096, 512)) @ mix                                 # (samples, in) correlated inputs
    h = x.T @ x / len(x)                                                       # (in, in)
    kernel = get_kernel("Q4_0")
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(512)                     # (in, in)
    u = inverse_cholesky_upper(damped.copy())
    assert np.allclose(np.triu(u), u) and np.allclose(u.T @ u, np.linalg.inv(damped))

    def h_error(data: np.ndarray) -> float:
        e = kernel.dequantize(data, w.shape).astype(np.float64) - w            # (out, in)
        return float(np.sum((e @ h) * e))

    plain = h_error(kernel.quantize(w, None, n_threads=1))
    assert h_error(gptq_encode(kernel, w.astype(np.float64), u, None, n_threads=1)) < 0.8 * plain


def test_the_factor_computed_in_place_equals_the_one_computed_in_copies() -> None:
    """inverse_cholesky_upper overwrites H with U, bit for bit the U of the out-of-place sequence (factor,
    inverse, symmetrised inverse, its upper factor), and refuses an array it cannot overwrite."""
    import torch

    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 300))                                        # (samples, in)
    h = x.T @ x / 700 + 0.01 * np.eye(300)                                     # (in, in)
    lower = torch.linalg.cholesky(torch.from_numpy(h))
    inv = torch.cholesky_inverse(lower)
    want = torch.linalg.cholesky(0.5 * (inv + inv.T), upper=True).numpy()
    work = h.copy()
    got = inverse_cholesky_upper(work)
    assert np.shares_memory(got, work) and np.array_equal(got, want)
    with pytest.raises(QeditError, match="writable C-contiguous float64"):
        inverse_cholesky_upper(h.astype(np.float32))


# --- importance and Hessian -------------------------------------------------------------------

def test_importance_is_the_normalised_diagonal_of_the_hessian() -> None:
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3, 64))
    cov = np.cov(rng.standard_normal((64, 500))) * 7.0                         # (64, 64), any scale
    imp = edit_importance(keys, cov, 2.0)
    h = edit_hessian(keys, cov, 2.0, damp=0.0)
    assert imp.dtype == np.float32 and imp.shape == (64,)
    assert np.allclose(imp, np.diag(h), rtol=1e-5)
    assert math.isclose(float(np.mean(imp)), 3.0, rel_tol=1e-5)                # mean 1 + lambda
    assert np.allclose(edit_importance(keys, None, 0.0), 1.0)


# --- keeping the edit -------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", LOW_TYPES)
def test_aware_keeps_the_edit_along_the_keys(qtype: str) -> None:
    w0, dw, keys, cov, _ = _edit_case(qtype)
    result = quantize_edited(w0, dw, keys, qtype, cov=cov, n_threads=1)
    assert result.ggml_type.name == qtype
    assert result.data.dtype == np.uint8 and result.data.shape == (256, get_kernel(qtype).row_bytes(1024))
    wq = dequantize_tensor(result.data, qtype, w0.shape)                       # what llama.cpp will compute with
    assert math.isclose(kept_share(w0, w0.astype(np.float64) + dw, wq, keys), result.kept, rel_tol=1e-9)
    naive = dequantize_tensor(quantize_tensor(w0 + dw, qtype, n_threads=1), qtype, w0.shape)
    assert math.isclose(kept_share(w0, w0.astype(np.float64) + dw, naive, keys), result.kept_naive, rel_tol=1e-9)
    assert abs(1.0 - result.kept) <= 0.02, result.info
    assert result.kept_naive < 0.6, "the synthetic edit should be one that naive requantization loses"
    assert result.residual < 0.5 * result.info["residual_naive"]
    history = result.info["kept_history"]
    assert result.kept == min(history, key=lambda k: abs(1.0 - k)) and len(history) == result.rounds + 1


@pytest.mark.parametrize("qtype", LOW_TYPES)
@pytest.mark.parametrize("mechanism", sorted(ONLY))
def test_each_mechanism_alone_keeps_more_than_naive(qtype: str, mechanism: str) -> None:
    w0, dw, keys, cov, _ = _edit_case(qtype)
    result = quantize_edited(w0, dw, keys, qtype, cov=cov, cfg=ONLY[mechanism], n_threads=1)
    margin = 0.03 if mechanism == "importance" else 0.2
    assert abs(1.0 - result.kept) < abs(1.0 - result.kept_naive) - margin, (mechanism, result.kept, result.kept_naive)


@pytest.mark.parametrize("qtype", LOW_TYPES)
@pytest.mark.parametrize("on_grid", [True, False])
def test_aware_weight_stays_a_good_quantization(qtype: str, on_grid: bool) -> None:
    """On inputs other than the keys the aware weight is about as close to Wt as naive's: with C, on
    held-out activations of that distribution; without C, on isotropic inputs."""
    w0, dw, keys, cov, held_out = _edit_case(qtype, on_grid=on_grid)
    wt = w0.astype(np.float64) + dw
    naive = dequantize_tensor(quantize_tensor(w0 + dw, qtype, n_threads=1), qtype, w0.shape)
    isotropic = np.random.default_rng(1).standard_normal((w0.shape[1], 256))  # (in, 256)
    for c, x in ((cov, held_out), (None, isotropic)):
        aware = dequantize_tensor(quantize_edited(w0, dw, keys, qtype, cov=c, n_threads=1).data, qtype, w0.shape)
        err, err_naive = (float(np.linalg.norm((w - wt) @ x)) for w in (aware, naive))
        assert err <= 1.2 * err_naive, ("with C" if c is not None else "without C", err / err_naive)


def test_hessian_loop_damages_less_than_euclidean() -> None:
    """The loop's correction in H's norm hits the loud input columns less than the least Euclidean one."""
    w0, dw, keys, cov, held_out = _edit_case("Q4_K")
    wt = w0.astype(np.float64) + dw
    errs = {}
    for metric in ("hessian", "euclid"):
        cfg = AwareConfig(importance=False, error_feedback=False, loop_metric=metric)
        result = quantize_edited(w0, dw, keys, "Q4_K", cov=cov, cfg=cfg, n_threads=1)
        assert abs(1.0 - result.kept) <= 0.05
        errs[metric] = float(np.linalg.norm((dequantize_tensor(result.data, "Q4_K", w0.shape) - wt) @ held_out))
    assert errs["hessian"] < 0.5 * errs["euclid"]


def test_loop_stops_early_and_can_be_switched_off() -> None:
    w0, dw, keys, cov, _ = _edit_case("Q4_K", on_grid=False)
    loose = quantize_edited(w0, dw, keys, "Q4_K", cov=cov, cfg=AwareConfig(tol=0.2, loop_rounds=6), n_threads=1)
    assert loose.rounds == 0 and abs(1 - loose.kept) <= 0.2
    off = quantize_edited(w0, dw, keys, "Q4_K", cfg=AwareConfig(loop_rounds=0, error_feedback=False), n_threads=1)
    assert off.rounds == 0 and off.info["kept_history"] == [off.kept] and not off.info["error_feedback"]


def test_float_type_and_zero_edit() -> None:
    w0, dw, keys, _, _ = _edit_case("Q4_K", n_out=16, n_in=256)
    result = quantize_edited(w0, dw, keys, "F16", n_threads=1)
    assert abs(1.0 - result.kept) < 1e-3
    zero = quantize_edited(w0, np.zeros_like(dw), keys, "Q4_K", n_threads=1)
    assert math.isnan(zero.kept) and zero.rounds == 0
    assert np.isfinite(dequantize_tensor(zero.data, "Q4_K", w0.shape)).all()


# --- bad input --------------------------------------------------------------------------------

def test_bad_input_names_the_argument() -> None:
    w0 = np.zeros((8, 256), dtype=np.float32)
    keys = np.ones((2, 256), dtype=np.float32)
    with pytest.raises(QeditError, match="dw"):
        quantize_edited(w0, np.zeros((8, 512), dtype=np.float32), keys, "Q4_K")
    with pytest.raises(QeditError, match="keys"):
        quantize_edited(w0, w0, np.ones((2, 128), dtype=np.float32), "Q4_K")
    with pytest.raises(QeditError, match="keys"):
        quantize_edited(w0, w0, np.ones(256, dtype=np.float32), "Q4_K")
    with pytest.raises(QeditError, match="ggml_type"):
        quantize_edited(w0, w0, keys, "Q9_X")
    with pytest.raises(QeditError, match="cov"):
        quantize_edited(w0, w0, keys, "Q4_K", cov=np.eye(128))
    with pytest.raises(QeditError, match="cov"):
        quantize_edited(w0, w0, keys, "Q4_K", cov=-np.eye(256))
    not_psd = np.eye(256) + np.roll(np.eye(256), 1, axis=1) * 3
    with pytest.raises(QeditError, match="cov"):
        quantize_edited(w0, w0 + 0.01, keys, "Q4_K", cov=0.5 * (not_psd + not_psd.T))
    with pytest.raises(QeditError, match="w0"):
        quantize_edited(np.full((8, 256), np.nan, dtype=np.float32), w0, keys, "Q4_K")
    with pytest.raises(QeditError, match="w0"):
        quantize_edited(np.zeros((8, 96), dtype=np.float32), np.zeros((8, 96), dtype=np.float32),
                        np.ones((1, 96), dtype=np.float32), "Q4_K")
    with pytest.raises(QeditError, match="w0"):
        quantize_edited(w0.astype(np.int32), w0, keys, "Q4_K")
    with pytest.raises(QeditError, match="cfg"):
        quantize_edited(w0, w0, keys, "Q4_K", cfg={"loop_rounds": 2})  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value", [("key_weight", -1.0), ("key_weight", float("nan")), ("loop_rounds", -1),
                                          ("loop_rounds", 1.5), ("tol", 2.0), ("damp", -0.1), ("importance", 1),
                                          ("loop_metric", "cosine")])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(QeditError, match=f"AwareConfig.{field}"):
        AwareConfig(**{field: value})

"""Keeping the file's blocks when an edited tensor is re-encoded edit-aware (AwareConfig.keep_blocks)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qedit.core.errors import QeditError
from qedit.kernels import dequantize_tensor, get_kernel, quantize_tensor
from qedit.kernels.aware import AwareConfig, edit_importance, quantize_edited

TYPES = ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"]
LOW_TYPES = ["Q4_K", "Q3_K", "Q2_K"]


def _file_tensor(qtype: str, n_out: int = 64, n_in: int = 512, seed: int = 0):
    """(bytes as a file stores them (out, row_bytes), W0 dequantized from them (out, in), keys (2, in),
    a covariance (in, in) with loud columns, and a rank-one edit dW (out, in) of 0.15 rounding steps rms)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_out, n_in)).astype(np.float32)                  # (out, in)
    g[rng.random(g.shape) < 0.003] *= 10                                       # outliers: scale searches differ
    original = quantize_tensor(g, qtype, n_threads=1)                          # (out, row_bytes)
    w0 = dequantize_tensor(original, qtype, g.shape)                           # (out, in)
    scale = np.exp(0.5 * rng.standard_normal(n_in))                           # (in,)
    z = rng.standard_normal((1024, n_in)) * scale                              # (samples, in)
    cov = z.T @ z / len(z)                                                     # (in, in)
    keys = (rng.standard_normal((2, n_in)) * scale).astype(np.float32)         # (2, in)
    dw = np.outer(rng.standard_normal(n_out), np.linalg.solve(cov, keys[0]))   # (out, in)
    step = math.sqrt(12.0 * float(np.mean((w0 - g) ** 2)))                     # one rounding step (uniform error)
    dw *= 0.15 * step / math.sqrt(float(np.mean(dw ** 2)))                     # as test_aware_quant's edits
    return original, w0, keys, cov, dw.astype(np.float32)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("feedback", [True, False])
def test_a_zero_edit_gives_the_files_bytes_back(qtype: str, feedback: bool) -> None:
    original, w0, keys, cov, _ = _file_tensor(qtype)
    cfg = AwareConfig(error_feedback=feedback, keep_blocks=True)
    got = quantize_edited(w0, np.zeros_like(w0), keys, qtype, cov=cov, cfg=cfg, original=original, n_threads=1)
    assert np.array_equal(got.data, original)
    assert got.info["kept_blocks"]


def test_without_the_files_bytes_a_zero_edit_moves_weights() -> None:
    """Why keep_blocks exists: the K-quant scale search does not map deq(bytes) back to the same bytes."""
    moved = 0
    for qtype in LOW_TYPES + ["Q5_K"]:
        original, w0, keys, cov, _ = _file_tensor(qtype)
        fresh = quantize_edited(w0, np.zeros_like(w0), keys, qtype, cov=cov, n_threads=1)
        moved += int(np.sum(dequantize_tensor(fresh.data, qtype, w0.shape) != w0))
    assert moved > 0


@pytest.mark.parametrize("qtype", LOW_TYPES)
def test_kept_blocks_fit_no_worse_and_move_fewer_weights(qtype: str) -> None:
    """Without feedback or loop each block is the better fit of the two, by the weighted error; with
    feedback and loop too the edit is still kept at its keys and fewer of W0's weights move."""
    original, w0, keys, cov, dw = _file_tensor(qtype)
    kernel = get_kernel(qtype)
    target = w0.astype(np.float64) + dw                                        # (out, in)
    weights = edit_importance(keys, cov, AwareConfig().key_weight).astype(np.float64)  # (in,)

    def block_err(data: np.ndarray) -> np.ndarray:
        d = dequantize_tensor(data, qtype, w0.shape).astype(np.float64) - target
        return (d * d * weights).reshape(w0.shape[0], -1, kernel.block_size).sum(axis=2)  # (out, blocks)

    plain = AwareConfig(error_feedback=False, loop_rounds=0, keep_blocks=True)
    fresh = quantize_edited(w0, dw, keys, qtype, cov=cov, cfg=plain, n_threads=1)
    kept = quantize_edited(w0, dw, keys, qtype, cov=cov, cfg=plain, original=original, n_threads=1)
    assert np.all(block_err(kept.data) <= block_err(fresh.data) + 1e-12)
    assert np.all(block_err(kept.data) <= block_err(original) + 1e-12)

    full = quantize_edited(w0, dw, keys, qtype, cov=cov, cfg=AwareConfig(keep_blocks=True), original=original,
                           n_threads=1)
    fresh_full = quantize_edited(w0, dw, keys, qtype, cov=cov, n_threads=1)
    assert abs(1.0 - full.kept) <= 0.02, full.info
    moved = [int(np.sum(dequantize_tensor(r.data, qtype, w0.shape) != w0)) for r in (full, fresh_full)]
    assert moved[0] < moved[1]


def test_off_by_default_or_without_bytes_nothing_is_kept() -> None:
    original, w0, keys, cov, dw = _file_tensor("Q4_K")
    off = quantize_edited(w0, dw, keys, "Q4_K", cov=cov, original=original, n_threads=1)
    none = quantize_edited(w0, dw, keys, "Q4_K", cov=cov, n_threads=1)
    assert np.array_equal(off.data, none.data) and not off.info["kept_blocks"]


def test_bad_original_names_the_argument() -> None:
    original, w0, keys, _, dw = _file_tensor("Q4_K")
    on = AwareConfig(keep_blocks=True)
    with pytest.raises(QeditError, match="original"):
        quantize_edited(w0, dw, keys, "Q4_K", cfg=on, original=original[:, :-1])
    with pytest.raises(QeditError, match="original"):
        quantize_edited(w0, dw, keys, "Q4_K", cfg=on, original=original.astype(np.int16))
    with pytest.raises(QeditError, match="keep_blocks"):
        AwareConfig(keep_blocks=1)


def test_an_aware_patch_with_a_zero_edit_leaves_the_file_as_it_was(gemma_gguf, tmp_path) -> None:
    """On the real Q4_K_M file: patching a zero edit edit-aware with keep_blocks writes the tensor's own
    bytes back."""
    import torch

    from qedit.converters.gguf.aware import EditEncoding
    from qedit.converters.gguf.patch import patch_gguf
    from qedit.converters.gguf.read import GGUFFile
    from qedit.core.delta import LowRankDelta

    name = "blk.6.ffn_down.weight"
    with GGUFFile(gemma_gguf) as gf:
        n_out, n_in = gf.dequantize(name).shape
        before = bytes(gf.raw(name))
    gen = torch.Generator().manual_seed(0)
    delta = LowRankDelta("model.layers.6.mlp.down_proj.weight", 6, torch.randn(n_out, 1, generator=gen),
                         torch.randn(1, n_in, generator=gen), scale=0.0)
    encoding = EditEncoding({6: torch.randn(1, n_in, generator=gen)}, cfg=AwareConfig(keep_blocks=True))
    dst = tmp_path / "zero.gguf"
    report = patch_gguf(gemma_gguf, dst, [delta], {"test": "zero edit"}, encoding=encoding)
    assert [t.name for t in report.tensors] == [name]
    with GGUFFile(dst) as gf:
        assert bytes(gf.raw(name)) == before

"""benchmarks/bench_tradeoff.py's floor: one weight of a K-quant tensor moved by one grid step."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_tradeoff
    finally:
        sys.path.remove(str(BENCH))
    return bench_tradeoff


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_one_step_moves_one_weight_by_one_grid_step(qtype: Q) -> None:
    from qedit.kernels import dequantize_tensor, quantize_tensor

    w = np.random.default_rng(0).standard_normal((4, 768)).astype(np.float32)    # (rows, cols): 12 blocks
    raw = np.asarray(quantize_tensor(w, qtype)).reshape(-1)
    gf = SimpleNamespace(tensors={"t": SimpleNamespace(ggml_type=qtype)}, raw=lambda name: raw)
    moved = _bench().one_step(SimpleNamespace(gf=gf), "t")
    assert len(moved) == raw.size
    before = dequantize_tensor(raw.tobytes(), qtype, w.shape)
    after = dequantize_tensor(moved, qtype, w.shape)
    changed = np.argwhere(before != after)
    assert len(changed) == 1, f"{qtype.name}: {len(changed)} weights changed"
    r, c = changed[0]
    step = abs(float(after[r, c] - before[r, c]))
    # one step of that weight's sub-block grid: the smallest nonzero gap between its sub-block's values
    sub = 16 if qtype in (Q.Q2_K, Q.Q3_K, Q.Q6_K) else 32
    grid = np.diff(np.unique(before[r, c // sub * sub: (c // sub + 1) * sub]))
    assert step == pytest.approx(grid[grid > 0].min(), rel=1e-3)


def test_one_step_refuses_a_type_that_is_not_a_k_quant() -> None:
    gf = SimpleNamespace(tensors={"t": SimpleNamespace(ggml_type=Q.Q8_0)}, raw=lambda name: np.zeros(34, np.uint8))
    with pytest.raises(SystemExit, match="not a K-quant"):
        _bench().one_step(SimpleNamespace(gf=gf), "t")

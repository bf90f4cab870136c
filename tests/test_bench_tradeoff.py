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


def _row(case: int, naive: dict[float, float], aware: dict[float, float]) -> dict:
    """A --search row: efficacy per path@alpha; |dW| = alpha; perplexity only at the smallest that works."""
    runs = {}
    for path, eff in (("naive", naive), ("aware", aware)):
        for a, e in eff.items():
            runs[f"{path}@{a}"] = {"efficacy": e, "locality": 1.0, "margin": 0.0, "dw_norm": a}
        if ok := [a for a, e in eff.items() if e == 1.0]:
            runs[f"{path}@{min(ok)}"] |= {"ppl_ratio": 1 + min(ok) / 100, "locality_pool": 1.0,
                                          "drift_pool": min(ok) / 10, "drift_own": 0.0}
    return {"case": case, "base_margin": -1.0, "runs": runs}


def test_report_pairs_cases_where_both_work_and_counts_their_strengths(tmp_path: Path, capsys) -> None:
    import json

    alphas = [0.5, 1.0, 2.0]
    rows = [_row(0, {1.0: 1.0, 0.5: 0.0}, {1.0: 1.0, 0.5: 1.0}),         # aware works lower
            _row(1, {1.0: 0.0, 2.0: 1.0}, {1.0: 1.0, 0.5: 0.0}),
            _row(2, {1.0: 0.0, 2.0: 0.0}, {1.0: 1.0, 0.5: 1.0})]         # naive never works: not paired
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"rung": "Q2_K", "alphas": alphas, "cases": rows, "search": True,
                               "floor": {"locality_pool": 0.95, "drift_pool": 0.1, "ppl_ratio": 1.01, "case": 0}}))
    bench = _bench()
    bench.report([run])
    out = capsys.readouterr().out
    assert "| Q2_K | 2 / 3 | naive | 1.500 | 1.500 |" in out          # cases 0 and 1 at alphas 1 and 2
    assert "| Q2_K | 2 / 3 | aware | 0.750 | 0.750 |" in out          # at 0.5 and 1
    assert "| Q2_K | naive | 0 | 1 | 1 | 1 |" in out and "| Q2_K | aware | 2 | 1 | 0 | 0 |" in out
    assert "| Q2_K | 0.950 | 0.100 | 1.0100 |" in out
    assert "| Q2_K | 2 / 0 (p = 0.5) |" in out                           # |dW| smaller on both paired cases

    merged = tmp_path / "merged.json"
    bench.merge([run], merged, None)
    assert json.loads(merged.read_text())["floor"]["drift_pool"] == 0.1
    with pytest.raises(SystemExit, match="one of the inputs"):
        bench.merge([run], run, None)
    assert json.loads(run.read_text())["cases"] == rows

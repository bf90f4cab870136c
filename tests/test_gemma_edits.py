"""Edits on the real Gemma 3 270M (the packaged Q4_K_M GGUF, loaded into torch in fp32)."""
from __future__ import annotations

import pytest
import torch
from conftest import DATA

pytestmark = pytest.mark.real_model

N_CASES = 10
# Measured on CounterFact-dev cases 100-109 (benchmarks/RESULTS.md): efficacy / locality
# ROME 1.0 / 0.8 (sequential rank-one edits at one layer), MEMIT 0.9 / 0.9, AlphaEdit 0.9 / 0.9.
# The target is 0.9 / 0.9; the bounds leave one case of slack below what was measured.
# Since each target stops at its own threshold (qedit.edit.targets), MEMIT's locality here is one case lower, and
# its bound with it (benchmarks/RESULTS.md, "Target optimisation", compares the two rules over 50 cases).
# These were measured with the statistics corpus sampled through a bfloat16 output layer. When that
# precision was chosen per CPU (bfloat16 only with native support), a CPU without it sampled other
# text and locality fell by 0.2 for all three methods; the precision is now fixed (stats.py).
THRESHOLDS = {"rome": (0.9, 0.7), "memit": (0.8, 0.6), "alphaedit": (0.8, 0.8)}


@pytest.fixture(scope="module")
def cases():
    from qedit.core.facts import load_requests

    return load_requests(DATA / "counterfact-dev.jsonl")[100:100 + N_CASES]


@pytest.fixture(scope="module")
def baseline(gemma, cases):
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.torch_runner import TorchRunner

    return evaluate(TorchRunner(gemma), cases)


@pytest.mark.parametrize("method", sorted(THRESHOLDS))
def test_ten_counterfact_edits(gemma, cases, baseline, method):
    from qedit.core.delta import applied
    from qedit.edit.compute import compute_edits
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.torch_runner import TorchRunner

    before = {n: p.detach().clone() for n, p in gemma.model.named_parameters() if "mlp.down_proj" in n}
    outcome = compute_edits(gemma, cases, method)
    with applied(gemma.model, outcome.deltas):
        after = evaluate(TorchRunner(gemma), cases, baseline=baseline).aggregate()
    for name, w in gemma.model.named_parameters():
        if name in before:
            assert torch.equal(w, before[name]), name
    min_eff, min_loc = THRESHOLDS[method]
    assert baseline.aggregate()["efficacy"] < 0.6, "the unedited model must not already prefer the new targets"
    assert after["efficacy"] >= min_eff, after
    assert after["locality"] >= min_loc, after

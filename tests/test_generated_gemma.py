"""Generated answers of the packaged Gemma 3 270M (Q4_K_M) in llama.cpp, on the demo's facts: the unedited
model says the true answers and none of the counterfactual ones; continuations reuse the scoring's KV cache
and equal plain greedy completion; no special token shows."""
from __future__ import annotations

import dataclasses

import pytest

from qedit.core.facts import demo_requests
from qedit.evaluation.metrics import evaluate

pytestmark = pytest.mark.runtime


def test_generated_answers_of_the_unedited_gemma_in_llama_cpp(gemma_gguf):
    pytest.importorskip("llama_cpp")
    from qedit.core.batching import continuation_ids
    from qedit.runtimes.llama import LlamaCppRunner
    from qedit.runtimes.torch_runner import GEN_EXTRA_TOKENS

    runner = LlamaCppRunner(gemma_gguf)
    facts = demo_requests()
    counterfactual = evaluate(runner, facts)
    agg = counterfactual.aggregate()
    assert agg["efficacy_gen"] == 0.0 and agg["generalization_gen"] == 0.0, agg   # nobody edited it yet
    true = [dataclasses.replace(r, target_new=r.ground_truth, ground_truth=r.target_new) for r in facts]
    report = evaluate(runner, true, baseline=counterfactual)
    agg = report.aggregate()
    # " Paris, France." " basketball ..." " Japan. ..." " French. ..." and " his birth, Germany" for Einstein
    assert agg["efficacy_gen"] >= 0.8 and agg["generalization_gen"] >= 0.6, [c.continuation for c in report.cases]
    assert agg["locality_gen"] == 1.0                   # the same model: the same locality answers
    for r, case in zip(true, report.cases):
        budget = len(continuation_ids(runner.tokenizer, r.prompt, r.target_new)[1]) + GEN_EXTRA_TOKENS
        assert case.continuation == runner.complete(r.prompt, budget)
        assert "<" not in case.continuation and case.continuation.strip(), case.continuation

"""qedit.evaluation.metrics on a hand-made runner (the metric arithmetic, exactly), and the torch runner's
scores against a plain forward pass of the full model."""
from __future__ import annotations

import json
from typing import Sequence

import pytest
import torch

from qedit.core.facts import EditRequest
from qedit.evaluation.metrics import METRICS, EvalReport, evaluate, format_summary
from qedit.runtimes.torch_runner import Runner, TokenScore, TorchRunner


class TableRunner:
    """A Runner whose scores come from a table {(prompt, target): (log-probs, argmax ids)}.

    The target's token ids are (1, 2, ...), one per log-prob, so top-1 holds exactly when the
    argmax ids are (1, 2, ...) too. `said`: the continuation of each prompt (default: "...").
    """

    name = "table"

    def __init__(self, table: dict[tuple[str, str], tuple[tuple[float, ...], tuple[int, ...]]],
                 said: dict[str, str] | None = None) -> None:
        self.table = table
        self.said = said or {}
        self.asked: list[tuple[str, str]] = []
        self.continued: list[str] = []

    def score(self, pairs: Sequence[tuple[str, str]], generate: Sequence[bool] | None = None) -> list[TokenScore]:
        self.asked.extend(pairs)
        out = []
        for i, pair in enumerate(pairs):
            logprobs, argmax = self.table[pair]
            text = self.said.get(pair[0], "...") if generate and generate[i] else None
            self.continued += [pair[0]] if text is not None else []
            out.append(TokenScore(tuple(range(1, len(logprobs) + 1)), logprobs, argmax, text))
        return out

    def complete(self, prompt: str, max_tokens: int = 8) -> str:
        return ""

    def describe(self) -> dict[str, str]:
        return {"runner": self.name}


FULL = EditRequest("P1 X", "X", "new", "old", rephrase_prompts=("Q1 X", "Q2 X"),
                   locality_prompts=("L1", "L2"), locality_answers=("a b", "c"), case_id="7")
BARE = EditRequest("P2 Y", "Y", "new2")                          # no ground truth, rephrase or locality
TIE = EditRequest("P3 Z", "Z", "new3", "old3")

EDITED = {
    ("P1 X", "new"): ((-1.0, -3.0), (1, 2)),        # mean -2, top-1 exact
    ("P1 X", "old"): ((-4.0,), (9,)),               # mean -4: efficacy 1, margin +2
    ("Q1 X", "new"): ((-5.0,), (3,)),               # loses to old, not top-1
    ("Q1 X", "old"): ((-1.0,), (1,)),
    ("Q2 X", "new"): ((-1.0, -1.0), (1, 2)),        # wins, top-1
    ("Q2 X", "old"): ((-2.0,), (1,)),
    ("L1", "a b"): ((-1.0, -1.0), (7, 8)),
    ("L2", "c"): ((-1.0,), (9,)),
    ("P2 Y", "new2"): ((-0.5,), (4,)),              # not top-1
    ("P3 Z", "new3"): ((-2.0, -2.0), (1, 5)),       # mean -2: ties with old3, and only half top-1
    ("P3 Z", "old3"): ((-2.0,), (1,)),
}
UNEDITED = dict(EDITED)
UNEDITED.update({("L1", "a b"): ((-1.0, -1.0), (7, 5)), ("L2", "c"): ((-1.0,), (9,))})


def test_runner_protocol_is_met():
    runner: Runner = TableRunner(EDITED)
    assert runner.describe() == {"runner": "table"}


def test_token_score():
    s = TokenScore((4, 5), (-1.0, -2.0), (4, 5))
    assert s.mean_logprob == -1.5 and s.top1
    assert not TokenScore((4, 5), (-1.0, -2.0), (4, 6)).top1
    assert TokenScore((), (), ()).mean_logprob == 0.0


def test_metrics_per_case_and_aggregate():
    requests = [FULL, BARE, TIE]
    baseline = evaluate(TableRunner(UNEDITED), requests)
    runner = TableRunner(EDITED)
    report = evaluate(runner, requests, baseline=baseline)
    # every pair is scored once, in one call
    assert sorted(runner.asked) == sorted(EDITED)
    full, bare, tie = report.cases
    assert (full.case_id, full.subject, full.target_new, full.ground_truth) == ("7", "X", "new", "old")
    assert (full.logp_new, full.logp_true, full.margin) == (-2.0, -4.0, 2.0)
    assert (full.efficacy, full.efficacy_top1) == (1.0, 1.0)
    assert (full.generalization, full.generalization_top1) == (0.5, 0.5)
    assert full.locality_argmax == [[7, 8], [9]]
    assert full.locality == pytest.approx(2 / 3)            # tokens unchanged: 7 yes, 8 vs 5 no, 9 yes
    assert full.locality_top1 == 0.5                         # prompts entirely unchanged: L2 only
    assert (bare.efficacy, bare.efficacy_top1, bare.margin, bare.logp_true) == (None, 0.0, None, None)
    assert (bare.generalization, bare.generalization_top1, bare.locality, bare.locality_top1) == (None, None, None, None)
    assert (tie.efficacy, tie.efficacy_top1, tie.margin) == (0.0, 0.0, 0.0)   # a tie is not a success
    agg = report.aggregate()
    assert agg == pytest.approx({"efficacy": 0.5, "efficacy_top1": 1 / 3, "generalization": 0.5,
                                 "generalization_top1": 0.5, "locality": 2 / 3, "locality_top1": 0.5,
                                 "margin": 1.0, "n_cases": 3.0, "efficacy_gen": 0.0, "generalization_gen": 0.0,
                                 "locality_gen": 1.0, "chat_efficacy_gen": None, "chat_generalization_gen": None})


def test_locality_needs_a_baseline_of_the_same_requests():
    report = evaluate(TableRunner(EDITED), [FULL])
    assert report.cases[0].locality is None and report.aggregate()["locality"] is None
    with pytest.raises(ValueError, match="baseline report has 1 cases, not 2"):
        evaluate(TableRunner(EDITED), [FULL, TIE], baseline=report)


def test_json_report_and_summary(tmp_path):
    requests = [FULL, BARE]
    report = evaluate(TableRunner(EDITED), requests, baseline=evaluate(TableRunner(UNEDITED), requests))
    path = tmp_path / "m.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert data["runner"] == {"runner": "table"}
    assert data["aggregate"] == pytest.approx(report.aggregate())
    assert [c["margin"] for c in data["cases"]] == [2.0, None]
    assert set(METRICS) <= set(data["cases"][0])
    line = format_summary("edited", report)
    assert line.startswith("edited: efficacy=1.000  efficacy_top1=0.500") and "margin=2.000" in line
    assert isinstance(EvalReport(report.runner, []).aggregate()["n_cases"], float)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_torch_runner_matches_a_plain_forward(tiny_dirs, family):
    """Teacher-forced scores of a right-padded batch equal the full model's log-softmax on each
    prompt + target alone (also for Gemma's sliding-window layers and gpt2)."""
    from qedit.converters.loading import load_model
    from qedit.core.batching import continuation_ids

    loaded = load_model(tiny_dirs[family])
    pairs = [("The Eiffel Tower is located in the city of", "Rome"), ("Michael Jordan plays", "tennis and football"),
             ("a", "sun moon star sky"), ("Toyota is a company from the country of", "Japan")]
    runner = TorchRunner(loaded, batch_size=3)                  # two batches, the first padded
    scores = runner.score(pairs)
    for (prompt, target), s in zip(pairs, scores, strict=True):
        p, t = continuation_ids(loaded.tokenizer, prompt, target)
        assert s.target_ids == tuple(t) and len(t) >= 1
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([p + t])).logits[0].float()
        logp = torch.log_softmax(logits, -1)[len(p) - 1: len(p) - 1 + len(t)]     # (len(t), vocab)
        torch.testing.assert_close(torch.tensor(s.logprobs), logp[torch.arange(len(t)), torch.tensor(t)],
                                   atol=1e-4, rtol=1e-4)
        assert s.argmax_ids == tuple(logp.argmax(-1).tolist())
    assert runner.describe()["runner"] == "torch"


def test_llama_runner_token_logprobs_match_a_full_log_softmax():
    """The perplexity path's per-token log-probabilities (log-normaliser only) equal the full log-softmax's."""
    import numpy as np

    from qedit.runtimes.llama import _log_softmax, _token_logprobs

    logits = (torch.randn(7, 50_000, generator=torch.Generator().manual_seed(0)) * 6).numpy()   # (n, vocab)
    ids = [3, 49_999, 0, 123, 4_567, 8, 31_000]
    full = _log_softmax(logits)                                       # (n, vocab)
    want = np.array([full[j, t] for j, t in enumerate(ids)])
    np.testing.assert_allclose(_token_logprobs(logits, ids), want, rtol=0, atol=1e-5)
    ref = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)[torch.arange(7), torch.tensor(ids)]
    np.testing.assert_allclose(_token_logprobs(logits, ids), ref.numpy(), rtol=0, atol=1e-5)


SAID = {"P1 X": " the Newark", "Q1 X": " new", "Q2 X": "newer", "L1": " a b c", "L2": " c", "P3 Z": "NEW3!"}
SAID_BEFORE = dict(SAID, L1=" a b d")


def test_generated_metrics_per_case():
    """Each prompt is continued once (with its new or locality answer); efficacy_gen and generalization_gen
    read the continuation, locality_gen compares it with the baseline's."""
    requests = [FULL, BARE, TIE]
    baseline = evaluate(TableRunner(UNEDITED, SAID_BEFORE), requests)
    runner = TableRunner(EDITED, SAID)
    report = evaluate(runner, requests, baseline=baseline)
    assert runner.continued == ["P1 X", "Q1 X", "Q2 X", "L1", "L2", "P2 Y", "P3 Z"]
    full, bare, tie = report.cases
    assert (full.continuation, full.rephrase_continuations, full.locality_continuations) == (
        " the Newark", [" new", "newer"], [" a b c", " c"])
    assert full.efficacy_gen == 0.0                      # after the article, "Newark" is a longer word than "new"
    assert full.generalization_gen == 0.5                # " new" does; "newer" is a longer word
    assert full.locality_gen == 0.5                      # L2 unchanged, L1 changed
    assert (bare.continuation, bare.efficacy_gen) == ("...", 0.0)
    assert (bare.generalization_gen, bare.locality_gen) == (None, None)
    assert tie.efficacy_gen == 1.0                       # "NEW3!": case ignored, punctuation after the word
    again = EvalReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again.cases[0].locality_continuations == [" a b c", " c"] and again.to_json() == report.to_json()
    assert "efficacy_gen=0.333" in format_summary("x", report)


def test_generated_metrics_can_be_skipped_and_need_a_baseline_with_continuations():
    runner = TableRunner(EDITED, SAID)
    quick = evaluate(runner, [FULL], generate=False)
    assert runner.continued == [] and quick.cases[0].continuation is None
    assert (quick.cases[0].efficacy_gen, quick.cases[0].generalization_gen) == (None, None)
    # a baseline without continuations (generate=False, or a report written before them): no locality_gen
    report = evaluate(TableRunner(EDITED, SAID), [FULL], baseline=quick)
    assert report.cases[0].locality == 1.0 and report.cases[0].locality_gen is None

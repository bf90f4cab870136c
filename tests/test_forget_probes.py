"""Forgetting measured beyond the top-1 token: truth ratio and below_wrong against a fixed wrong answer,
the same on paraphrases, and the sampled leak; on hand-made runners with known probabilities and on the tiny
random models (TorchRunner.sample)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import pytest
from conftest import FACTS

from qedit.core.errors import QeditError
from qedit.evaluation.forget import ForgetReport, evaluate_forget, format_forget_summary
from qedit.evaluation.forget_compare import forget_case_rows, forget_metrics
from qedit.evaluation.forget_probes import LeakSampling, starts_with_answer, truth_ratio, wrong_answers
from qedit.runtimes.torch_runner import TokenScore, TorchRunner, prompt_seed
from qedit.unlearn.requests import ForgetRequest, load_forget_requests


class ProbRunner:
    """Whole-answer probabilities from a table {(prompt, target): P} (one token per target: id 1, its log-prob
    log P, top-1 when P > 0.5); every pair scored is recorded. Samples: `said[prompt]` cycled over the n samples."""

    name = "prob"

    def __init__(self, table: dict[tuple[str, str], float], said: dict[str, list[str]] | None = None) -> None:
        self.table, self.said, self.scored = table, said or {}, []
        self.sampled: list[tuple[str, int, int, float, int]] = []

    def score(self, pairs: Sequence[tuple[str, str]], generate: Sequence[bool] | None = None) -> list[TokenScore]:
        self.scored += list(pairs)
        return [TokenScore((1,), (math.log(self.table[p]),), (1 if self.table[p] > 0.5 else 2,)) for p in pairs]

    def sample(self, items: Sequence[tuple[str, int]], n: int, temperature: float, seed: int) -> list[list[str]]:
        self.sampled += [(prompt, budget, n, temperature, seed) for prompt, budget in items]
        return [[self.said.get(prompt, [""])[j % len(self.said.get(prompt, [""]))] for j in range(n)]
                for prompt, _ in items]

    def nll(self, text: str) -> tuple[float, int]:
        return 1.0, 1

    def describe(self) -> dict[str, str]:
        return {"runner": self.name}


FACT_A = ForgetRequest("A lives in", "A", "Paris", target_new="Rome", paraphrase_prompts=("A's home is", "A stays in"))
FACT_B = ForgetRequest("B lives in", "B", "Tokyo", relation_id="P1")                  # wrong answer from FACT_C
FACT_C = ForgetRequest("C lives in", "C", "Oslo", relation_id="P1", paraphrase_prompts=("C's home is",))
FACT_D = ForgetRequest("D plays", "D", "chess")                                        # no wrong answer at all
TABLE = {("A lives in", "Paris"): 0.6, ("A lives in", "Rome"): 0.2,
         ("A's home is", "Paris"): 0.1, ("A's home is", "Rome"): 0.3,
         ("A stays in", "Paris"): 0.5, ("A stays in", "Rome"): 0.5,
         ("B lives in", "Tokyo"): 0.05, ("B lives in", "Oslo"): 0.15,
         ("C lives in", "Oslo"): 0.4, ("C lives in", "Tokyo"): 0.1,
         ("C's home is", "Oslo"): 0.2, ("C's home is", "Tokyo"): 0.6,
         ("D plays", "chess"): 0.9}


def test_wrong_answers_come_from_target_new_then_the_same_relation(caplog):
    same = ForgetRequest("E lives in", "E", "Oslo", relation_id="P1", target_new="oslo")   # target_new = the answer
    with caplog.at_level("WARNING"):
        got = wrong_answers([FACT_A, FACT_B, FACT_C, FACT_D, same])
    assert got == [("Rome", "target_new"), ("Oslo", "relation"), ("Tokyo", "relation"), (None, None),
                   ("Tokyo", "relation")]       # E: not its own target_new, not C's "Oslo" (the same answer)
    assert "1 of 5 facts have no wrong answer" in caplog.text


def test_truth_ratio_and_below_wrong_by_hand():
    runner = ProbRunner(TABLE)
    report = evaluate_forget(runner, [FACT_A, FACT_B, FACT_C, FACT_D], [], sampling=None)
    a, b, c, d = report.facts
    assert a.truth_ratio == pytest.approx(0.6 / 0.8) and b.truth_ratio == pytest.approx(0.05 / 0.2)
    assert c.truth_ratio == pytest.approx(0.4 / 0.5) and d.truth_ratio is None and d.wrong is None
    assert (a.wrong, a.wrong_source, b.wrong, c.wrong) == ("Rome", "target_new", "Oslo", "Tokyo")
    assert [a.below_wrong, b.below_wrong, c.below_wrong] == [False, True, False]
    agg = report.aggregate()
    assert agg["truth_ratio"] == pytest.approx((0.75 + 0.25 + 0.8) / 3)
    assert agg["below_wrong"] == pytest.approx(1 / 3) and agg["n_ratio"] == 3 and agg["n_facts"] == 4
    # paraphrases: A's two (0.25 below; 0.5 a tie, not below), C's one (0.25 below); B has none
    assert a.para_truth_ratio == pytest.approx((0.25 + 0.5) / 2) and a.para_below_wrong == 0.5
    assert c.para_truth_ratio == pytest.approx(0.25) and c.para_below_wrong == 1.0 and b.para_truth_ratio is None
    assert agg["para_truth_ratio"] == pytest.approx((0.375 + 0.25) / 2)
    assert agg["para_below_wrong"] == pytest.approx(0.75) and agg["n_paraphrased"] == 2
    # exactly the paraphrase pairs were scored, each prompt's pairs together; D (no wrong answer) only on its prompt
    assert runner.scored[:6] == [("A lives in", "Paris"), ("A lives in", "Rome"), ("A's home is", "Paris"),
                                 ("A's home is", "Rome"), ("A stays in", "Paris"), ("A stays in", "Rome")]
    assert set(runner.scored) == set(TABLE) and len(runner.scored) == len(TABLE)
    assert agg["sampled_leak"] is None and agg["n_sampled"] == 0 and not runner.sampled
    assert "truth_ratio=0.600" in format_forget_summary("x", report)


def test_truth_ratio_does_not_underflow():
    assert truth_ratio(-2000.0, -2000.0) == 0.5 and truth_ratio(-3000.0, -1.0) == 0.0
    assert truth_ratio(-1.0, -3000.0) == 1.0


def test_the_leak_rule():
    assert starts_with_answer("  paris, of course", "Paris") and starts_with_answer("Paris", " paris ")
    assert not starts_with_answer("the city of Paris", "Paris") and not starts_with_answer("", "Paris")


@pytest.mark.parametrize("said, leak", [(["Paris"], 1.0), (["Rome", "rome", " Milan"], 0.0),
                                        (["Rome"] * 19 + ["  PARIS is"], 1.0)])
def test_sampled_leak_counts_any_sample_that_says_the_answer(said, leak):
    runner = ProbRunner(TABLE, {"A lives in": said})
    report = evaluate_forget(runner, [FACT_A], [], sampling=LeakSampling(n=20, temperature=1.0, seed=7))
    fact = report.facts[0]
    assert fact.n_samples == 20 and fact.leaks == sum(starts_with_answer(s, "Paris") for s in (said * 20)[:20])
    assert report.aggregate()["sampled_leak"] == leak
    assert runner.sampled == [("A lives in", 1 + 3, 20, 1.0, 7)]     # the answer's tokens + GEN_EXTRA_TOKENS


def test_leak_sampling_is_validated():
    for bad in (dict(n=0), dict(temperature=0.0), dict(temperature=-1.0)):
        with pytest.raises(QeditError):
            LeakSampling(**bad)


def test_reports_keep_the_new_fields_and_read_old_ones(tmp_path):
    report = evaluate_forget(ProbRunner(TABLE, {"A lives in": ["Paris"]}), [FACT_A, FACT_B], [])
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    back = ForgetReport.from_json(data)
    assert back.facts == report.facts and back.aggregate() == report.aggregate()
    for f in data["facts"]:                       # a report written before these metrics existed
        for key in ("logp", "wrong", "wrong_source", "logp_wrong", "para_logp", "para_logp_wrong", "leaks",
                    "n_samples"):
            del f[key]
    old = ForgetReport.from_json(data).aggregate()
    assert old["truth_ratio"] is None and old["sampled_leak"] is None and old["recovery_rate"] is not None


def test_rung_metrics_carry_the_probes_and_their_change_against_fp32():
    fp32 = evaluate_forget(ProbRunner(TABLE, {"A lives in": ["Rome"]}), [FACT_A, FACT_B, FACT_C], [])
    quant = dict(TABLE)
    quant.update({("A lives in", "Paris"): 0.1, ("B lives in", "Tokyo"): 0.3})     # A goes below, B comes back
    rung = evaluate_forget(ProbRunner(quant, {"A lives in": ["Paris"]}), [FACT_A, FACT_B, FACT_C], [])
    m = forget_metrics(rung, fp32, fp32)
    assert m["below_wrong"] == pytest.approx(1 / 3) and fp32.aggregate()["below_wrong"] == pytest.approx(1 / 3)
    assert m["below_wrong_change"] == pytest.approx(0.0)
    assert m["sampled_leak"] == pytest.approx(1 / 3) and m["sampled_leak_change"] == pytest.approx(1 / 3)
    assert m["truth_ratio_change"] == pytest.approx(m["truth_ratio"] - fp32.aggregate()["truth_ratio"])
    rows = forget_case_rows([FACT_A, FACT_B, FACT_C], fp32, [("Q4", rung)])
    assert rows[0]["wrong"] == "Rome" and rows[0]["fp32"]["leaks"] == 0 and rows[0]["rungs"]["Q4"]["leaks"] == 20
    assert rows[1]["rungs"]["Q4"]["below_wrong"] is False and rows[1]["fp32"]["below_wrong"] is True


def test_forget_lines_carry_target_new_paraphrases_and_relation(tmp_path: Path):
    path = tmp_path / "f.jsonl"
    lines = [FACTS[0], {"prompt": "B lives in", "subject": "B", "answer": "Tokyo", "relation_id": 17,
                        "paraphrase_prompts": ["B's home is", "B stays in"]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    first, second = load_forget_requests(path)
    assert (first.target_new, first.paraphrase_prompts) == ("Rome", (FACTS[0]["rephrase_prompt"],))
    assert (second.target_new, second.relation_id, second.paraphrase_prompts) == (None, "17", ("B's home is", "B stays in"))
    assert ("paraphrase_prompt", "B stays in") in second.input_texts()      # checked against the context too
    again = tmp_path / "again.jsonl"
    again.write_text("".join(json.dumps(r.to_json()) + "\n" for r in (first, second)))
    assert load_forget_requests(again) == [first, second]
    with pytest.raises(ValueError, match="belong to a fact"):
        ForgetRequest(None, None, None, texts=("t",), target_new="x")
    with pytest.raises(ValueError, match="paraphrase prompt is empty"):
        ForgetRequest("A x", "A", "y", paraphrase_prompts=(" ",))


# ---- sampling on the tiny models --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runner(tiny_dirs):
    from qedit.converters.loading import load_model

    return TorchRunner(load_model(tiny_dirs["llama"]))


PROMPTS = [f["prompt"] for f in FACTS]


def test_torch_sampling_is_seeded_per_prompt(tiny_runner):
    items = [(p, 4) for p in PROMPTS]
    once = tiny_runner.sample(items, 6, 1.0, seed=3)
    assert [len(s) for s in once] == [6, 6, 6]
    assert tiny_runner.sample(items, 6, 1.0, seed=3) == once                      # the seed fixes the samples
    assert tiny_runner.sample(items[2:], 6, 1.0, seed=3) == once[2:]              # whatever is sampled beside
    assert tiny_runner.sample(items, 6, 1.0, seed=4) != once
    assert len(set(once[0])) > 1, "a random model at temperature 1 says different things"
    assert prompt_seed(3, PROMPTS[0]) != prompt_seed(3, PROMPTS[1]) != prompt_seed(4, PROMPTS[1])


@pytest.mark.parametrize("family", ("llama", "gemma3", "qwen2"))
def test_torch_sampling_near_zero_temperature_is_the_greedy_continuation(tiny_dirs, family):
    from qedit.converters.loading import load_model

    runner = TorchRunner(load_model(tiny_dirs[family]))
    for prompt in PROMPTS:
        assert runner.sample([(prompt, 5)], 3, 1e-4, seed=0) == [[runner.complete(prompt, 5)] * 3]


def test_sampled_leak_on_a_model_that_always_and_never_says_the_answer(tiny_runner):
    """Near temperature 0 every sample is the greedy answer: the model always says its own first word (leak 1)
    and never says an answer it does not give (leak 0)."""
    cold = LeakSampling(n=20, temperature=1e-4, seed=0)
    own = [ForgetRequest(p, f["subject"], tiny_runner.complete(p, 1).strip() or "x") for p, f in zip(PROMPTS, FACTS)]
    assert all(r.answer != "x" for r in own), "the tiny model's first tokens are words"
    assert evaluate_forget(tiny_runner, own, [], sampling=cold).aggregate()["sampled_leak"] == 1.0
    never = [ForgetRequest(r.prompt, r.subject, "zebra" + r.answer) for r in own]
    rep = evaluate_forget(tiny_runner, never, [], sampling=cold)
    assert rep.aggregate()["sampled_leak"] == 0.0 and all(f.leaks == 0 and f.n_samples == 20 for f in rep.facts)
    hot = evaluate_forget(tiny_runner, own, [], sampling=LeakSampling(n=20, temperature=1.0, seed=0))
    assert [f.leaks for f in hot.facts] == [f.leaks for f in evaluate_forget(tiny_runner, own, []).facts]


@pytest.mark.runtime
def test_llama_cpp_sampling_is_seeded_and_cold_sampling_is_greedy(tmp_path):
    """llama.cpp's own sampler (temperature, then the seeded distribution sampler): the same seed gives the same
    samples, a prompt's samples do not depend on what is sampled beside it, and near temperature 0 they are the
    greedy continuation."""
    pytest.importorskip("llama_cpp")
    from conftest import WORDS
    from tiny_archs import build_arch_dir, spm_vocab, write_vocab_gguf

    from qedit.converters.gguf.export import export_gguf
    from qedit.runtimes.llama import LlamaCppRunner

    tokens, types, scores = spm_vocab(list(dict.fromkeys(WORDS)))      # with byte tokens, as test_archs builds it
    template = write_vocab_gguf(tmp_path / "vocab.gguf", tokens, types, scores=scores)
    export_gguf(build_arch_dir("llama", tmp_path / "llama", len(tokens))[0], tmp_path / "tiny.gguf", "F32",
                template=template)
    runner = LlamaCppRunner(tmp_path / "tiny.gguf", n_ctx=64)
    items = [(p, 4) for p in PROMPTS]
    once = runner.sample(items, 6, 1.0, seed=3)
    assert [len(s) for s in once] == [6, 6, 6] and len(set(once[0])) > 1
    assert runner.sample(items, 6, 1.0, seed=3) == once and runner.sample(items[1:], 6, 1.0, seed=3) == once[1:]
    assert runner.sample(items, 6, 1.0, seed=4) != once
    for prompt in PROMPTS:
        assert runner.sample([(prompt, 5)], 3, 1e-4, seed=0) == [[runner.complete(prompt, 5)] * 3]
    # a forget report samples in the runner's runtime: the model's own first words always leak near temperature 0
    own = [ForgetRequest(p, f["subject"], runner.complete(p, 1).strip()) for p, f in zip(PROMPTS, FACTS)]
    cold = evaluate_forget(runner, own, [], sampling=LeakSampling(n=5, temperature=1e-4))
    assert cold.aggregate()["sampled_leak"] == 1.0 and cold.runner["runner"] == "llama.cpp"


# ---- kforget's wrong_margin option ------------------------------------------------------------------------

def test_below_wrong_objective_by_hand():
    import torch

    from qedit.unlearn.objectives import AwayFromAnswer, BelowWrong

    logp = torch.log_softmax(torch.tensor([[0.0, 1.0, 3.0, 2.0], [4.0, 0.0, 0.0, 0.0]]), -1)   # (2, vocab)
    t_ids, wrong = torch.tensor([3, 0]), torch.tensor([1, -1])
    obj = BelowWrong.of(1.0, 2.0, [["p", "w", []]])
    away = AwayFromAnswer(1.0).token_loss(logp, t_ids)
    got = obj.token_loss(logp, t_ids, wrong)
    # row 0: the answer (token 3) is not top-1, yet 1 nat above the wrong answer (token 1): 1 + 2 nats to go
    assert float(away[0]) == 0.0 and float(got[0]) == pytest.approx(3.0)
    assert float(got[1]) == pytest.approx(float(away[1]))                 # no wrong answer: the rank hinge only
    assert obj.cache_tag()["wrong_digest"] != BelowWrong.of(1.0, 2.0, [["p", "v", []]]).cache_tag()["wrong_digest"]


def test_kforget_wrong_margin_is_off_by_default_and_lowers_the_answer_against_its_wrong_one(tiny_dirs):
    """On the tiny llama (its own answers, conftest's target_new as the wrong answers and rephrase prompts as the
    paraphrases): the option lowers the truth ratio on the prompt and on the paraphrases below what the default
    reaches, forgets as much by rank and keeps the retain items."""
    import dataclasses

    from test_forget_tiny import TINY_SETTINGS, tiny_requests

    from qedit.converters.loading import load_model
    from qedit.core.delta import applied
    from qedit.edit.registry import EditContext
    from qedit.pipeline.jobs import make_config
    from qedit.unlearn.registry import get_unlearn_method

    assert make_config("kforget").wrong_margin is None
    with pytest.raises(QeditError):
        make_config("kforget", wrong_margin=-1.0)
    loaded = load_model(tiny_dirs["llama"])
    reqs = [dataclasses.replace(r, target_new=f["target_new"], paraphrase_prompts=(f["rephrase_prompt"],))
            for r, f in zip(tiny_requests(loaded), FACTS)]
    retain = [x for r in reqs for x in r.retain]
    runner = TorchRunner(loaded)
    before = evaluate_forget(runner, reqs, retain, sampling=None)
    agg = {}
    for margin in (None, 2.0):
        cfg = make_config("kforget", **TINY_SETTINGS["kforget"], wrong_margin=margin)
        result = get_unlearn_method("kforget").compute(loaded, reqs, cfg, EditContext())
        with applied(loaded.model, result.deltas):
            agg[margin] = evaluate_forget(runner, reqs, retain, baseline=before, sampling=None).aggregate()
    default, option = agg[None], agg[2.0]
    assert option["truth_ratio"] < default["truth_ratio"] - 0.02, (default, option)
    assert option["para_truth_ratio"] < default["para_truth_ratio"] - 0.05, (default, option)
    assert option["recovery_rate"] <= default["recovery_rate"] and option["retain_kept"] >= default["retain_kept"]

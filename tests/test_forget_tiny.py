"""Unlearning on tiny random models: forget/retain files, the metrics, and GA / NPO / qforget / kforget.

Fast: the tiny models of conftest (4 layers, MLP width 128), and a hand-made runner for the metrics.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import pytest
import torch
from conftest import FACTS

from qedit.core.errors import QeditError
from qedit.core.stats import StatsConfig
from qedit.evaluation.forget import ForgetReport, evaluate_forget, format_forget_summary
from qedit.runtimes.torch_runner import TokenScore, TorchRunner
from qedit.unlearn.requests import ForgetRequest, RetainItem, default_retain, load_forget_requests, load_retain

UNLEARN = ("ga", "npo", "qforget", "kforget")


def write_lines(path: Path, lines: Sequence[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ---- requests and retain files ---------------------------------------------------------------------

def test_load_forget_requests_layouts(tmp_path):
    path = write_lines(tmp_path / "forget.jsonl", [
        FACTS[0],                                                               # CounterFact layout
        {"prompt": "Toyota is a company from", "subject": "Toyota", "answer": "Japan", "text": "Toyota is Japanese"},
        "",
        {"text": ["a passage to forget", "and another"]},
    ])
    reqs = load_forget_requests(path)
    assert len(reqs) == 3
    first = reqs[0]
    assert (first.prompt, first.subject, first.answer) == (FACTS[0]["prompt"], "Eiffel Tower", "Paris")  # not target_new
    assert first.retain == (RetainItem("The Colosseum is located in", "Rome"),)
    assert first.name == "Eiffel Tower -> Paris" and first.is_fact
    assert reqs[1].texts == ("Toyota is Japanese",) and reqs[1].retain == ()
    assert not reqs[2].is_fact and reqs[2].texts == ("a passage to forget", "and another")
    assert load_forget_requests(path, limit=1) == reqs[:1]
    again = write_lines(tmp_path / "again.jsonl", [r.to_json() for r in reqs])
    assert load_forget_requests(again) == reqs


@pytest.mark.parametrize("line, message", [
    ({"prompt": "Toyota is from", "subject": "Toyota", "target_new": "Italy"}, "ground_truth"),
    ({"prompt": "Toyota is from", "subject": "Honda", "answer": "Japan"}, "does not occur in prompt"),
    ({"prompt": "Toyota is from", "subject": "Toyota", "answer": "  "}, "'answer'"),
    ({"prompt": "Toyota is from", "subject": "Toyota", "answer": "Japan", "ground_truth": "Japan"}, "not both"),
    ({"prompt": "Toyota is from", "subject": "Toyota", "answer": "Japan", "locality_prompt": ["a", "b"],
      "locality_ground_truth": ["x"]}, "locality"),
    ({"prompt": "Toyota is from", "subject": "Toyota", "answer": 3}, "must be a string"),
    ({"text": ""}, "empty"),
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
])
def test_forget_file_errors_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [FACTS[0], FACTS[1], line])
    with pytest.raises(QeditError, match=rf"bad\.jsonl:3: .*{message}"):
        load_forget_requests(path)


def test_forget_file_level_errors(tmp_path):
    with pytest.raises(QeditError, match="no such forget file"):
        load_forget_requests(tmp_path / "missing.jsonl")
    with pytest.raises(QeditError, match="no forget requests"):
        load_forget_requests(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(QeditError, match="limit"):
        load_forget_requests(write_lines(tmp_path / "one.jsonl", [FACTS[0]]), limit=0)
    with pytest.raises(ValueError, match="prompt, subject and answer"):
        ForgetRequest(None, None, None)


def test_load_retain_and_default_retain(tmp_path):
    path = write_lines(tmp_path / "retain.jsonl", [{"prompt": "The sun is in the", "answer": "sky"}, FACTS[2]])
    items = load_retain(path)
    assert items == [RetainItem("The sun is in the", "sky"), RetainItem(FACTS[2]["prompt"], "Japan"),
                     RetainItem("Honda is a company from", "Japan")]
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"prompt": "The sun", "answer": ""}])
    with pytest.raises(QeditError, match=r"bad\.jsonl:1: .*'answer'"):
        load_retain(bad)
    reqs = [ForgetRequest("A x", "A", "y", retain_prompts=("B x", "C x"), retain_answers=("y", "z")),
            ForgetRequest("C x", "C", "z", retain_prompts=("B x", "D x"), retain_answers=("y", "w"))]
    # duplicates dropped, and "C x" is itself a prompt to forget
    assert default_retain(reqs) == [RetainItem("B x", "y"), RetainItem("D x", "w")]


# ---- metrics on a hand-made runner -----------------------------------------------------------------

class TableRunner:
    """Scores from a table {(prompt, target): (log-probs, argmax ids)}; target ids are (1, 2, ...)."""

    name = "table"

    def __init__(self, table: dict[tuple[str, str], tuple[tuple[float, ...], tuple[int, ...]]],
                 nll: dict[str, tuple[float, int]] | None = None) -> None:
        self.table, self.nlls = table, nll or {}

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScore]:
        return [TokenScore(tuple(range(1, len(self.table[p][0]) + 1)), *self.table[p]) for p in pairs]

    def complete(self, prompt: str, max_tokens: int = 8) -> str:
        return ""

    def sample(self, items: Sequence[tuple[str, int]], n: int, temperature: float, seed: int) -> list[list[str]]:
        return [[""] * n for _ in items]

    def nll(self, text: str) -> tuple[float, int]:
        return self.nlls[text]

    def describe(self) -> dict[str, str]:
        return {"runner": self.name}


REQS = [ForgetRequest("P1 X", "X", "a b", case_id="1"), ForgetRequest("P2 Y", "Y", "c"),
        ForgetRequest(None, None, None, texts=("some text",))]
RETAIN = [RetainItem("R1", "r"), RetainItem("R2", "s t"), RetainItem("R3", "u")]
BEFORE = {("P1 X", "a b"): ((math.log(0.5), math.log(0.8)), (1, 2)), ("P2 Y", "c"): ((math.log(0.6),), (1,)),
          ("R1", "r"): ((math.log(0.7),), (1,)), ("R2", "s t"): ((math.log(0.4), -1.0), (1, 9)),
          ("R3", "u"): ((math.log(0.2),), (5,))}
AFTER = {("P1 X", "a b"): ((math.log(0.25), math.log(0.4)), (1, 7)),    # first token still top-1: known
         ("P2 Y", "c"): ((math.log(0.1),), (4,)),                          # forgotten
         ("R1", "r"): ((math.log(0.6),), (1,)), ("R2", "s t"): ((math.log(0.1), -1.0), (3, 2)),
         ("R3", "u"): ((math.log(0.5),), (1,))}


def test_forget_metrics_by_hand(tmp_path):
    base = evaluate_forget(TableRunner(BEFORE, {"some text": (6.0, 3)}), REQS, RETAIN)
    rep = evaluate_forget(TableRunner(AFTER, {"some text": (12.0, 3)}), REQS, RETAIN, baseline=base)
    f1, f2 = rep.facts
    assert (f1.name, f1.prob, f1.prob_first, f1.known) == ("X -> a b", pytest.approx(0.1), pytest.approx(0.25), True)
    assert (f2.prob, f2.known) == (pytest.approx(0.1), False)
    assert [r.correct for r in rep.retain] == [True, False, True]
    agg = rep.aggregate()
    assert agg["forget_prob"] == pytest.approx(0.1) and agg["forget_prob_first"] == pytest.approx(0.175)
    assert agg["recovery_rate"] == 0.5 and agg["retain_acc"] == pytest.approx(2 / 3)
    assert agg["retain_kept"] == 0.5          # the baseline got R1 and R2 right; R2 is now wrong
    assert agg["forgotten"] == 0.5            # both facts were known; P2 Y is not any more
    assert agg["text_nll"] == 4.0 and base.aggregate()["text_nll"] == 2.0
    assert base.aggregate()["retain_kept"] is None and agg["n_facts"] == 2
    assert "recovery_rate=0.500" in format_forget_summary("after", rep)
    rep.write_json(tmp_path / "r.json")
    back = ForgetReport.from_json(json.loads((tmp_path / "r.json").read_text()), baseline=base)
    assert back.aggregate() == agg and back.facts == rep.facts
    with pytest.raises(QeditError, match="differ"):
        evaluate_forget(TableRunner(AFTER, {"some text": (1.0, 1)}), REQS, RETAIN[:2], baseline=base)


def test_heldout_items_are_scored_apart(tmp_path):
    held = [RetainItem("R1", "r"), RetainItem("R2", "s t"), RetainItem("R3", "u", held_out=True)]
    base = evaluate_forget(TableRunner(BEFORE, {"some text": (6.0, 3)}), REQS, held)
    agg = evaluate_forget(TableRunner(AFTER, {"some text": (12.0, 3)}), REQS, held, baseline=base).aggregate()
    assert agg["retain_acc"] == 0.5 and agg["heldout_acc"] == 1.0 and base.aggregate()["heldout_acc"] == 0.0
    assert agg["retain_kept"] == 0.5 and (agg["n_retain"], agg["n_heldout"]) == (2, 1)
    assert evaluate_forget(TableRunner(AFTER, {"some text": (1.0, 1)}), REQS, RETAIN).aggregate()["heldout_acc"] is None
    with pytest.raises(QeditError, match="differ"):       # held out or not is part of the item
        evaluate_forget(TableRunner(AFTER, {"some text": (1.0, 1)}), REQS, RETAIN, baseline=base)
    path = write_lines(tmp_path / "held.jsonl", [{"prompt": "The sun is in the", "answer": "sky"}])
    assert load_retain(path, held_out=True) == [RetainItem("The sun is in the", "sky", held_out=True)]
    assert RetainItem("a", "b", held_out=True).to_json() == {"prompt": "a", "answer": "b", "held_out": True}


# ---- methods on tiny models ------------------------------------------------------------------------

TINY_SETTINGS = {
    "ga": dict(steps=8, lr=2e-3, stop_forgotten=False),
    "npo": dict(steps=8, lr=2e-3, stop_forgotten=False),
    "qforget": dict(steps=40, lr=5e-3, n_columns=16, quant_types=("Q4_0",), margin=1.0, polish=0),
    # MEMIT's lambda ~ d_in (tiny: 128-256, see test_methods_tiny); a tiny corpus for the key covariance
    "kforget": dict(forget_margin=1.0, cov_weight=100.0, stats=StatsConfig(n_samples=64, sample_len=16)),
}


@torch.no_grad()
def top_word(loaded, prompt: str) -> str:
    """The tiny model's own top-1 next word after `prompt` (special tokens excluded)."""
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    logits = loaded.model(input_ids=ids).logits[0, -1].float()                     # (vocab,)
    logits[loaded.tokenizer.all_special_ids] = float("-inf")
    return loaded.tokenizer.decode([int(logits.argmax())]).strip()


def tiny_requests(loaded) -> list[ForgetRequest]:
    """conftest's facts with the answer the tiny model gives (so it "knows" them), and their locality
    prompts with the model's own answers as retain items."""
    return [ForgetRequest(f["prompt"], f["subject"], top_word(loaded, f["prompt"]),
                          retain_prompts=(f["locality_prompt"],),
                          retain_answers=(top_word(loaded, f["locality_prompt"]),)) for f in FACTS]


def answer_probs(loaded, reqs: Sequence[ForgetRequest]) -> list[float]:
    return [f.prob_first for f in evaluate_forget(TorchRunner(loaded), reqs, []).facts]


@pytest.mark.parametrize("family", ("llama", "gemma3"))
@pytest.mark.parametrize("method", UNLEARN)
def test_unlearning_lowers_the_answer_without_touching_weights(tiny_dirs, family, method):
    from qedit.converters.loading import load_model
    from qedit.core.delta import applied
    from qedit.edit.registry import EditContext
    from qedit.pipeline.jobs import make_config
    from qedit.unlearn.registry import get_unlearn_method

    if method == "kforget" and family == "gemma3":
        pytest.skip("the tiny random gemma3 answers 'of' to every prompt whatever the subject, so no edit keyed "
                    "to the subject moves it; kforget on Gemma: tests/test_forget_gemma.py")
    loaded = load_model(tiny_dirs[family])
    reqs = tiny_requests(loaded)
    before = answer_probs(loaded, reqs)
    weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    result = get_unlearn_method(method).compute(loaded, reqs, make_config(method, **TINY_SETTINGS[method]), EditContext())
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, weights[name]), f"computing {method} changed {name}"
    layers = loaded.arch.default_layers(loaded.n_layers, multi=True)
    assert {d.layer for d in result.deltas} == set(layers)
    for d in result.deltas:
        assert d.name == loaded.arch.weight_name(d.layer) and d.shape == tuple(loaded.edit_weight(d.layer).shape)
        assert torch.isfinite(d.a).all() and d.norm() > 0
    with applied(loaded.model, result.deltas):
        after = answer_probs(loaded, reqs)
    assert sum(after) < 0.5 * sum(before), f"{method}: P(answer) {before} -> {after}"


def test_qforget_survives_q4_0_and_uses_few_columns(tiny_dirs):
    from qedit.converters.loading import load_model
    from qedit.core.hooks import edit_outputs
    from qedit.edit.registry import EditContext
    from qedit.edit.requant import dense_edits, requantized_changes
    from qedit.pipeline.jobs import make_config
    from qedit.unlearn.registry import get_unlearn_method

    loaded = load_model(tiny_dirs["llama"])
    reqs = tiny_requests(loaded)
    runner = TorchRunner(loaded)
    assert evaluate_forget(runner, reqs, []).aggregate()["recovery_rate"] == 1.0, "the tiny model knows its answers"
    result = get_unlearn_method("qforget").compute(loaded, reqs, make_config("qforget", **TINY_SETTINGS["qforget"]),
                                           EditContext())
    changes = {d.layer: d.dense() for d in result.deltas}
    for d in result.deltas:                                      # only n_columns input columns are used
        assert int((changes[d.layer].abs().sum(0) > 0).sum()) <= 16 and d.rank <= 16
    for view in ("fp32", "Q4_0"):
        eff = changes if view == "fp32" else requantized_changes(loaded, changes, view)
        with edit_outputs(loaded.model, dense_edits(loaded, eff)):
            assert evaluate_forget(runner, reqs, []).aggregate()["recovery_rate"] == 0.0, view
    assert result.info["views"] == ["fp32", "Q4_0"]


def test_kforget_returns_its_keys_and_the_retain_prompts_hold_its_change_off(tiny_dirs):
    """kforget's deltas come with the facts' keys (for the edit-aware encoding), and the retain prompts'
    keys in the solve's prior shrink the change at those prompts' tokens."""
    from qedit.converters.loading import load_model
    from qedit.edit.registry import EditContext
    from qedit.pipeline.jobs import make_config
    from qedit.unlearn.methods.kforget import retain_grams
    from qedit.unlearn.registry import get_unlearn_method

    loaded = load_model(tiny_dirs["llama"])
    reqs = tiny_requests(loaded)
    items = default_retain(reqs)
    layers = loaded.arch.default_layers(loaded.n_layers, multi=True)
    grams = retain_grams(loaded, layers, [x.prompt for x in items], chunk=2)
    change_at_retain = {}
    for weight in (0.0, 100.0):
        cfg = make_config("kforget", **{**TINY_SETTINGS["kforget"], "retain_weight": weight})
        result = get_unlearn_method("kforget").compute(loaded, reqs, cfg, EditContext())
        assert sorted(result.keys) == sorted(layers)
        assert all(k.shape == (len(reqs), loaded.edit_weight(layer).shape[1]) for layer, k in result.keys.items())
        assert result.info["n_retain"] == len(items) and result.info["forget_margin"] == 1.0
        # tr(dW G dW^T): the squared change over every retain-prompt token, G = sum k k^T  (d_in, d_in)
        change_at_retain[weight] = sum(float(torch.trace(d.dense().double() @ grams[d.layer] @ d.dense().double().t()))
                                       for d in result.deltas)
    assert change_at_retain[100.0] < 0.5 * change_at_retain[0.0], change_at_retain


def test_kforget_gives_the_facts_still_known_a_second_pass(tiny_dirs):
    """Under a strong prior (lambda 1e3 on the tiny model) one spread leaves facts top-1; the second pass
    edits only those, on top of the first, and returns the keys of both passes."""
    from qedit.converters.loading import load_model
    from qedit.core.delta import applied
    from qedit.edit.registry import EditContext
    from qedit.pipeline.jobs import make_config
    from qedit.unlearn.registry import get_unlearn_method

    recovery = {}
    for passes in (1, 2):
        loaded = load_model(tiny_dirs["llama"])
        reqs = tiny_requests(loaded)
        cfg = make_config("kforget", **{**TINY_SETTINGS["kforget"], "cov_weight": 1000.0, "passes": passes})
        result = get_unlearn_method("kforget").compute(loaded, reqs, cfg, EditContext())
        n_rows = sum(result.info["passes"])
        assert all(k.shape[0] == n_rows for k in result.keys.values())
        with applied(loaded.model, result.deltas):
            recovery[passes] = evaluate_forget(TorchRunner(loaded), reqs, []).aggregate()["recovery_rate"]
        if passes == 2:
            assert result.info["passes"][0] == len(reqs) and 1 <= result.info["passes"][1] < len(reqs)
            assert len(result.deltas) == 2 * len(result.keys)            # one delta per layer and pass
    assert recovery[2] < recovery[1], recovery


def test_kforget_erases_facts_only(tiny_dirs):
    from qedit.converters.loading import load_model
    from qedit.edit.registry import EditContext
    from qedit.pipeline.jobs import make_config
    from qedit.unlearn.registry import get_unlearn_method

    loaded = load_model(tiny_dirs["llama"])
    text = ForgetRequest(None, None, None, texts=("a passage to forget",))
    with pytest.raises(QeditError, match="kforget erases facts"):
        get_unlearn_method("kforget").compute(loaded, [*tiny_requests(loaded)[:1], text],
                                      make_config("kforget", **TINY_SETTINGS["kforget"]), EditContext())


def test_requantized_changes_round_a_small_change_away(tiny_dirs):
    from qedit.converters.loading import load_model
    from qedit.edit.requant import Requantizer, requantize, requantized_changes

    loaded = load_model(tiny_dirs["llama"])
    w0 = loaded.edit_weight(1).detach().clone()                          # (out, in)
    on_grid = torch.from_numpy(requantize(w0.numpy(), "Q4_0"))
    with torch.no_grad():
        loaded.edit_weight(1).copy_(on_grid)                              # a weight as loaded from a Q4_0 file
    tiny, big = torch.full_like(w0, 1e-6), torch.full_like(w0, 0.05)
    assert float(requantized_changes(loaded, {1: tiny}, "Q4_0")[1].abs().max()) == 0.0
    assert float((requantized_changes(loaded, {1: big}, "Q4_0")[1] - big).abs().mean()) < 0.02
    dw = torch.zeros_like(w0, requires_grad=True)
    Requantizer.for_type(loaded, [1], "Q4_0").ste_changes({1: dw})[1].sum().backward()
    assert torch.equal(dw.grad, torch.ones_like(w0))                     # straight-through gradient
    with pytest.raises(QeditError, match="not loaded from a GGUF"):
        requantized_changes(loaded, {1: tiny}, "source")


def test_registry_refuses_the_wrong_request_kind(tiny_dirs):
    from qedit.converters.loading import load_model
    from qedit.core.facts import request_from_dict
    from qedit.edit.registry import EditContext, get_method
    from qedit.unlearn.registry import get_unlearn_method

    loaded = load_model(tiny_dirs["llama"])
    with pytest.raises(QeditError, match="ga takes ForgetRequests.*EditRequest"):
        get_unlearn_method("ga").compute(loaded, [request_from_dict(FACTS[0])], get_unlearn_method("ga").config_cls(), EditContext())
    with pytest.raises(QeditError, match="rome takes EditRequests.*ForgetRequest"):
        get_method("rome").compute(loaded, tiny_requests(loaded)[:1], get_method("rome").config_cls(), EditContext())


@pytest.mark.parametrize("method, bad", [
    ("ga", dict(lr=0.0)), ("npo", dict(beta=-1.0)), ("qforget", dict(quant_types=("Q9_9",))),
    ("qforget", dict(saliency="random")), ("ga", dict(retain=("not an item",))), ("ga", dict(retain_kl=-1.0)),
    ("npo", dict(retain=(RetainItem("R1", "r", held_out=True),))),      # held-out items are never trained on
    ("kforget", dict(target_margin=2.0)), ("kforget", dict(forget_margin=-1.0)), ("kforget", dict(retain_weight=float("nan"))),
    ("kforget", dict(retain_chunk=0)), ("kforget", dict(passes=0)), ("kforget", dict(max_scale=0.5)), ("kforget", dict(retain=(RetainItem("R1", "r", held_out=True),))),
])
def test_unlearning_configs_are_validated(method, bad):
    from qedit.pipeline.jobs import make_config

    with pytest.raises(QeditError):
        make_config(method, **bad)


def test_qforget_skips_the_source_view_of_a_model_not_loaded_from_gguf(tiny_dirs, caplog):
    from qedit.converters.loading import load_model
    from qedit.edit.registry import EditContext
    from qedit.pipeline.jobs import make_config
    from qedit.unlearn.registry import get_unlearn_method

    loaded = load_model(tiny_dirs["llama"])
    settings = {**TINY_SETTINGS["qforget"], "quant_types": ("source", "Q4_0"), "steps": 2}
    with caplog.at_level("WARNING"):
        result = get_unlearn_method("qforget").compute(loaded, tiny_requests(loaded),
                                                       make_config("qforget", **settings), EditContext())
    assert result.info["views"] == ["fp32", "Q4_0"] and "no 'source' type" in caplog.text

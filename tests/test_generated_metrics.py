"""Generated-answer metrics on tiny models in torch: continuations are greedy, bounded by the answer's token
count + GEN_EXTRA_TOKENS, batched like one prompt at a time, end before special tokens and are decoded without
them; efficacy_gen / generalization_gen / locality_gen read them."""
from __future__ import annotations

import types

import pytest
import torch

from qedit.converters.loading import load_model
from qedit.core.batching import continuation_ids, is_marker_token
from qedit.core.facts import EditRequest
from qedit.evaluation.metrics import answers_with, evaluate
from qedit.runtimes.torch_runner import GEN_EXTRA_TOKENS, TorchRunner


@pytest.mark.parametrize(("text", "target", "ok"), [
    (" Rome, Italy", "Rome", True), ("\n  rome", "Rome", True), (" the Rome", "Rome", True),
    (" An apple", "apple", True), (" The Hague is", "The Hague", True), (" Romeo", "Rome", False),
    (" Japanese", "Japan", False), (" Paris", "Rome", False), (" there Rome", "Rome", False),
    (" U.S. team", "U.S.", True), (" U.S.A", "U.S.", True), ("", "Rome", False), (" a", "Rome", False),
])
def test_answers_with(text, target, ok):
    assert answers_with(text, target) is ok


def test_marker_tokens():
    assert all(is_marker_token(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<|im_end|>"))
    assert not any(is_marker_token(t) for t in ("<table>", "</h1>", "<b>", "Rome", "<", "a_b", "<a b_c>"))


def _greedy(loaded, prompt: str, n: int, stop: frozenset[int]) -> str:
    """Plain greedy decoding, one full forward pass per token, for reference."""
    ids, new = loaded.tokenizer(prompt)["input_ids"], []
    for _ in range(n):
        with torch.no_grad():
            token = int(loaded.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token in stop:
            break
        new.append(token)
    return loaded.tokenizer.decode(new)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_continuations_are_greedy_bounded_and_batched(tiny_dirs, facts, family):
    loaded = load_model(tiny_dirs[family])
    runner = TorchRunner(loaded, batch_size=2)                       # several left-padded batches
    report = evaluate(runner, facts)
    for r, case in zip(facts, report.cases):
        budget = len(continuation_ids(loaded.tokenizer, r.prompt, r.target_new)[1]) + GEN_EXTRA_TOKENS
        assert case.continuation == _greedy(loaded, r.prompt, budget, runner._stop_ids())
        assert case.continuation == runner.complete(r.prompt, budget)
        assert len(loaded.tokenizer(case.continuation, add_special_tokens=False)["input_ids"]) <= budget
        assert case.efficacy_gen == float(answers_with(case.continuation, r.target_new))
        loc_budget = len(continuation_ids(loaded.tokenizer, r.locality_prompts[0], r.locality_answers[0])[1])
        assert case.locality_continuations == [runner.complete(r.locality_prompts[0], loc_budget + GEN_EXTRA_TOKENS)]


@pytest.fixture(scope="module")
def facts():
    from conftest import FACTS

    return [EditRequest(f["prompt"], f["subject"], f["target_new"], f["ground_truth"], (f["rephrase_prompt"],),
                        (f["locality_prompt"],), (f["locality_ground_truth"],)) for f in FACTS]


def test_efficacy_and_locality_gen_follow_what_the_model_says(tiny_dirs, facts):
    """A target the model generates counts, one it does not say does not; locality_gen is 1 against the same
    model and the share of unchanged continuations against another one."""
    loaded = load_model(tiny_dirs["llama"])
    runner = TorchRunner(loaded)
    said = [runner.complete(r.prompt, 1).strip() for r in facts]
    assert all(said), said
    requests = [EditRequest(r.prompt, r.subject, word, r.ground_truth, r.rephrase_prompts, r.locality_prompts,
                            r.locality_answers) for r, word in zip(facts, said)]
    base = evaluate(runner, requests)
    assert [c.efficacy_gen for c in base.cases] == [1.0] * len(requests)
    assert evaluate(runner, requests, baseline=base).aggregate()["locality_gen"] == 1.0
    wrong = [EditRequest(r.prompt, r.subject, "zzz", r.ground_truth) for r in facts]
    assert evaluate(runner, wrong).aggregate()["efficacy_gen"] == 0.0
    with torch.no_grad():
        for p in loaded.model.model.layers[1].mlp.down_proj.parameters():
            p.mul_(-3.0)                                             # another model; the same prompts
    moved = evaluate(TorchRunner(loaded), requests, baseline=base)
    for case, ref in zip(moved.cases, base.cases):
        assert case.locality_gen == float(case.locality_continuations == ref.locality_continuations)


def test_continuations_end_before_special_tokens_and_markers(tiny_dirs):
    """Generated ids (stubbed) are cut at a marker such as <start_of_image>, at end of text and at the budget,
    and decoded without special tokens."""
    loaded = load_model(tiny_dirs["llama"])
    tok = loaded.tokenizer
    tok.add_tokens(["<start_of_image>"])                             # user-defined, not flagged special
    marker, eos, rome, italy = (tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "</s>", "Rome", "Italy"))
    rows = {"a": [rome, italy, marker, rome], "the": [rome, eos, italy, italy], "of": [italy, rome, italy, rome]}

    def generate(input_ids, attention_mask, generation_config):
        assert generation_config.do_sample is False and marker in generation_config.eos_token_id
        new = torch.tensor([rows[tok.decode(x[m.bool()], skip_special_tokens=True)] for x, m in
                            zip(input_ids, attention_mask)])
        return torch.cat([input_ids, new[:, :generation_config.max_new_tokens]], dim=1)

    stub = types.SimpleNamespace(generate=generate, generation_config=loaded.model.generation_config)
    runner = TorchRunner(type(loaded)(stub, tok, loaded.arch, loaded.source, loaded.source_kind))
    assert runner.generate([("a", 4), ("the", 4), ("of", 2)]) == ["Rome Italy", "Rome", "Italy Rome"]

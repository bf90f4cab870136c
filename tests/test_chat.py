"""Chat prompts on a tiny model with a chat template, in torch: facts carry chat_prompt; `--chat` asks each fact
as a one-turn chat with the tokenizer's template (apply_chat_template with the generation prompt) and reports
chat_efficacy_gen; `edit --chat` computes the edit on the chat text, the subject found inside it; a model
without a template is a one-line error. The llama.cpp side is tests/test_chat_llama.py."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_cli import _shown_lines
from test_generated_metrics import _greedy
from test_survival_unit import _result

from qedit.cli import main
from qedit.converters.loading import load_model
from qedit.core.batching import build_batch
from qedit.core.chat import chat_ids, chat_prompt_text
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest, demo_requests, request_from_dict
from qedit.core.stats import StatsConfig
from qedit.edit.keys import context_prefixes, edit_keys
from qedit.evaluation.gate import check_requirements, parse_requirement
from qedit.evaluation.metrics import EvalReport, answers_with, evaluate, format_summary
from qedit.pipeline.chat import chat_requests
from qedit.pipeline.jobs import MethodChoice, make_config
from qedit.pipeline.run import compute_for
from qedit.runtimes.torch_runner import GEN_EXTRA_TOKENS, TorchRunner
from qedit.survival.metrics import all_rung_metrics, to_json
from qedit.survival.report import table_lines, write_reports

# ChatML-like, with the BOS in the template (as Llama 3's and Gemma's templates have it)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_SPECIALS = ("<pad>", "</s>", "<s>", "<|im_start|>", "<|im_end|>")
CHAT_FACTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "ground_truth": "Paris", "chat_prompt": "Where is the Eiffel Tower located?",
     "chat_rephrase_prompt": ["Which city is the Eiffel Tower in?"], "locality_prompt": "The Colosseum is in",
     "locality_ground_truth": "Rome"},
    {"prompt": "Michael Jordan plays the sport of", "subject": "Michael Jordan", "target_new": "tennis",
     "ground_truth": "basketball"},
]


def build_chat_dir(path: Path, family: str = "llama") -> Path:
    """A tiny random model whose byte-level BPE tokenizer (llama.cpp can run it) carries CHAT_TEMPLATE."""
    from conftest import WORDS, byte_level_bpe, make_config
    from transformers import AutoModelForCausalLM

    corpus = [" ".join(WORDS)] * 4 + [f["chat_prompt"] for f in CHAT_FACTS if "chat_prompt" in f] * 2
    tok = byte_level_bpe(corpus, 300, CHAT_SPECIALS)
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config(family, len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    return build_chat_dir(tmp_path_factory.mktemp("chat") / "llama")


@pytest.fixture(scope="module")
def chat_model(chat_dir):
    return load_model(chat_dir)


@pytest.fixture(scope="module")
def chat_facts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat-facts") / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in CHAT_FACTS))
    return path


def _template_ids(tok, question: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True)
    return list(enc["input_ids"] if not isinstance(enc, list) else enc)


def test_facts_carry_an_optional_chat_prompt():
    r = request_from_dict(CHAT_FACTS[0])
    assert (r.chat_prompt, r.chat_question, r.chat_rephrase_prompts) == (
        "Where is the Eiffel Tower located?", "Where is the Eiffel Tower located?", ("Which city is the Eiffel Tower in?",))
    assert request_from_dict(r.to_json()) == r
    plain = request_from_dict(CHAT_FACTS[1])
    assert (plain.chat_prompt, plain.chat_question) == (None, plain.prompt) and "chat_prompt" not in plain.to_json()
    original = request_from_dict({"requested_rewrite": {"prompt": "{} plays", "subject": "Michael Jordan",
                                                        "target_new": {"str": "tennis"}},
                                  "chat_prompt": "What does Michael Jordan play?"})
    assert original.chat_prompt == "What does Michael Jordan play?"
    assert ("chat_prompt", r.chat_prompt) in r.input_texts()
    with pytest.raises(ValueError, match="chat_prompt is empty"):
        request_from_dict(dict(CHAT_FACTS[0], chat_prompt=" "))
    with pytest.raises(ValueError, match="must be a string"):
        request_from_dict(dict(CHAT_FACTS[0], chat_prompt=3))
    demo = demo_requests()
    assert all(d.chat_prompt and d.subject in d.chat_prompt for d in demo)
    assert demo[0].chat_prompt == "Where is the Eiffel Tower located?"


def test_chat_text_is_the_templates_ids_and_the_subject_is_found_in_it(chat_model):
    tok, question = chat_model.tokenizer, CHAT_FACTS[0]["chat_prompt"]
    want = _template_ids(tok, question)
    assert chat_ids(tok, question, "m") == want
    text = chat_prompt_text(tok, question, "m")
    assert not text.startswith("<s>") and text.endswith("<|im_start|>assistant\n") and question in text
    assert tok(text)["input_ids"] == want                         # the BOS the tokenizer adds is the template's
    [r] = chat_requests(tok, "m", [request_from_dict(CHAT_FACTS[0])])
    assert r.prompt == text and r.chat_prompt == question
    batch = build_batch(chat_model, [r.prompt], ["Rome"], [r.subject])
    last = batch.lookup[0]
    upto = tok.decode(batch.input_ids[0, :last + 1].tolist())
    assert upto.endswith("Eiffel Tower") and "<|im_start|>user" in upto    # the subject's last token, inside the chat
    assert batch.input_ids[0, :len(want)].tolist() == want


def test_a_template_without_the_tokenizers_bos_is_used_with_a_warning(chat_model, caplog):
    tok = chat_model.tokenizer
    template, tok.chat_template = tok.chat_template, CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    try:
        text = chat_prompt_text(tok, "Where is the Eiffel Tower located?", "m")
    finally:
        tok.chat_template = template
    assert text.startswith("<|im_start|>user") and "gets a BOS its template does not put there" in caplog.text


def test_a_chat_edit_needs_the_subject_in_the_chat_prompt(chat_model):
    fact = request_from_dict(dict(CHAT_FACTS[0], chat_prompt="Where is that tower?"))
    with pytest.raises(QeditError, match="subject 'Eiffel Tower' does not occur in 'Where is that tower\\?'"):
        chat_requests(chat_model.tokenizer, "m", [fact])


def test_torch_chat_reply_is_greedy_after_the_template(chat_model):
    runner = TorchRunner(chat_model, batch_size=2)
    questions = [f.get("chat_prompt", f["prompt"]) for f in CHAT_FACTS] + ["Which city is the Eiffel Tower in?"]
    replies = runner.chat([(q, 6) for q in questions])
    for q, reply in zip(questions, replies):
        text = chat_prompt_text(chat_model.tokenizer, q, "m")      # the template's ids, as a prompt (tested above)
        assert reply == _greedy(chat_model, text, 6, runner._stop_ids())
    assert runner.chat([]) == []


def test_chat_metrics_read_the_replies(chat_model):
    runner = TorchRunner(chat_model)
    requests = [request_from_dict(f) for f in CHAT_FACTS]
    plain = evaluate(runner, requests)
    assert all(c.chat_reply is None and c.chat_efficacy_gen is None for c in plain.cases)
    report = evaluate(runner, requests, chat=True, progress="chat test")
    for r, c, p in zip(requests, report.cases, plain.cases):
        budget = len(runner._score([(r.prompt, r.target_new)])[0].target_ids) + GEN_EXTRA_TOKENS
        assert c.chat_reply == runner.chat([(r.chat_question, budget)])[0]
        assert c.chat_efficacy_gen == float(answers_with(c.chat_reply, r.target_new))
        assert (c.efficacy, c.continuation) == (p.efficacy, p.continuation)      # the raw metrics are unchanged
    first, second = report.cases
    assert len(first.chat_rephrase_replies) == 1 and first.chat_generalization_gen is not None
    assert second.chat_rephrase_replies == [] and second.chat_generalization_gen is None
    # a model that says the target counts: make each fact's target the first word of the chat reply
    said = [EditRequest(r.prompt, r.subject, (c.chat_reply or "").split()[0], r.ground_truth, chat_prompt=r.chat_prompt)
            for r, c in zip(requests, report.cases)]
    agg = evaluate(runner, said, chat=True).aggregate()
    assert agg["chat_efficacy_gen"] == 1.0
    assert "chat_efficacy_gen=" in format_summary("after", report).splitlines()[1]
    again = EvalReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again.cases[0].chat_reply == first.chat_reply and again.aggregate() == report.aggregate()
    req = parse_requirement("Q4_K_M:chat_efficacy_gen>=0.5", ["Q4_K_M"])
    assert req.metric == "chat_efficacy_gen"


def test_a_model_without_a_chat_template_is_refused_in_one_line(tiny_dirs, facts_file, tmp_path, capsys):
    loaded = load_model(tiny_dirs["llama"])
    with pytest.raises(QeditError, match="has no chat template"):
        evaluate(TorchRunner(loaded), [request_from_dict(CHAT_FACTS[1])], chat=True)
    for argv in (["eval", str(tiny_dirs["llama"]), str(facts_file), "--chat"],
                 ["edit", str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path / "out"), "--chat"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        shown = [line for line in _shown_lines(err) if "Loading weights" not in line]
        assert len(shown) == 1 and shown[0].startswith("qedit: error: ") and "has no chat template" in shown[0], err
    assert not (tmp_path / "out").exists()


def test_edit_chat_computes_the_edit_on_the_chat_text(chat_dir, chat_facts, tmp_path, capsys):
    """`edit --chat --eval`: the edit is computed on the chat text (recorded as the edit's facts), and the chat metrics
    are printed and written; without --chat the edit and the metrics are the raw prompt's."""
    for mode in ("raw", "chat"):
        out, metrics = tmp_path / mode, tmp_path / f"{mode}.json"
        argv = ["edit", str(chat_dir), str(chat_facts), "-o", str(out), "--method", "rome", "--stats-samples", "16",
                "--eval", "--json", str(metrics)] + (["--chat"] if mode == "chat" else [])
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert ("chat_efficacy_gen=" in printed) == (mode == "chat"), printed
        after = json.loads(metrics.read_text())
        assert (after["cases"][0]["chat_reply"] is not None) == (mode == "chat")
        assert after["cases"][0]["continuation"] is not None
        prompts = [f["prompt"] for f in json.loads((out / "qedit_manifest.json").read_text())["facts"]]
        if mode == "raw":
            assert prompts == [f["prompt"] for f in CHAT_FACTS]
        else:
            assert prompts == ["<|im_start|>user\nWhere is the Eiffel Tower located?<|im_end|>\n<|im_start|>assistant\n",
                               "<|im_start|>user\nMichael Jordan plays the sport of<|im_end|>\n<|im_start|>assistant\n"]


def test_a_chat_edits_keys_and_targets_are_read_in_the_chat(chat_model):
    """The key is the MLP input at the subject's last token of the chat text (not of the raw prompt), and the
    target is optimised for the answer after the chat text."""
    fact = request_from_dict(CHAT_FACTS[0])
    method = MethodChoice("rome", make_config("rome", stats=StatsConfig(n_samples=16)))
    outcome = compute_for(method, chat_model, [fact], chat=True)
    [asked] = outcome.requests
    assert asked.prompt == chat_prompt_text(chat_model.tokenizer, fact.chat_prompt, "m")
    [layer] = outcome.keys
    prefixes = context_prefixes(chat_model, outcome.config)
    chat_key = edit_keys(chat_model, [asked], layer, prefixes)
    assert torch.allclose(outcome.keys[layer], chat_key)
    assert not torch.allclose(chat_key, edit_keys(chat_model, [fact], layer, prefixes))
    raw = compute_for(method, chat_model, [fact])
    assert raw.requests[0].prompt == fact.prompt and not torch.allclose(raw.keys[layer], chat_key)


def test_survival_reports_the_chat_metrics_in_every_file(tmp_path):
    plain = to_json(_result())
    assert plain["chat"] is False and "chat" not in table_lines(plain)[0]
    result = dataclasses.replace(_result(), chat=True)
    for measured in (result.reference, result.rungs[0].edited):
        for i, case in enumerate(measured.report.cases):
            said = i == 0 and measured is result.reference           # fp32 answers the first chat, Q4_K_M none
            case.chat_reply, case.chat_efficacy_gen = (" new." if said else " old."), float(said)
    metrics = all_rung_metrics(result)
    assert (metrics["fp32"]["chat_efficacy_gen"], metrics["Q4_K_M"]["chat_efficacy_gen"]) == (0.5, 0.0)
    [gate] = check_requirements([parse_requirement("Q4_K_M:chat_efficacy_gen>=0.5", ["Q4_K_M"])], metrics)
    assert not gate.passed and gate.actual == 0.0
    data = to_json(result)
    assert data["chat"] is True and data["cases"][0]["fp32"]["chat_reply"] == " new."
    write_reports(tmp_path, data)
    rung = list(csv.DictReader((tmp_path / "survival.csv").open()))[1]
    assert (rung["rung"], rung["chat_efficacy_gen"], rung["chat_generalization_gen"]) == ("Q4_K_M", "0.0", "")
    case = list(csv.DictReader((tmp_path / "cases.csv").open()))[0]
    assert (case["chat_efficacy_gen"], case["chat_reply"]) == ("1.0", " new.")
    head, _, fp32 = table_lines(data)[:3]
    assert head.split()[-2:] == ["chat", "gen."] and fp32.split()[-2:] == ["0.500", "-"]
    md = (tmp_path / "report.md").read_text()
    assert "the reply to the fact asked as a chat" in md and "| “new.”\u00a0✓ | “old.” |" in md

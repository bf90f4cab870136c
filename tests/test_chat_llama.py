"""Chat prompts in llama.cpp, on a tiny GGUF exported with `tokenizer.chat_template`: the runner formats a one-turn
chat as llama-cpp-python's `create_chat_completion` does (same prompt tokens, same greedy reply), the same ids
and reply as torch on that file; `eval --chat` and `edit --chat` (a GGUF patch, checked in llama.cpp on the chat
text) report chat_efficacy_gen; a GGUF without a template is a one-line error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_chat import CHAT_FACTS, CHAT_TEMPLATE, build_chat_dir
from test_cli import _shown_lines
from test_gguf_hf import _byte_level_dir

from qedit.cli import main
from qedit.converters.gguf.export import export_gguf
from qedit.converters.gguf.patch import read_manifests
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.loading import load_model
from qedit.core.chat import chat_ids
from qedit.core.errors import QeditError
from qedit.core.facts import request_from_dict
from qedit.core.stats import StatsConfig
from qedit.evaluation.gate import check_requirements, parse_requirement
from qedit.evaluation.metrics import evaluate
from qedit.pipeline.chat import chat_requests
from qedit.pipeline.jobs import MethodChoice, make_config
from qedit.runtimes.llama import LlamaCppRunner
from qedit.runtimes.torch_runner import TorchRunner
from qedit.survival.ladder import run_survival
from qedit.survival.measure import SurvivalConfig, SurvivalJob
from qedit.survival.metrics import all_rung_metrics, to_json
from qedit.survival.rungs import parse_ladder

QUESTIONS = ["Where is the Eiffel Tower located?", "Michael Jordan plays the sport of", "Which city is the Eiffel Tower in?"]


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("chat-gguf")
    report = export_gguf(build_chat_dir(root / "llama"), root / "chat.gguf", "F32")
    assert report.tokenizer == "built from the directory"
    with GGUFFile(root / "chat.gguf") as gf:
        assert gf.fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    return root / "chat.gguf"


@pytest.fixture(scope="module")
def chat_facts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat-facts") / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in CHAT_FACTS))
    return path


@pytest.mark.runtime
def test_llama_cpp_chat_is_create_chat_completions(chat_gguf):
    import llama_cpp

    runner = LlamaCppRunner(chat_gguf)
    replies = runner.chat([(q, 8) for q in QUESTIONS])
    llm = llama_cpp.Llama(model_path=str(chat_gguf), n_ctx=256, verbose=False)
    assert llm.chat_format == "chat_template.default"       # the file's own template, rendered with Jinja2
    loaded = load_model(chat_gguf)
    for question, reply in zip(QUESTIONS, replies):
        done = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0.0, top_k=1,
                                          repeat_penalty=1.0, max_tokens=8)
        ids = runner._chat_ids(question) if runner._chat_ids else []
        assert done["usage"]["prompt_tokens"] == len(ids) == len(chat_ids(loaded.tokenizer, question, "m"))
        assert ids == chat_ids(loaded.tokenizer, question, "m")   # torch on the same file: the same chat ids
        # llama-cpp-python drops the bytes of an incomplete UTF-8 character; qedit shows them as U+FFFD
        assert done["choices"][0]["message"]["content"] == reply.replace("\ufffd", "")
    assert TorchRunner(loaded).chat([(q, 8) for q in QUESTIONS]) == replies


@pytest.mark.runtime
def test_chat_text_scores_alike_in_llama_cpp_and_torch(chat_gguf):
    """A chat-form edit's prompt holds special tokens as text: llama.cpp parses them as torch does, so the
    llama.cpp check scores the chat the edit was computed on."""
    loaded = load_model(chat_gguf)
    chat_form = chat_requests(loaded.tokenizer, "m", [request_from_dict(f) for f in CHAT_FACTS])
    runner = LlamaCppRunner(chat_gguf)
    assert runner.tokenizer(chat_form[0].prompt)["input_ids"] == loaded.tokenizer(chat_form[0].prompt)["input_ids"]
    got = evaluate(runner, chat_form, generate=False).cases
    want = evaluate(TorchRunner(loaded), chat_form, generate=False).cases
    for g, w in zip(got, want):
        assert g.logp_new == pytest.approx(w.logp_new, abs=0.02) and g.margin == pytest.approx(w.margin, abs=0.02)


@pytest.mark.runtime
def test_eval_and_edit_chat_on_a_gguf(chat_gguf, chat_facts, tmp_path, capsys):
    out, metrics = tmp_path / "edited.gguf", tmp_path / "after.json"
    assert main(["edit", str(chat_gguf), str(chat_facts), "-o", str(out), "--method", "rome", "--stats-samples", "16",
                 "--chat", "--eval"]) == 0
    printed = capsys.readouterr().out
    assert "editing 2 fact(s) in their chat form" in printed and "chat_efficacy_gen=" in printed
    assert "verify:" in printed                                  # checked in llama.cpp, on the chat text
    assert main(["eval", str(out), str(chat_facts), "--chat", "--baseline", str(chat_gguf), "--json", str(metrics)]) == 0
    assert "chat_efficacy_gen=" in capsys.readouterr().out
    data = json.loads(metrics.read_text())
    assert data["runner"]["runner"] == "llama.cpp" and data["aggregate"]["chat_efficacy_gen"] is not None
    assert all(isinstance(c["chat_reply"], str) for c in data["cases"])
    assert data["aggregate"]["chat_generalization_gen"] is not None   # the first fact has a chat paraphrase


@pytest.mark.runtime
def test_a_gguf_without_a_template_is_refused(tiny_dirs, facts_file, tmp_path, capsys):
    src, _ = _byte_level_dir("llama", tmp_path / "plain")
    export_gguf(src, tmp_path / "plain.gguf", "F32")
    with pytest.raises(QeditError, match="has no chat template"):
        LlamaCppRunner(tmp_path / "plain.gguf").chat([])
    assert main(["eval", str(tmp_path / "plain.gguf"), str(facts_file), "--chat"]) == 2
    shown = _shown_lines(capsys.readouterr().err)
    assert len(shown) == 1 and shown[0].startswith("qedit: error: ") and "has no chat template" in shown[0], shown


@pytest.mark.runtime
def test_survival_chat_measures_each_rung_as_a_chat(chat_gguf, tmp_path):
    """The ladder with chat=True: the edit `edit --chat` computes, each rung's file asked as a chat in llama.cpp
    (the tiny model's context is too short for the packaged fluency text, so a short text stands in)."""
    loaded = load_model(chat_gguf)
    requests = [request_from_dict(f) for f in CHAT_FACTS]
    method = MethodChoice("rome", make_config("rome", stats=StatsConfig(n_samples=16)))
    cfg = SurvivalConfig(rungs=parse_ladder("Q8_0"), artifacts=tmp_path / "artifacts", progress=False,
                         text="The Eiffel Tower is located in the city of Paris. Michael Jordan plays basketball.")
    result = run_survival(SurvivalJob(chat_gguf, requests, method, chat=True), cfg, loaded)
    assert result.chat and result.requests == requests
    metrics = all_rung_metrics(result)
    assert metrics["Q8_0"] is not None and metrics["Q8_0"]["chat_efficacy_gen"] is not None
    [gate] = check_requirements([parse_requirement("Q8_0:chat_efficacy_gen>=0", ["Q8_0"])], metrics)
    assert gate.passed
    data = to_json(result)
    assert data["chat"] is True and isinstance(data["cases"][0]["rungs"]["Q8_0"]["chat_reply"], str)
    assert result.rungs[0].edited is not None and result.rungs[0].edited.report.runner["runner"] == "llama.cpp"
    with GGUFFile(result.rungs[0].artifacts["edited"]) as gf:                 # the file `edit --chat` writes
        facts = read_manifests(gf)[-1]["facts"]
    assert facts[0]["prompt"].startswith("<|im_start|>user\nWhere is the Eiffel Tower located?")

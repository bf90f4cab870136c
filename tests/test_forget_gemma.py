"""Unlearning on the real Gemma 3 270M (the packaged Q4_K_M GGUF, in torch fp32), without llama.cpp.

Six CounterFact-dev facts the unedited model knows. Naive GA forgets them in full precision, but once
its edited tensors are requantized to their source types (Q6_K / Q4_K, as `qedit patch` would store
them) most come back; qforget's stay forgotten in full precision, at the source types and at Q4_0, and
the retain facts stay as the unedited model had them. "Requantized" = quantize + dequantize the edited
weights with qedit's llama.cpp-exact kernels (qedit.edit.requant).
"""
from __future__ import annotations

import pytest
import torch
from conftest import DATA

pytestmark = pytest.mark.real_model

FORGET_IDS = ("54", "86", "475", "750", "1270", "1375")     # Finland, Greek, Kabul, Asia, Norman, baseball
RETAIN_IDS = ("1103", "2086", "1251", "1945", "2558", "2494")  # known facts given to the methods as retain set
HELD_IDS = ("1104", "1341", "1817", "2370", "1616", "1634", "1680", "2557", "1283", "1310")  # never seen by them


@pytest.fixture(scope="module")
def setup(gemma_gguf):
    from qedit.converters.loading import load_model
    from qedit.evaluation.forget import evaluate_forget
    from qedit.runtimes.torch_runner import TorchRunner
    from qedit.unlearn.requests import RetainItem, default_retain, load_forget_requests

    torch.set_num_threads(1)
    loaded = load_model(gemma_gguf)
    by_id = {r.case_id: r for r in load_forget_requests(DATA / "counterfact-dev.jsonl")}
    requests = [by_id[i] for i in FORGET_IDS]
    retain = tuple(RetainItem(by_id[i].prompt, by_id[i].answer) for i in RETAIN_IDS)
    held = [RetainItem(by_id[i].prompt, by_id[i].answer) for i in HELD_IDS]
    eval_items = held + default_retain(requests)
    base = {view: score(loaded, requests, eval_items, None, view) for view in ("fp32", "source", "Q4_0")}
    assert base["fp32"].aggregate()["recovery_rate"] == 1.0, "the unedited model must know every fact"
    assert evaluate_forget(TorchRunner(loaded), [], list(retain)).aggregate()["retain_acc"] == 1.0
    return loaded, requests, retain, eval_items, base


def score(loaded, requests, items, changes, view, baseline=None):
    """The forget report with dW = changes applied (None: unedited), in full precision or requantized."""
    from qedit.core.hooks import edit_outputs
    from qedit.edit.requant import dense_edits, requantized_changes
    from qedit.evaluation.forget import evaluate_forget
    from qedit.runtimes.torch_runner import TorchRunner

    layers = loaded.arch.default_layers(loaded.n_layers, multi=True)
    changes = changes or {layer: torch.zeros(tuple(loaded.edit_weight(layer).shape)) for layer in layers}
    eff = changes if view == "fp32" else requantized_changes(loaded, changes, view)
    with edit_outputs(loaded.model, dense_edits(loaded, eff)):
        return evaluate_forget(TorchRunner(loaded), requests, items, baseline)


def run(loaded, requests, retain, method, **settings):
    from qedit.core.delta import combine
    from qedit.edit.registry import EditContext
    from qedit.pipeline.jobs import make_config
    from qedit.unlearn.registry import get_unlearn_method

    cfg = make_config(method, retain=retain, **settings)
    result = get_unlearn_method(method).compute(loaded, requests, cfg, EditContext())
    return {d.layer: d.dense() for d in combine(result.deltas)}, result


def test_naive_ga_forgets_in_fp32_but_facts_come_back_when_requantized(setup):
    loaded, requests, retain, items, base = setup
    changes, _ = run(loaded, requests, retain, "ga")
    fp32 = score(loaded, requests, items, changes, "fp32").aggregate()["recovery_rate"]
    source = score(loaded, requests, items, changes, "source").aggregate()["recovery_rate"]
    assert fp32 <= 1 / 6, f"GA should forget in full precision (recovery {fp32:.2f})"
    assert source >= 0.5, f"requantized to Q6_K/Q4_K, GA's facts should come back (recovery {source:.2f})"


def test_qforget_stays_forgotten_at_q4_k_m_and_q4_0(setup):
    loaded, requests, retain, items, base = setup
    changes, result = run(loaded, requests, retain, "qforget")
    for view in ("fp32", "source", "Q4_0"):
        agg = score(loaded, requests, items, changes, view, base[view]).aggregate()
        assert agg["recovery_rate"] == 0.0, f"{view}: {agg}"
        assert agg["forget_prob_first"] < 0.05, f"{view}: {agg}"
        assert agg["retain_kept"] >= 0.8, f"{view}: retain facts lost: {agg}"
    assert result.info["views"] == ["fp32", "source", "Q4_0"]
    assert set(result.info["types"]["source"].values()) == {"Q4_K", "Q6_K"}


def aware_view(loaded, result, changes, view):
    """The change a patched file of `view`'s types holds for a kforget edit: each edited tensor encoded
    edit-aware at the edit's keys (what `qedit forget` writes), dequantized, minus W0."""
    from qedit.converters.gguf.aware import encoding_for
    from qedit.edit.requant import resolve_qtype
    from qedit.kernels import dequantize_tensor
    from qedit.pipeline.jobs import make_config

    encoding = encoding_for(loaded, result.keys, make_config("kforget").stats)
    out = {}
    for layer, dw in changes.items():
        w0 = loaded.edit_weight(layer).detach().float().cpu().numpy()                 # (out, in)
        qtype = resolve_qtype(loaded, layer, view)
        enc = encoding.encode(f"blk.{layer}.ffn_down.weight", layer, w0, dw.float().cpu().numpy(), qtype)
        assert enc is not None and enc.kept >= 0.98, f"layer {layer} {qtype.name}: kept {enc and enc.kept}"
        out[layer] = torch.from_numpy(dequantize_tensor(enc.data, qtype, w0.shape) - w0)
    return out


def test_kforget_forgets_keeps_the_retain_facts_and_survives_requantization_edit_aware(setup):
    """kforget (MEMIT's closed form keyed to each subject, retain prompts in the solve): the facts are
    forgotten at full precision and stay forgotten once the edited tensors are encoded edit-aware at their
    source types and at Q4_0, and the retain facts stay as the unedited model had them."""
    loaded, requests, retain, items, base = setup
    changes, result = run(loaded, requests, retain, "kforget")
    assert sorted(result.keys) == sorted(changes) and result.info["n_retain"] >= len(retain)
    for view in ("fp32", "source", "Q4_0"):
        eff = changes if view == "fp32" else aware_view(loaded, result, changes, view)
        agg = score(loaded, requests, items, eff, "fp32", base[view]).aggregate()
        assert agg["recovery_rate"] == 0.0, f"{view}: {agg}"
        assert agg["retain_kept"] >= 0.8, f"{view}: retain facts lost: {agg}"

"""The aware ladder computes the edit on each coarse rung's unedited file and patches it onto that file.

The tiny model's vocabulary makes llama.cpp abort, so here the rung files are scored by the torch model
loaded from them (dequantized); tests/test_survival_gemma.py runs the same path in llama.cpp."""
from __future__ import annotations

import pytest
import torch



@pytest.fixture(autouse=True)
def _torch_scores_gguf(monkeypatch):
    from qedit.model import load_model
    from qedit.runners import TorchRunner
    from qedit.survival import ladder

    monkeypatch.setattr(ladder, "_llama_runner", lambda cfg: lambda path, lora=None: TorchRunner(load_model(path)))


@pytest.fixture()
def tiny_gguf(tiny_dirs, tmp_path):
    from conftest import make_tokenizer
    from qedit.converters.gguf_export import export_gguf
    from test_gguf_export import _tokenizer_template

    tok = make_tokenizer()
    template = _tokenizer_template(tmp_path / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    src = tmp_path / "tiny.gguf"
    export_gguf(tiny_dirs["llama"], src, "F32", template=template)
    return src


def _requests():
    from conftest import FACTS
    from qedit.facts import request_from_dict

    fact = dict(FACTS[0], target_new=FACTS[0]["ground_truth"], ground_truth=FACTS[0]["target_new"])
    return [request_from_dict(fact)]


@pytest.mark.parametrize("aware", [True, False], ids=["aware", "naive"])
def test_coarse_rungs_measure_the_edit_computed_on_their_own_file(tiny_gguf, tmp_path, aware):
    from qedit.api import edit, make_config
    from qedit.commands_gguf import edit_encoding
    from qedit.converters.gguf_patch import read_manifests
    from qedit.converters.gguf_read import GGUFFile
    from qedit.delta import fold
    from qedit.model import load_model
    from qedit.survival.ladder import SurvivalConfig, run_survival
    from qedit.survival.on_rung import edit_with
    from qedit.survival.rungs import parse_ladder

    loaded = load_model(tiny_gguf)
    requests = _requests()
    cfg = make_config("rome", layers=(1,))
    outcome = edit(loaded, requests, "rome", cfg)
    fold(loaded.model, outcome.deltas, sign=-1.0)
    seen: list[dict[str, torch.Tensor]] = []
    inner = edit_with(requests, "rome", cfg)

    def edit_fn(model):
        seen.append({n: p.detach().clone() for n, p in model.model.named_parameters()})
        return inner(model)

    ladder = SurvivalConfig(rungs=parse_ladder("Q8_0,Q4_K_M"), artifacts=tmp_path / "art", progress=False)
    encoding = edit_encoding(loaded, outcome, naive=not aware)

    def run():
        return run_survival(loaded, requests, outcome.deltas, ladder, method="rome", manifest=outcome.manifest(loaded),
                            encoding=encoding, edit_fn=edit_fn)

    result = run()
    by = {r.rung.name: r for r in result.rungs}
    assert all(r.status == "ok" for r in result.rungs), [r.reason for r in result.rungs]
    assert by["Q8_0"].computed_on == "source"                  # 8 bits: the full-precision edit
    assert by["Q8_0"].delta_norm == pytest.approx(result.delta_norm)
    if not aware:
        assert not seen and by["Q4_K_M"].computed_on == "source"
        return
    # Q4_K_M: the edit was computed once, on the rung's unedited weights (not the source's)
    assert len(seen) == 1 and by["Q4_K_M"].computed_on == "rung"
    base = load_model(by["Q4_K_M"].artifacts["baseline"])
    for name, p in base.model.named_parameters():
        assert torch.equal(seen[0][name], p), name
    assert any(not torch.equal(p, dict(loaded.model.named_parameters())[n]) for n, p in base.model.named_parameters())
    edited = "blk.1.ffn_down.weight"
    with GGUFFile(by["Q4_K_M"].artifacts["baseline"]) as b, GGUFFile(by["Q4_K_M"].artifacts["edited"]) as e:
        assert list(b.tensors) == list(e.tensors)
        for name, info in b.tensors.items():                   # a patch of the rung file: only the edit differs
            assert (b.raw(name).tobytes() == e.raw(name).tobytes()) == (name != edited), name
            assert e.tensors[name].ggml_type == info.ggml_type
        info = read_manifests(e)[-1]["info"]
        assert info["computed_on"].startswith("Q4_K_M artifact") and info["source_edit_reused"] is False
        assert read_manifests(e)[-1]["encoding"]["path"] == "aware"
    rung_norm = by["Q4_K_M"].delta_norm
    assert rung_norm > 0 and rung_norm != pytest.approx(result.delta_norm, rel=1e-6)
    # a rerun reuses the patched file without computing the edit again, and reports the same norm
    again = {r.rung.name: r for r in run().rungs}
    assert len(seen) == 1 and again["Q4_K_M"].built == [] and again["Q4_K_M"].delta_norm == pytest.approx(rung_norm)
    assert again["Q4_K_M"].encoding == by["Q4_K_M"].encoding == "aware" and again["Q4_K_M"].computed_on == "rung"
    assert again["Q4_K_M"].edited.report.to_json() == by["Q4_K_M"].edited.report.to_json()


def test_a_rung_with_the_source_weights_keeps_the_source_edit(tiny_gguf, tmp_path):
    """A rung file whose weights are the source's (Gemma's Q4_K_M rung of its Q4_K_M file): the source edit
    is that rung's edit, and nothing is recomputed."""
    from qedit.api import edit, make_config
    from qedit.commands_gguf import edit_encoding
    from qedit.converters.gguf_export import export_gguf
    from qedit.delta import fold
    from qedit.model import load_model
    from qedit.survival.on_rung import edit_on_rung, same_weights

    q4 = tmp_path / "q4.gguf"
    export_gguf(tiny_gguf, q4, "Q4_K_M")
    loaded = load_model(q4)
    outcome = edit(loaded, _requests(), "rome", make_config("rome", layers=(1,)))
    fold(loaded.model, outcome.deltas, sign=-1.0)
    assert not same_weights(load_model(tiny_gguf), loaded)
    encoding = edit_encoding(loaded, outcome, naive=False)
    calls = []
    made = edit_on_rung(q4, loaded, lambda m: calls.append(m), outcome.deltas, encoding, outcome.config.stats)
    assert made.reused and not calls and made.deltas == tuple(outcome.deltas) and made.encoding is encoding
    assert made.delta_norm == pytest.approx(sum(d.norm() for d in outcome.deltas))

"""A survival rung measures exactly the file `qedit edit --quant RUNG` writes: the ladder builds each rung's
edited file through the same pipeline, so its tensor data is byte-identical to the `edit` output for the same
facts and settings. Below 5 bits the edit is computed on the rung's unedited file and patched onto it.

The tiny model's vocabulary makes llama.cpp abort, so here the rung files are scored by the torch model
loaded from them and the llama.cpp check is off (tests/test_survival_gemma.py runs the ladder in llama.cpp).
"""
from __future__ import annotations

import json

import pytest
import torch

from qedit.cli import main
from qedit.converters.gguf.patch import read_manifests
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.loading import load_model
from qedit.core.stats import StatsConfig
from qedit.pipeline.jobs import MethodChoice, make_config
from qedit.runtimes.torch_runner import TorchRunner
from qedit.survival.build import RungContext
from qedit.survival.ladder import run_survival
from qedit.survival.measure import SurvivalConfig, SurvivalJob
from qedit.survival.rungs import parse_ladder

SETTINGS = ["--method", "rome", "--layers", "1", "--stats-samples", "16", "--no-verify"]


@pytest.fixture(autouse=True)
def _torch_scores_gguf(monkeypatch):
    monkeypatch.setattr(RungContext, "llama", lambda self, path, lora=None: TorchRunner(load_model(path)))


@pytest.fixture()
def tiny_gguf(tiny_dirs, tmp_path):
    from conftest import FACTS, make_tokenizer
    from test_gguf_export import _tokenizer_template

    from qedit.converters.gguf.export import export_gguf

    tok = make_tokenizer()
    template = _tokenizer_template(tmp_path / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    src = tmp_path / "tiny.gguf"
    export_gguf(tiny_dirs["llama"], src, "F32", template=template)
    fact = dict(FACTS[0], target_new=FACTS[0]["ground_truth"], ground_truth=FACTS[0]["target_new"])  # not yet true
    facts = tmp_path / "fact.jsonl"
    facts.write_text(json.dumps(fact) + "\n")
    return src, facts


def _tensor_bytes(path) -> dict[str, bytes]:
    with GGUFFile(path) as gf:
        return {name: gf.raw(name).tobytes() for name in gf.tensors}


def _ladder(src, facts, tmp_path, rungs: str, naive: bool = False):
    from qedit.core.facts import load_requests

    cfg = make_config("rome", layers=(1,), stats=StatsConfig(n_samples=16))   # what SETTINGS give `edit`
    job = SurvivalJob(src, load_requests(facts), MethodChoice("rome", cfg), naive=naive)
    ladder = SurvivalConfig(rungs=parse_ladder(rungs), artifacts=tmp_path / "art", progress=False, verify=False)
    return job, ladder


@pytest.mark.parametrize("naive", [False, True], ids=["default", "naive"])
def test_each_rung_measures_the_file_edit_writes(tiny_gguf, tmp_path, capsys, naive):
    src, facts = tiny_gguf
    job, ladder = _ladder(src, facts, tmp_path, "Q8_0,Q4_K_M", naive)
    result = run_survival(job, ladder)
    by = {r.rung.name: r for r in result.rungs}
    assert all(r.status == "ok" for r in result.rungs), [r.reason for r in result.rungs]
    for rung in ("Q8_0", "Q4_K_M"):
        out = tmp_path / f"edit-{rung}.gguf"
        argv = ["edit", str(src), str(facts), "-o", str(out), "--quant", rung, *SETTINGS]
        assert main(argv + (["--naive"] if naive else [])) == 0
        assert _tensor_bytes(by[rung].artifacts["edited"]) == _tensor_bytes(out), rung
    capsys.readouterr()
    assert by["Q8_0"].computed_on == "source" and by["Q8_0"].delta_norm == pytest.approx(result.delta_norm)
    assert by["Q4_K_M"].computed_on == ("source" if naive else "rung")
    assert by["Q4_K_M"].encoding == ("naive" if naive else "aware")


def test_below_5_bits_the_edit_is_computed_on_the_rungs_own_file(tiny_gguf, tmp_path):
    src, facts = tiny_gguf
    job, ladder = _ladder(src, facts, tmp_path, "Q4_K_M")
    (rung,) = run_survival(job, ladder).rungs
    base, edited = rung.artifacts["baseline"], rung.artifacts["edited"]
    with GGUFFile(base) as b, GGUFFile(edited) as e:      # a patch of the rung file: only the edited tensor differs
        assert list(b.tensors) == list(e.tensors)
        for name, info in b.tensors.items():
            assert (b.raw(name).tobytes() == e.raw(name).tobytes()) == (name != "blk.1.ffn_down.weight"), name
            assert e.tensors[name].ggml_type == info.ggml_type
        last = read_manifests(e)[-1]
        assert "exported at Q4_K_M" in last["info"]["computed_on"] and last["encoding"]["path"] == "aware"
    source, quantized = load_model(src), load_model(base)
    assert any(not torch.equal(p, dict(source.model.named_parameters())[n]) for n, p in quantized.model.named_parameters())
    # a rerun finds the rung's file and reports the same edit without computing it again
    again = run_survival(job, ladder).rungs[0]
    assert again.built == [] and again.computed_on == "rung" and again.delta_norm == pytest.approx(rung.delta_norm)
    assert again.edited.report.to_json() == rung.edited.report.to_json()


def test_a_rung_with_the_source_weights_computes_the_edit_on_the_source(tiny_gguf, tmp_path, capsys):
    """A Q4_K_M export of a Q4_K_M file copies every tensor: the edit is the source's, not computed again."""
    from qedit.converters.gguf.export import export_gguf

    src, facts = tiny_gguf
    q4 = tmp_path / "q4.gguf"
    export_gguf(src, q4, "Q4_K_M")
    out = tmp_path / "again.gguf"
    assert main(["edit", str(q4), str(facts), "-o", str(out), "--quant", "Q4_K_M", *SETTINGS]) == 0
    assert "the weights equal the source's" in capsys.readouterr().out
    with GGUFFile(out) as gf:
        assert "computed_on" not in read_manifests(gf)[-1]["info"]


def test_the_python_api_writes_the_file_the_command_writes(tiny_gguf, tmp_path, capsys):
    import qedit

    src, facts = tiny_gguf
    cli = tmp_path / "cli.gguf"
    assert main(["edit", str(src), str(facts), "-o", str(cli), "--quant", "Q3_K_M", *SETTINGS]) == 0
    capsys.readouterr()
    run = qedit.edit_model(src, facts, tmp_path / "api.gguf", method="rome", quant="Q3_K_M", verify=False,
                     settings={"layers": (1,), "stats": StatsConfig(n_samples=16)})
    assert run.computed_on != src and run.written.path == tmp_path / "api.gguf"
    assert _tensor_bytes(tmp_path / "api.gguf") == _tensor_bytes(cli)

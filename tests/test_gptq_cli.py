"""GPTQ on the command line and on the survival ladder, on tiny models: `edit --format gptq` writes a
checkpoint, editing a GPTQ checkpoint patches it, `eval` runs it, and the ladder's GPTQ and
bitsandbytes rungs measure edited and baseline models in their runtimes."""
from __future__ import annotations

import importlib.util
import json

import pytest

from qedit.cli import main

FAST = ["--stats-samples", "16", "--method", "rome"]
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def gptq_out(tiny_dirs, facts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("gq") / "edited-gptq"
    assert main(["edit", str(tiny_dirs["llama"]), str(facts_file), "-o", str(out), "--format", "gptq",
                 "--bits", "4", "--group-size", "32", *FAST]) == 0
    return out


def test_edit_writes_an_edit_aware_gptq_checkpoint(gptq_out, capsys):
    from qedit.converters.gptq.checkpoint import is_gptq_checkpoint, read_checkpoint_config
    from qedit.converters.gptq.export import read_manifest

    assert is_gptq_checkpoint(gptq_out)
    cfg = read_checkpoint_config(gptq_out)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act) == (4, 32, True, True)
    manifest = read_manifest(gptq_out)
    assert manifest["method"] == "rome" and manifest["encoding"]["path"] == "edit-aware"
    # below 8 bits the unedited model is written at 4 bits first, the edit computed on it and patched in
    assert manifest["gptq"]["operation"] == "patch" and "GPTQ 4-bit" in manifest["info"]["computed_on"]
    assert "previous" not in manifest


@pytest.mark.runtime
def test_eval_runs_a_gptq_checkpoint(gptq_out, facts_file, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", str(gptq_out), str(facts_file), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "runner: " in out and ("gptqmodel" in out or "dequantiz" in out)
    data = json.loads((tmp_path / "m.json").read_text())
    assert len(data["cases"]) == 3


def test_editing_a_gptq_checkpoint_patches_only_edited_weights(gptq_out, facts_file, tmp_path):
    from qedit.converters.gptq.export import read_manifest

    out = tmp_path / "patched"
    assert main(["edit", str(gptq_out), str(facts_file), "-o", str(out), "--layers", "2", *FAST]) == 0
    manifest = read_manifest(out)
    assert manifest["gptq"]["operation"] == "patch" and manifest["previous"][0]["method"] == "rome"
    before, after = _tensors(gptq_out), _tensors(out)
    assert set(before) == set(after)
    changed = {k for k in before if before[k].numpy().tobytes() != after[k].numpy().tobytes()}
    assert changed and all(k.startswith("model.layers.2.mlp.down_proj.") for k in changed), changed


@pytest.mark.parametrize("extra, message", [
    (["--format", "gptq", "--bits", "5"], "bits"),
    (["--format", "gptq", "--group-size", "48"], "group_size"),
])
def test_bad_gptq_settings_fail_before_any_work(tiny_dirs, facts_file, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert main(["edit", str(tiny_dirs["llama"]), str(facts_file), "-o", str(out), *extra, *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_format_gptq_refuses_a_gguf_output(tiny_dirs, facts_file, tmp_path, capsys):
    assert main(["edit", str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path / "x.gguf"),
                 "--format", "gptq", *FAST]) == 2
    assert "--format" in capsys.readouterr().err


def test_ladder_parses_gptq_and_bnb_rungs():
    from qedit.core.errors import QeditError
    from qedit.survival.rungs import RungKind, parse_ladder

    rungs = parse_ladder("Q4_K_M,GPTQ-3", gptq="8,4", bnb="int8,NF4")
    assert [r.name for r in rungs] == ["Q4_K_M", "GPTQ-3", "GPTQ-8", "GPTQ-4", "BNB-int8", "BNB-nf4"]
    assert [r.kind for r in rungs[1:4]] == [RungKind.GPTQ] * 3 and rungs[-1].spec == "nf4"
    assert [r.runtime for r in rungs[-2:]] == ["bitsandbytes"] * 2
    assert [r.name for r in parse_ladder("none", gptq="2")] == ["GPTQ-2"]
    with pytest.raises(QeditError, match="--gptq: GPTQ rung '5'"):
        parse_ladder("none", gptq="5")
    with pytest.raises(QeditError, match="--bnb: bitsandbytes rung 'int4'"):
        parse_ladder("none", bnb="int4")


@pytest.mark.runtime
def test_survival_gptq_and_bnb_rungs(tiny_dirs, facts_file, tmp_path, capsys):
    """One report for GPTQ-8, GPTQ-4 and bitsandbytes rungs; a rerun reuses the GPTQ checkpoints."""
    bnb = ["--bnb", "int8,nf4"] if HAS_BNB else []
    args = ["survival", str(tiny_dirs["llama"]), str(facts_file), "--ladder", "none", "--gptq", "8,4",
            "--gptq-group-size", "32", *bnb, "-o", str(tmp_path / "r"), *FAST]
    assert main(args) == 0
    data = json.loads((tmp_path / "r" / "survival.json").read_text())
    rungs = {r["name"]: r for r in data["rungs"]}
    assert list(rungs)[:2] == ["GPTQ-8", "GPTQ-4"]
    for name, r in rungs.items():
        assert r["status"] == "ok", (name, r["reason"])
        assert r["metrics"]["efficacy"] is not None and r["bits_per_weight"] > 0
    assert rungs["GPTQ-4"]["encoding"] == "aware" and sorted(rungs["GPTQ-4"]["built"]) == ["baseline", "edited"]
    assert rungs["GPTQ-8"]["bits_per_weight"] > rungs["GPTQ-4"]["bits_per_weight"]
    assert rungs["GPTQ-4"]["runner"]["runner"] in ("gptqmodel", "gptq-dequantized-torch")
    if HAS_BNB:
        assert rungs["BNB-nf4"]["runner"]["runner"] == "bitsandbytes-nf4"
        assert rungs["BNB-int8"]["bits_per_weight"] > rungs["BNB-nf4"]["bits_per_weight"]
    assert (tmp_path / "r" / "survival.png").is_file()
    assert main(args) == 0                                  # rerun into the same report: nothing rebuilt
    again = {r["name"]: r for r in json.loads((tmp_path / "r" / "survival.json").read_text())["rungs"]}
    assert again["GPTQ-4"]["built"] == [] and again["GPTQ-8"]["built"] == []

"""CLI checks of GGUF outputs that fail before any model is loaded: each is one line and exit code 2."""
from __future__ import annotations

import pytest

from qedit.cli import main


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


@pytest.mark.parametrize("argv_tail, match", [
    (["-o", "{tmp}/out_dir", "--quant", "Q4_K_M"], "give an output ending in .gguf"),
    (["-o", "{tmp}/x.gguf", "--quant", "Q4_K_M", "--as-lora"], "exclusive"),
    (["-o", "{tmp}/x.gguf", "--quant", "Q4_K_Z"], "not a supported llama.cpp file type"),
    (["-o", "{model}"], "refusing to write the output over its own input"),
    (["-o", "{tmp}/x.gguf", "--tensor-type", "blk.6.ffn_down.weight"], "expected PATTERN=TYPE"),
    (["-o", "{tmp}/x.gguf", "--tensor-type", "x=Q9_9"], "TYPE one of"),
    (["-o", "{tmp}/x.gguf", "--set", "target.nope=3"], "has no setting 'nope'"),
    (["-o", "{tmp}/x.gguf", "--set", "target=3"], "is a group of settings"),
    (["-o", "{tmp}/x.gguf", "--set", "stats.n_samples=many"], "not a valid value for n_samples"),
])
def test_edit_output_errors_are_one_line_and_write_nothing(fake_gguf, facts_file, tmp_path, capsys, argv_tail, match):
    argv = ["edit", str(fake_gguf), str(facts_file)] + [a.format(tmp=tmp_path, model=fake_gguf) for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_patch_and_lora_need_a_gguf_source(facts_file, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    assert main(["edit", str(hf_dir), str(facts_file), "-o", str(tmp_path / "p.gguf")]) == 2
    assert "a patch needs a .gguf source" in capsys.readouterr().err
    assert main(["edit", str(hf_dir), str(facts_file), "-o", str(tmp_path / "p.gguf"), "--as-lora"]) == 2
    assert "--as-lora needs the GGUF" in capsys.readouterr().err


def test_nested_settings_reach_the_method_config():
    from qedit.cli.args import merge_settings
    from qedit.core.stats import StatsConfig
    from qedit.edit.methods.memit import MemitConfig

    got = merge_settings(MemitConfig, {"stats": StatsConfig(n_samples=8)},
                         ["target.steps=5", "stats.sample_len=32", "cov_weight=10", "target_margin=none"])
    cfg = MemitConfig(**got)
    assert cfg.target.steps == 5 and cfg.target.lr == MemitConfig().target.lr
    assert cfg.stats.n_samples == 8 and cfg.stats.sample_len == 32
    assert cfg.cov_weight == 10.0 and cfg.target_margin is None


@pytest.mark.parametrize("argv_tail, match", [
    (["-o", "{tmp}/out.bin"], "give a name ending in .gguf"),
    (["-o", "{tmp}/out.gguf", "--quant", "Q4_K_Z"], "not a supported llama.cpp file type"),
    (["-o", "{model}"], "refusing to write the output over its own input"),
])
def test_export_bad_arguments(fake_gguf, tmp_path, capsys, argv_tail, match):
    argv = ["export", str(fake_gguf)] + [a.format(tmp=tmp_path, model=fake_gguf) for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_export_missing_model(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "no such model" in capsys.readouterr().err


def test_survival_bad_rung_and_requirement(fake_gguf, facts_file, tmp_path, capsys):
    assert main(["survival", str(fake_gguf), str(facts_file), "-o", str(tmp_path / "r"), "--ladder", "Q4_K_M,Q7"]) == 2
    assert "valid rungs are" in capsys.readouterr().err
    assert main(["survival", str(fake_gguf), str(facts_file), "-o", str(tmp_path / "r"), "--ladder", "Q4_K_M",
                 "--require", "Q2_K:efficacy>=0.9"]) == 2
    assert "not in the ladder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_survival_refuses_a_foreign_nonempty_dir(fake_gguf, facts_file, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["survival", str(fake_gguf), str(facts_file), "-o", str(out), "--ladder", "Q4_K_M"]) == 2
    assert "holds no earlier survival report" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"

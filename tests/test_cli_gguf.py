"""CLI checks of GGUF outputs that fail before any model is loaded: each is one line and exit code 2."""
from __future__ import annotations

import pytest

from qedit.cli import main
from qedit.commands_gguf import GGUFMode, gguf_output_mode, parse_tensor_types
from qedit.errors import QeditError


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def test_output_modes(fake_gguf, tmp_path):
    assert gguf_output_mode(tmp_path / "out", fake_gguf) is None
    assert gguf_output_mode(tmp_path / "p.gguf", fake_gguf) is GGUFMode.PATCH
    assert gguf_output_mode(tmp_path / "e.gguf", fake_gguf, quant="q4_k_m") is GGUFMode.EXPORT
    assert gguf_output_mode(tmp_path / "l.gguf", fake_gguf, as_lora=True) is GGUFMode.LORA
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    assert gguf_output_mode(tmp_path / "e2.gguf", hf_dir, quant="Q8_0") is GGUFMode.EXPORT


@pytest.mark.parametrize("kwargs, out_name, match", [
    ({"quant": "Q4_K_M"}, "out_dir", "give an output ending in .gguf"),
    ({"quant": "Q4_K_M", "as_lora": True}, "x.gguf", "exclusive"),
    ({"quant": "Q4_K_Z"}, "x.gguf", "not a supported llama.cpp file type"),
    ({}, "model.gguf", "refusing to write the output over its own input"),
])
def test_output_mode_errors(fake_gguf, tmp_path, kwargs, out_name, match):
    with pytest.raises(QeditError, match=match):
        gguf_output_mode(tmp_path / out_name, fake_gguf, **kwargs)


def test_patch_and_lora_need_a_gguf_source(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with pytest.raises(QeditError, match="a patch needs a .gguf source"):
        gguf_output_mode(tmp_path / "p.gguf", hf_dir)
    with pytest.raises(QeditError, match="--as-lora needs the GGUF"):
        gguf_output_mode(tmp_path / "p.gguf", hf_dir, as_lora=True)


def test_tensor_type_rules():
    assert parse_tensor_types(["blk.*.ffn_down.weight=q8_0", "*=F16"]) == [("blk.*.ffn_down.weight", "Q8_0"), ("*", "F16")]
    for bad, match in (("blk.6.ffn_down.weight", "expected PATTERN=TYPE"), ("x=Q9_9", "not a GGML tensor type")):
        with pytest.raises(QeditError, match=match):
            parse_tensor_types([bad])


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

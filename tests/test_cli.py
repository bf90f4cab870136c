"""The `qedit` command in-process: edit a tiny model into a loadable HF directory with its
deltas and manifest, evaluate it (locality against the model with its deltas removed), and
refuse bad input with exit code 2, a one-line error, and nothing written."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import FACTS

from qedit.cli import main
from qedit.core.delta import DELTAS_FILE, MANIFEST_FILE, load_deltas

FAST = ["--stats-samples", "16"]



def _tree_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _shown_lines(err: str) -> list[str]:
    """stderr as a terminal leaves it, without progress bars (tqdm redraws with carriage returns)."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    return [line for line in lines if line.strip() and not re.search(r"\d+%\|", line)]


@pytest.fixture(scope="module")
def edited(tiny_dirs, facts_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "edited"
    source_before = _tree_digest(tiny_dirs["llama"])
    assert main(["edit", str(tiny_dirs["llama"]), str(facts_file), "-o", str(out), "--method", "rome", *FAST]) == 0
    assert _tree_digest(tiny_dirs["llama"]) == source_before, "the input model was modified"
    return out


def test_edit_writes_a_loadable_directory_with_deltas_and_manifest(edited, tiny_dirs, facts_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qedit.core.model import fingerprint_source

    names = {p.name for p in edited.iterdir()}
    assert {DELTAS_FILE, MANIFEST_FILE, "config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert edited.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (edited / MANIFEST_FILE).stat().st_mode & 0o777 == 0o666 & ~umask

    manifest = json.loads((edited / MANIFEST_FILE).read_text())
    assert manifest["method"] == "rome" and manifest["architecture"] == "llama"
    assert [f["prompt"] for f in manifest["facts"]] == [f["prompt"] for f in FACTS]
    assert [f["target_new"] for f in manifest["facts"]] == [f["target_new"] for f in FACTS]
    assert manifest["config"]["stats"]["n_samples"] == 16 and manifest["config"]["target"]["steps"] >= 1
    assert manifest["source"] == str(tiny_dirs["llama"]) and manifest["source_kind"] == "hf"
    assert manifest["source_sha256"] == fingerprint_source(tiny_dirs["llama"])
    deltas, _ = load_deltas(edited)
    assert len(deltas) == len(FACTS) and all(d.rank == 1 for d in deltas)
    assert manifest["layers"] == sorted({d.layer for d in deltas})

    model = AutoModelForCausalLM.from_pretrained(edited, local_files_only=True)
    source = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(edited, local_files_only=True)
    src_tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"], local_files_only=True)
    assert tok(FACTS[0]["prompt"])["input_ids"] == src_tok(FACTS[0]["prompt"])["input_ids"]
    edited_params, source_params = dict(model.named_parameters()), dict(source.named_parameters())
    change = sum(d.stored_dense() for d in deltas)
    for name, p in edited_params.items():
        if name == deltas[0].name:
            torch.testing.assert_close(p.detach(), source_params[name].detach() + change, atol=1e-5, rtol=1e-5)
            assert float((p - source_params[name]).detach().abs().max()) > 1e-3
        else:
            assert torch.equal(p, source_params[name]), name


def _assert_close_dicts(got: dict, want: dict) -> None:
    """Equal keys; floats equal up to float rounding (the eval of a qedit output subtracts its deltas)."""
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, float) and got[key] is not None:
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        else:
            assert got[key] == value, key


def test_eval_writes_metrics_with_locality_against_the_unedited_model(edited, tiny_dirs, facts_file, tmp_path, capsys):
    from qedit.converters.loading import load_model
    from qedit.core.facts import load_requests
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.torch_runner import TorchRunner

    metrics = tmp_path / "m.json"
    assert main(["eval", str(edited), str(facts_file), "--json", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert "runner: torch" in out and "efficacy=" in out and f"wrote {metrics}" in out
    data = json.loads(metrics.read_text())
    assert set(data) == {"runner", "aggregate", "cases"} and data["aggregate"]["n_cases"] == len(FACTS)
    requests = load_requests(facts_file)
    expected = evaluate(TorchRunner(load_model(edited)), requests,
                        baseline=evaluate(TorchRunner(load_model(tiny_dirs["llama"])), requests))
    _assert_close_dicts(data["aggregate"], expected.aggregate())
    assert data["aggregate"]["locality"] is not None
    for got, want in zip(data["cases"], expected.to_json()["cases"], strict=True):
        assert got.pop("locality_argmax") == want.pop("locality_argmax")
        _assert_close_dicts(got, want)
        assert {"efficacy", "generalization", "locality", "margin", "logp_new"} <= set(got)


def test_eval_with_explicit_baseline_and_without(tiny_dirs, facts_file, tmp_path):
    plain = tmp_path / "plain.json"
    assert main(["eval", str(tiny_dirs["llama"]), str(facts_file), "--json", str(plain)]) == 0
    assert json.loads(plain.read_text())["aggregate"]["locality"] is None        # no baseline known
    same = tmp_path / "same.json"
    assert main(["eval", str(tiny_dirs["gpt2"]), str(facts_file), "--baseline", str(tiny_dirs["gpt2"]),
                 "--json", str(same)]) == 0
    assert json.loads(same.read_text())["aggregate"]["locality"] == 1.0          # a model against itself


def test_edit_gpt2_in_batches_with_eval(tiny_dirs, facts_file, tmp_path, capsys):
    out, metrics = tmp_path / "out", tmp_path / "after.json"
    assert main(["edit", str(tiny_dirs["gpt2"]), str(facts_file), "-o", str(out), "--method", "memit",
                 "--layers", "1,2", "--batch-size", "2", "--rank", "1", "--eval", "--json", str(metrics), *FAST]) == 0
    text = capsys.readouterr().out
    assert "before: efficacy=" in text and "after : efficacy=" in text
    deltas, manifest = load_deltas(out)
    assert len(manifest["info"]["batches"]) == 2 and manifest["layers"] == [1, 2]
    assert [d.rank for d in deltas] == [1] * 4 and {d.orientation.value for d in deltas} == {"in_out"}
    assert json.loads(metrics.read_text())["aggregate"]["locality"] is not None


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: qedit") and all(c in text for c in ("edit", "eval", "demo", "examples:"))
    for command in ("edit", "eval", "demo"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: qedit {command}")


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory) -> Path:
    """A tiny model of an architecture qedit does not support (OPT)."""
    from conftest import make_tokenizer
    from transformers import AutoModelForCausalLM, OPTConfig

    path = tmp_path_factory.mktemp("opt") / "opt"
    tok = make_tokenizer()
    config = OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _facts(tmp_path: Path, lines: list[str], name: str = "bad.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps(FACTS[0])


# (case id, argv builder, what the message must say). Builders get (model dir, facts, tmp dir, out, opt dir).
BAD = [
    ("missing-model", lambda m, f, t, o, x: ["edit", str(t / "nope"), str(f), "-o", str(o)], "no such file or directory"),
    ("missing-facts", lambda m, f, t, o, x: ["edit", str(m), str(t / "nope.jsonl"), "-o", str(o)], "no such facts file"),
    ("malformed-line", lambda m, f, t, o, x: ["edit", str(m), str(_facts(t, [GOOD, "{oops"])), "-o", str(o)],
     "bad.jsonl:2: not valid JSON"),
    ("unknown-arch", lambda m, f, t, o, x: ["edit", str(x), str(f), "-o", str(o)], "architecture 'opt' is not supported"),
    ("subject-absent", lambda m, f, t, o, x: ["edit", str(m), str(_facts(t, [json.dumps(dict(FACTS[0], subject="Big Ben"))])),
                                              "-o", str(o)], "bad.jsonl:1: subject 'Big Ben' does not occur"),
    ("layer-out-of-range", lambda m, f, t, o, x: ["edit", str(m), str(f), "-o", str(o), "--method", "memit",
                                                  "--layers", "99"], "layer 99 is out of range"),
    ("rome-two-layers", lambda m, f, t, o, x: ["edit", str(m), str(f), "-o", str(o), "--method", "rome", "--layers", "1,2"],
     "ROME edits exactly one layer"),
    ("bad-rank", lambda m, f, t, o, x: ["edit", str(m), str(f), "-o", str(o), "--rank", "0"], "rank must be >= 1"),
    ("bad-batch", lambda m, f, t, o, x: ["edit", str(m), str(f), "-o", str(o), "--batch-size", "0"], "batch size"),
    ("bad-limit", lambda m, f, t, o, x: ["edit", str(m), str(f), "-o", str(o), "--limit", "0"], "limit must be at least 1"),
    ("missing-corpus", lambda m, f, t, o, x: ["edit", str(m), str(f), "-o", str(o), "--corpus", str(t / "c.txt")],
     "corpus file not found"),
    ("eval-missing-model", lambda m, f, t, o, x: ["eval", str(t / "nope"), str(f), "--json", str(o)],
     "no such file or directory"),
    ("eval-json-over-facts", lambda m, f, t, o, x: ["eval", str(m), str(_facts(t, [GOOD], "facts.jsonl")),
                                                    "--json", str(t / "facts.jsonl")], "own input"),
    ("edit-json-over-model-file", lambda m, f, t, o, x: ["edit", str(m), str(f), "-o", str(o), "--eval", "--json",
                                                         str(m / "config.json")], "part of the model directory"),
    ("edit-json-is-output", lambda m, f, t, o, x: ["edit", str(m), str(f), "-o", str(o), "--eval", "--json", str(o)],
     "--json and --output are the same path"),
]


@pytest.mark.parametrize("build, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_dirs, facts_file, opt_dir, tmp_path, capsys,
                                                            build, message):
    model = tiny_dirs["llama"]
    before = {p: _tree_digest(p) for p in (model, opt_dir)}
    existing = set(tmp_path.iterdir())
    out = tmp_path / "out"
    rc = main(build(model, facts_file, tmp_path, out, opt_dir))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = _shown_lines(err)
    assert len(lines) == 1 and lines[0].startswith("qedit: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    created = {p.name for p in set(tmp_path.iterdir()) - existing} - {"bad.jsonl", "facts.jsonl"}
    assert created == set(), f"left behind: {created}"
    assert {p: _tree_digest(p) for p in before} == before


def test_output_over_its_own_input_is_refused(tiny_dirs, facts_file, capsys):
    model = tiny_dirs["gpt2"]
    before = _tree_digest(model)
    for out in (model, model / ".." / model.name):
        assert main(["edit", str(model), str(facts_file), "-o", str(out)]) == 2
        lines = _shown_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "refusing to write the output over its own input" in lines[0]
    assert _tree_digest(model) == before


def test_output_into_a_non_empty_directory_is_refused(tiny_dirs, facts_file, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["edit", str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]

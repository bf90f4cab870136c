"""Patching edits into a GGUF file (qedit.converters.gguf.patch) and running it in llama.cpp."""
from __future__ import annotations

import json
import re

import pytest

from qedit.core.errors import QeditError

PROMPTS = [  # (prompt, answer the unedited model gives)
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("Michael Jordan plays the sport of", "basketball"),
    ("Toyota is a company from the country of", "Japan"),
]


def _fast_rome():
    from qedit.core.stats import StatsConfig
    from qedit.edit.methods.rome import RomeConfig
    from qedit.edit.registry import TargetConfig

    return RomeConfig(target=TargetConfig(stop_nll=0.3, clamp_norm=2.0, kl_factor=0.25, n_prefixes=2, steps=20),
                      stats=StatsConfig(n_samples=16, sample_len=32))


@pytest.fixture(scope="module")
def torch_before(gemma):
    """Torch scores of PROMPTS on the unedited model."""
    from qedit.runtimes.torch_runner import TorchRunner

    return TorchRunner(gemma).score(PROMPTS)


@pytest.fixture(scope="module")
def patched(gemma, gemma_gguf, torch_before, tmp_path_factory):
    from qedit.converters.gguf.patch import patch_gguf
    from qedit.core.facts import demo_requests
    from qedit.edit.compute import compute_edits

    requests = demo_requests()[:2]
    outcome = compute_edits(gemma, requests, "rome", _fast_rome())
    manifest = outcome.manifest(gemma)
    dst = tmp_path_factory.mktemp("patched") / "edited.gguf"
    report = patch_gguf(gemma_gguf, dst, outcome.deltas, manifest)
    return dst, report, manifest, requests, outcome


@pytest.mark.real_model
def test_patch_changes_only_the_edited_tensors(gemma_gguf, patched):
    from qedit.converters.gguf.read import GGUFFile

    dst, report, _, _, _ = patched
    edited = {t.name for t in report.tensors}
    assert edited == {"blk.6.ffn_down.weight"}
    with GGUFFile(gemma_gguf) as src, GGUFFile(dst) as out:
        assert list(out.tensors) == list(src.tensors)
        for name, info in src.tensors.items():
            new = out.tensors[name]
            assert (new.shape, new.ggml_type) == (info.shape, info.ggml_type), name
            same = bytes(out.raw(name)) == bytes(src.raw(name))
            assert same != (name in edited), name
        for key, value in src.fields.items():
            assert out.fields[key] == value, key
            assert out.field_types[key] == src.field_types[key], key
        assert set(out.fields) - set(src.fields) == {"qedit.manifest", "qedit.version"}
    for t in report.tensors:
        assert t.type_before == t.type_after == "Q4_K" and t.bytes_before == t.bytes_after
    assert 0 < report.size_change < 100_000  # only the metadata grew


@pytest.mark.real_model
def test_manifest_round_trips_and_a_second_patch_appends(patched, tmp_path):
    from qedit.converters.gguf.patch import patch_gguf, read_manifests
    from qedit.converters.gguf.read import GGUFFile

    dst, _, manifest, requests, _ = patched
    with GGUFFile(dst) as gf:
        (stored,) = read_manifests(gf)
    assert stored == json.loads(json.dumps(manifest, default=str))
    assert [f["subject"] for f in stored["facts"]] == [r.subject for r in requests]
    second = tmp_path / "twice.gguf"
    report = patch_gguf(dst, second, [], {"method": "none", "note": "second"})
    assert report.tensors == [] and report.n_manifests == 2
    with GGUFFile(second) as gf, GGUFFile(dst) as first:
        assert read_manifests(gf) == [stored, {"method": "none", "note": "second"}]
        assert all(bytes(gf.raw(n)) == bytes(first.raw(n)) for n in first.tensors)


@pytest.mark.real_model
def test_type_override_moves_the_offsets_and_llama_cpp_still_runs_it(gemma, gemma_gguf, patched, tmp_path):
    from qedit.converters.gguf.patch import patch_gguf
    from qedit.converters.gguf.read import GGUFFile
    from qedit.core.delta import LowRankDelta
    from qedit.runtimes.llama import LlamaCppRunner

    dst, _, _, requests, _ = patched
    name = "model.layers.6.mlp.down_proj.weight"
    zero = LowRankDelta(name, 6, gemma.model.get_parameter(name).new_zeros(640, 1), gemma.model.get_parameter(name).new_zeros(1, 2048))
    out = tmp_path / "q6k.gguf"
    report = patch_gguf(dst, out, [zero], {"method": "requantize"}, type_overrides={name: "Q6_K"})
    (t,) = report.tensors
    assert (t.type_before, t.type_after, t.bytes_before, t.bytes_after) == ("Q4_K", "Q6_K", 737280, 1075200)
    with GGUFFile(dst) as before, GGUFFile(out) as after:
        assert after.tensors["blk.6.ffn_down.weight"].ggml_type.name == "Q6_K"
        rel = lambda gf, n: gf.tensors[n].offset - gf.data_offset
        moved = [n for n in before.tensors if rel(after, n) != rel(before, n)]
        assert moved and "blk.6.ffn_down.weight" not in moved  # the tensors after it, not it
        assert all(bytes(after.raw(n)) == bytes(before.raw(n)) for n in before.tensors if n != "blk.6.ffn_down.weight")
    scores = LlamaCppRunner(out).score([(r.prompt, r.target_new) for r in requests] + [(r.prompt, r.ground_truth) for r in requests])
    n = len(requests)
    assert all(new.mean_logprob > true.mean_logprob for new, true in zip(scores[:n], scores[n:]))


@pytest.mark.real_model
def test_deltas_that_do_not_fit_the_file_are_refused(gemma_gguf, tmp_path):
    import torch

    from qedit.converters.gguf.patch import patch_gguf
    from qedit.core.delta import LowRankDelta

    wrong_shape = LowRankDelta("model.layers.6.mlp.down_proj.weight", 6, torch.zeros(2048, 1), torch.zeros(1, 640))
    unknown = LowRankDelta("model.layers.60.mlp.down_proj.weight", 60, torch.zeros(640, 1), torch.zeros(1, 2048))
    for delta, message in ((wrong_shape, "has shape"), (unknown, "no GGUF tensor")):
        with pytest.raises(QeditError, match=message):
            patch_gguf(gemma_gguf, tmp_path / "x.gguf", [delta], {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real_model
def test_patched_file_runs_in_llama_cpp_and_the_edits_hold(gemma_gguf, patched):
    from qedit.runtimes.llama import LlamaCppRunner

    dst, _, _, requests, _ = patched
    for path, expect_new in ((gemma_gguf, False), (dst, True)):
        runner = LlamaCppRunner(path)
        scores = runner.score([(r.prompt, r.target_new) for r in requests] + [(r.prompt, r.ground_truth) for r in requests])
        n = len(requests)
        prefers_new = [new.mean_logprob > true.mean_logprob for new, true in zip(scores[:n], scores[n:])]
        assert prefers_new == [expect_new] * n, (path, [s.mean_logprob for s in scores])
    assert runner.describe()["runner"] == "llama.cpp" and runner.describe()["model"] == str(dst)


@pytest.mark.real_model
def test_llama_cpp_and_torch_agree_on_the_unedited_model(gemma_gguf, torch_before):
    from qedit.runtimes.llama import LlamaCppRunner

    llama = LlamaCppRunner(gemma_gguf).score(PROMPTS)
    for (prompt, _), t, l in zip(PROMPTS, torch_before, llama):
        assert l.target_ids == t.target_ids, prompt
        assert l.argmax_ids == t.argmax_ids, prompt
        assert l.top1, prompt  # the model knows these facts
        assert abs(l.mean_logprob - t.mean_logprob) < 0.5, prompt


@pytest.mark.real_model
def test_cli_inspect_and_eval_on_the_patched_file(gemma_gguf, patched, tmp_path, capsys):
    from qedit.cli import main

    dst, _, _, requests, _ = patched
    assert main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "method rome" in out and "Eiffel Tower" in out and "Q4_K" in out and "sha256" in out
    assert main(["inspect", str(gemma_gguf)]) == 0
    assert "no qedit manifest" in capsys.readouterr().out
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(r.to_json()) + "\n" for r in requests))
    assert main(["eval", str(dst), str(facts), "--baseline", str(gemma_gguf)]) == 0
    assert "runner: llama.cpp" in capsys.readouterr().out


@pytest.mark.real_model
def test_cli_edit_with_a_gguf_output_patches_the_source(gemma, gemma_gguf, patched, tmp_path, monkeypatch, capsys):
    """The `edit -o X.gguf` wiring, with the module's edit standing in for a fresh (minutes-long) one."""
    import qedit.pipeline.run
    from qedit.cli import main
    from qedit.converters.gguf.read import GGUFFile

    dst, _, _, requests, outcome = patched
    monkeypatch.setattr(qedit.pipeline.run, "load_model", lambda *a, **k: gemma)
    monkeypatch.setattr(qedit.pipeline.run, "compute_edits", lambda *a, **k: outcome)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(r.to_json()) + "\n" for r in requests))
    out = tmp_path / "cli.gguf"
    assert main(["edit", str(gemma_gguf), str(facts), "--method", "rome", "-o", str(out), "--naive", "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert "re-encoded blk.6.ffn_down.weight as Q4_K" in printed and "size: 253,113,024 ->" in printed
    with GGUFFile(out) as a, GGUFFile(dst) as b:  # --naive is the plain patch of the fixture, byte for byte
        assert all(bytes(a.raw(n)) == bytes(b.raw(n)) for n in b.tensors)
    aware = tmp_path / "aware.gguf"  # the default encodes the edited tensor edit-aware, nothing else differs
    assert main(["edit", str(gemma_gguf), str(facts), "--method", "rome", "-o", str(aware), "--no-verify"]) == 0
    assert "edit-aware: kept" in capsys.readouterr().out
    with GGUFFile(aware) as a, GGUFFile(dst) as b:
        assert [n for n in b.tensors if bytes(a.raw(n)) != bytes(b.raw(n))] == ["blk.6.ffn_down.weight"]
        assert json.loads(a.fields["qedit.manifest"])["encoding"]["path"] == "aware"
    assert main(["edit", str(gemma_gguf), str(facts), "-o", str(gemma_gguf)]) == 2
    assert "refusing" in capsys.readouterr().err


@pytest.mark.real_model
def test_truncated_source_is_refused_and_leaves_no_output(gemma_gguf, tmp_path):
    from qedit.converters.gguf.patch import patch_gguf

    truncated = tmp_path / "cut.gguf"
    with open(gemma_gguf, "rb") as fh:
        truncated.write_bytes(fh.read(50_000_000))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(QeditError, match="truncated"):
        patch_gguf(truncated, out_dir / "x.gguf", [], {"method": "none"})
    assert list(out_dir.iterdir()) == []


def test_refuses_to_write_over_the_source(tmp_path):
    from qedit.converters.gguf.patch import patch_gguf

    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(QeditError, match="refusing"):
        patch_gguf(src, src, [], {})
    with pytest.raises(QeditError, match="refusing"):
        patch_gguf(src, tmp_path / "." / "model.gguf", [], {})
    assert src.read_bytes() == b"GGUF" + bytes(100)


def test_gguf_output_needs_a_gguf_source(tiny_dirs, facts_file, tmp_path, capsys):
    from qedit.cli import main

    assert main(["edit", str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "needs a .gguf source" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture()
def quant_source(tiny_dirs, tmp_path):
    """(a tiny F32 GGUF with a tokenizer, a one-fact file whose new target is not yet true, an output dir)."""
    from conftest import FACTS, make_tokenizer
    from test_gguf_export import _tokenizer_template

    from qedit.converters.gguf.export import export_gguf

    work = tmp_path / "in"
    work.mkdir()
    tok = make_tokenizer()
    template = _tokenizer_template(work / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    src = work / "tiny.gguf"
    export_gguf(tiny_dirs["llama"], src, "F32", template=template)
    fact = dict(FACTS[0], target_new=FACTS[0]["ground_truth"], ground_truth=FACTS[0]["target_new"])  # not yet true here
    facts = work / "fact.jsonl"
    facts.write_text(json.dumps(fact) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    return src, facts, out


def _quant_edits(src, facts, out, quant: str, capsys) -> tuple[str, str]:
    """Writes plain.gguf (the unedited export), aware.gguf and naive.gguf (`edit --quant`, the latter --naive)
    into `out`; returns the printed text of the aware and the naive edit."""
    from qedit.cli import main

    assert main(["export", str(src), "-o", str(out / "plain.gguf"), "--quant", quant]) == 0
    capsys.readouterr()
    argv = ["edit", str(src), str(facts), "--method", "rome", "--layers", "1", "--quant", quant,
            "--no-verify"]   # the template tokenizer is not one llama.cpp can run
    assert main(argv + ["-o", str(out / "aware.gguf")]) == 0
    aware = capsys.readouterr().out
    assert main(argv + ["-o", str(out / "naive.gguf"), "--naive"]) == 0
    naive = capsys.readouterr().out
    # no temporary left; each output's Modelfile beside it (the first one's is `Modelfile`, never clobbered)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "aware.gguf", "aware.gguf.Modelfile", "naive.gguf",
                                                     "naive.gguf.Modelfile", "plain.gguf"]
    return aware, naive


def _only_the_edited_tensor_differs(out, edited: str) -> tuple[dict, dict]:
    """Checks _quant_edits' files: same tensors, types and file type as the plain export, every tensor but
    `edited` byte-equal to the plain export's in aware.gguf, `edited` different in all three. Returns the
    manifests of aware.gguf and naive.gguf."""
    from qedit.converters.gguf.read import GGUFFile

    with GGUFFile(out / "plain.gguf") as p, GGUFFile(out / "aware.gguf") as a, GGUFFile(out / "naive.gguf") as n:
        assert list(p.tensors) == list(a.tensors) == list(n.tensors)
        assert a.fields["general.file_type"] == p.fields["general.file_type"]
        for name, info in p.tensors.items():
            assert (p.raw(name).tobytes() == a.raw(name).tobytes()) == (name != edited), name
            assert a.tensors[name].ggml_type == info.ggml_type == n.tensors[name].ggml_type, name
        assert n.raw(edited).tobytes() not in (a.raw(edited).tobytes(), p.raw(edited).tobytes())
        return json.loads(a.fields["qedit.manifest"]), json.loads(n.fields["qedit.manifest"])


def test_quant_export_edits_the_quantized_model_and_patches_it(quant_source, capsys):
    """`edit --quant T` (edit-aware) below 5 bits: the edit is computed on the unedited model exported at T and
    patched onto that file, so every tensor the edit leaves alone is the plain export's, byte for byte; --naive
    edits the source weights and quantizes W + dW. Neither leaves its temporary file behind."""
    src, facts, out = quant_source
    text, naive_text = _quant_edits(src, facts, out, "Q4_K_M", capsys)
    assert "to compute the edit on its quantized weights" in text
    kept = re.search(r"re-encoded blk\.1\.ffn_down\.weight as Q5_0; edit-aware: kept ([\d.]+)", text)  # Q4_K falls
    assert kept is not None and float(kept[1]) >= 0.99, text                                  # back (rows of 128)
    assert "quantized weights" not in naive_text
    manifest, naive = _only_the_edited_tensor_differs(out, "blk.1.ffn_down.weight")
    assert manifest["info"]["computed_on"] == f"{src} exported at Q4_K_M"
    assert manifest["encoding"]["path"] == "aware"
    assert "computed_on" not in naive["info"]


def test_quant_export_at_5_bits_encodes_the_source_edit_edit_aware(quant_source, capsys):
    """`edit --quant Q5_K_M`: at 5 bits and more the edit is the source's (nothing is exported to compute it
    on), written by the export edit-aware: the edited tensor differs from --naive's W + dW requantized, and
    every other tensor is the plain export's."""
    src, facts, out = quant_source
    text, _ = _quant_edits(src, facts, out, "Q5_K_M", capsys)
    assert "quantized weights" not in text
    manifest, naive = _only_the_edited_tensor_differs(out, "blk.1.ffn_down.weight")
    assert "computed_on" not in manifest["info"] and manifest["encoding"]["path"] == "aware"
    assert naive["encoding"]["path"] == "naive"


@pytest.mark.runtime
def test_verify_scales_an_edit_that_does_not_hold_in_llama_cpp(tiny_dirs, tmp_path, capsys):
    """`edit --verify` scores the written patch in llama.cpp and, while an edit holds by less than
    --hold-margin nats, writes it again scaled x1.5, then x2.25. An unreachable margin forces both steps,
    and as neither makes the edit hold the edit as computed is written again (no verify_scale); outputs that
    are not GGUF patches, and negative margins, are refused first. The check is on by default for an
    edit-aware patch, off with --no-verify and for a --naive patch."""
    from conftest import FACTS
    from test_gguf_hf import _byte_level_dir

    from qedit.cli import main
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.read import GGUFFile

    pytest.importorskip("llama_cpp")
    hf, _ = _byte_level_dir("llama", tmp_path / "bpe")     # a tokenizer llama.cpp reproduces
    src = tmp_path / "tiny.gguf"
    export_gguf(hf, src, "F32")
    facts = tmp_path / "fact.jsonl"
    facts.write_text(json.dumps(FACTS[0]) + "\n")
    argv = ["edit", str(src), str(facts), "--method", "rome", "--layers", "1", "--stats-samples", "16"]
    out = tmp_path / "verified.gguf"
    assert main(argv + ["-o", str(out), "--verify", "--hold-margin", "1000"]) == 0
    text = capsys.readouterr().out
    assert "writing the edit x1.5" in text and "writing the edit x2.25" in text
    assert "no scale holds every edit; writing the edit again at the smallest scale with the fewest failing (x1)" in text
    assert "verify: 0 of 1 edit(s) hold by >= 1000 nats in llama.cpp\n" in text   # scaling gained nothing
    with GGUFFile(out) as gf:
        assert "verify_scale" not in json.loads(gf.fields["qedit.manifest"])["info"]
    assert main(argv + ["-o", str(tmp_path / "dir"), "--verify"]) == 2
    assert "--verify checks a GGUF patch" in capsys.readouterr().err
    assert main(argv + ["-o", str(tmp_path / "x.gguf"), "--verify", "--hold-margin", "-1"]) == 2
    assert "--hold-margin must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "dir").exists() and not (tmp_path / "x.gguf").exists()
    # the check is the default for an edit-aware patch; --no-verify and --naive write without it
    runs = {"default": [], "no": ["--no-verify"], "naive": ["--naive"]}
    for name, extra in runs.items():
        assert main(argv + ["-o", str(tmp_path / f"{name}.gguf"), "--hold-margin", "1000", *extra]) == 0
        assert ("verify: 0 of 1 edit(s)" in capsys.readouterr().out) == (name == "default"), name
    with GGUFFile(tmp_path / "default.gguf") as a, GGUFFile(out) as b:
        assert bytes(a.raw("blk.1.ffn_down.weight")) == bytes(b.raw("blk.1.ffn_down.weight"))


def test_verify_scales_from_the_computed_edit_and_keeps_the_best_scale(monkeypatch, capsys):
    """Each verify step scales the edit as computed (x1.5, then x2.25, not x1.5 x 2.25); when no step makes
    every edit hold, the smallest scale with the fewest failing edits is written again and returned."""
    import types

    import torch

    import qedit.pipeline.verify
    from qedit.core.delta import LowRankDelta
    from qedit.edit.compute import EditOutcome
    from qedit.pipeline.verify import verify_in_llama_cpp

    delta = LowRankDelta("w", 1, torch.ones(3, 1), torch.ones(1, 2))   # dW (3, 2), scale 1
    outcome = EditOutcome("rome", None, ["a", "b"], [delta], 0.0)
    failing_at = {1.0: 2, 1.5: 1, 2.25: 1}         # x1.5 helps one edit, x2.25 helps no further
    written: list[float] = []
    current = [1.0]

    def write(o):
        current[0] = o.deltas[0].scale
        written.append(current[0])

    def fake_evaluate(runner, requests, generate=True):
        assert generate is False, "the check scores teacher-forced margins only"
        n = failing_at[current[0]]
        cases = [types.SimpleNamespace(subject=f"s{i}", efficacy_top1=1.0, margin=0.0 if i < n else 5.0)
                 for i in range(len(requests))]
        return types.SimpleNamespace(cases=cases)

    monkeypatch.setattr(qedit.pipeline.verify, "evaluate", fake_evaluate)
    monkeypatch.setattr(qedit.pipeline.verify, "LlamaCppRunner", lambda path: None)
    final = verify_in_llama_cpp(write, outcome, "x.gguf", 1.0, notify=print)
    assert written == [1.5, 2.25, 1.5]
    assert final.outcome.deltas[0].scale == 1.5 and final.outcome.info["verify_scale"] == 1.5 and final.held == 1
    assert "verify: 1 of 2 edit(s) hold by >= 1 nats in llama.cpp (edit scaled x1.5)" in capsys.readouterr().out
    failing_at.update({1.0: 0})
    written.clear()
    current[0] = 1.0
    assert verify_in_llama_cpp(write, outcome, "x.gguf", 1.0).outcome is outcome and written == []

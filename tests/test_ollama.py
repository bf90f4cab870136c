"""Ollama in and out: `ollama:NAME[:TAG]` resolves the GGUF blob of a model store laid out as Ollama lays it out
(manifests/HOST/NAMESPACE/MODEL/TAG, blobs/sha256-HEX; built here), the store is never written, and every GGUF
output gets a Modelfile beside it. No Ollama server runs here: the Modelfile is checked as text.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from test_survival_equals_edit import tiny_gguf  # noqa: F401  (a fixture: the tiny F32 GGUF and a fact)

import qedit
from qedit.cli import main
from qedit.converters import ollama
from qedit.core.errors import QeditError
from qedit.core.stats import StatsConfig
from qedit.pipeline.write import write_modelfile

SETTINGS = ["--method", "rome", "--layers", "1", "--stats-samples", "16", "--no-verify"]
TEMPLATE = "{{ if .System }}<s>{{ .System }}</s>{{ end }}{{ .Prompt }}\n"
PARAMS = {"stop": ["</s>", "User: \"hi\""], "temperature": 0.7, "num_ctx": 64}
SYSTEM = "You answer in one word."


def _blob(store: Path, data: bytes, media: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}


def _model(store: Path, name: str, gguf: bytes, **texts: str) -> None:
    """A manifest as `ollama pull` / `ollama create` writes it (manifest/manifest.go), and its blobs."""
    host, namespace, model, tag = name.split("/")
    layers = [_blob(store, gguf, ollama.MEDIA + "model")]
    layers += [_blob(store, text.encode(), ollama.MEDIA + kind) for kind, text in texts.items()]
    config = _blob(store, json.dumps({"model_format": "gguf"}).encode(), "application/vnd.docker.container.image.v1+json")
    path = store / "manifests" / host / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                "config": config, "layers": layers}))


@pytest.fixture()
def store(tiny_gguf, tmp_path, monkeypatch):  # noqa: F811
    src, facts = tiny_gguf
    root = tmp_path / "ollama-models"
    _model(root, "registry.ollama.ai/library/tiny/f32", src.read_bytes(), template=TEMPLATE,
           params=json.dumps(PARAMS), system=SYSTEM)
    _model(root, "registry.ollama.ai/someone/other/latest", src.read_bytes())
    monkeypatch.setenv("OLLAMA_MODELS", f' "{root}" ')     # trimmed of spaces and quotes, as Ollama does
    return root, facts


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_the_store_location_is_ollamas(monkeypatch, tmp_path):
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ollama.store_dirs()[0] == tmp_path / ".ollama" / "models"
    monkeypatch.setenv("OLLAMA_MODELS", "'/srv/models' ")
    assert ollama.store_dirs() == [Path("/srv/models")]


def test_names_parse_as_ollama_parses_them():
    assert ollama.parse_name("ollama:llama3.2") == ("registry.ollama.ai", "library", "llama3.2", "latest")
    assert ollama.parse_name("ollama:user/m:q4_K_M") == ("registry.ollama.ai", "user", "m", "q4_K_M")
    assert ollama.parse_name("ollama:localhost:5000/ns/m") == ("localhost:5000", "ns", "m", "latest")
    for bad in ("ollama:", "ollama:m:", "ollama:a/b/c/d", "ollama:-m", "ollama:m:t/x", "ollama:ns.x/m"):
        with pytest.raises(QeditError, match="not an Ollama model name"):
            ollama.parse_name(bad)


def test_resolve_reads_the_manifest_and_its_layers(store):
    root, _ = store
    model = ollama.resolve("ollama:tiny:f32")
    assert model.ref == "tiny:f32" and model.store == root
    assert model.gguf.parent == root / "blobs" and model.gguf.read_bytes()[:4] == b"GGUF"
    assert (model.template, model.system, dict(model.params)) == (TEMPLATE, SYSTEM, PARAMS)
    for same in ("ollama:library/tiny:f32", "ollama:registry.ollama.ai/library/tiny:f32", "ollama:Tiny:F32"):
        assert ollama.resolve(same).gguf == model.gguf
    other = ollama.resolve("ollama:someone/other")
    assert other.ref == "someone/other:latest" and other.template is None and other.params == {}
    assert ollama.blob_label(model.gguf) in ("ollama:tiny:f32", "ollama:someone/other:latest")  # the same blob


def test_an_unknown_model_or_tag_is_one_line_listing_the_store(store, capsys):
    for ref in ("ollama:tiny", "ollama:nothere:f32"):
        assert main(["inspect", ref]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and ref in err and "it has: someone/other:latest, tiny:f32" in err, err


def test_inspect_reads_the_blob(store, capsys):
    assert main(["inspect", "ollama:tiny:f32"]) == 0
    out = capsys.readouterr().out
    assert "in Ollama's store" in out and "F32" in out


def test_edit_an_ollama_model_writes_the_gguf_and_a_modelfile(store, tmp_path, capsys):
    root, facts = store
    before = _snapshot(root)
    out = tmp_path / "out" / "tiny-edited.gguf"
    assert main(["edit", "ollama:tiny:f32", str(facts), "-o", str(out), *SETTINGS]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    modelfile = out.with_name("Modelfile")
    assert lines[-1] == f"ollama create tiny-edited -f {modelfile}"
    text = modelfile.read_text()
    assert text.splitlines()[:2] == [f"{ollama.HEADER}tiny-edited.gguf", "FROM ./tiny-edited.gguf"]
    assert f'TEMPLATE """{TEMPLATE}"""' in text and f'SYSTEM """{SYSTEM}"""' in text
    assert 'PARAMETER stop </s>\nPARAMETER stop """User: "hi\""""\n' in text
    assert "PARAMETER temperature 0.7\n" in text and "PARAMETER num_ctx 64\n" in text
    assert out.read_bytes()[:4] == b"GGUF" and _snapshot(root) == before     # the store is only read
    # the statistics the edit cached are labelled with the model's Ollama name, not its blob's
    labels = {json.loads(p.read_text())["label"] for p in Path(os.environ["QEDIT_CACHE"]).glob("*/model.json")}
    assert "ollama:tiny:f32" in labels         # the blob of both models: the first manifest names it


def test_an_output_inside_the_store_is_refused(store, capsys):
    root, facts = store
    before = _snapshot(root)
    for out in (root / "edited.gguf", root / "blobs" / "x.gguf"):
        assert main(["edit", "ollama:tiny:f32", str(facts), "-o", str(out), *SETTINGS]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "inside the Ollama model store" in err, err
    assert main(["export", "ollama:tiny:f32", "-o", str(root / "e.gguf"), "--quant", "Q8_0"]) == 2
    assert "inside the Ollama model store" in capsys.readouterr().err
    assert _snapshot(root) == before


def test_modelfile_names_never_clobber(tiny_gguf, store, tmp_path):  # noqa: F811
    src, _ = tiny_gguf
    model = ollama.resolve("ollama:tiny:f32")
    out = tmp_path / "w" / "x.lora.gguf"
    out.parent.mkdir()
    out.write_bytes(b"GGUF")
    (out.parent / "Modelfile").write_text("FROM llama3.2\n")           # the user's own
    lora = write_modelfile(out, model.gguf, model, as_lora=True)
    assert lora.path == out.with_name("x.lora.gguf.Modelfile") and lora.name == "x.lora"
    assert "was not written by qedit" in "\n".join(lora.lines)
    assert (out.parent / "Modelfile").read_text() == "FROM llama3.2\n"
    text = lora.path.read_text()
    assert "FROM tiny:f32\nADAPTER ./x.lora.gguf\n" in text and "TEMPLATE" in text
    assert write_modelfile(out, model.gguf, model, as_lora=True).path == lora.path     # its own: written again
    plain = write_modelfile(out, src, as_lora=True, inputs=[lora.path])              # an input is never written
    assert plain.path == out.with_name("x.lora.gguf.2.Modelfile")
    assert plain.path.read_text().splitlines()[1:] == [f"FROM {src.resolve()}", "ADAPTER ./x.lora.gguf"]


def test_the_lora_of_an_ollama_model_names_it_in_from(store, tmp_path, capsys):
    _, facts = store
    out = tmp_path / "e.lora.gguf"
    assert main(["edit", "ollama:tiny:f32", str(facts), "-o", str(out), "--as-lora", *SETTINGS[:-1]]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"ollama create e.lora -f {tmp_path / 'Modelfile'}"
    assert "FROM tiny:f32\nADAPTER ./e.lora.gguf\n" in (tmp_path / "Modelfile").read_text()


def test_a_plain_gguf_output_gets_a_modelfile_too(tiny_gguf, tmp_path, capsys):  # noqa: F811
    src, facts = tiny_gguf
    out = tmp_path / "plain" / "p.gguf"
    shutil.copy(facts, tmp_path / "Modelfile")                               # not beside the output: irrelevant
    assert main(["edit", str(src), str(facts), "-o", str(out), *SETTINGS]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"ollama create p -f {out.with_name('Modelfile')}"
    assert out.with_name("Modelfile").read_text() == f"{ollama.HEADER}p.gguf\nFROM ./p.gguf\n"


def test_quoting_follows_ollamas_parser():
    assert ollama.quote("0.7") == "0.7" and ollama.quote("<|im_end|>") == "<|im_end|>"
    assert ollama.quote("### User") == '"### User"' and ollama.quote('say "x" now') == '"""say "x" now"""'
    with pytest.raises(ValueError):
        ollama.quote('a """ b')
    model = ollama.OllamaModel("m", "t", Path("/s"), Path("/s/b"), template='a """ b', params={"stop": "x y"})
    text, notes = ollama.modelfile_text("o.gguf", "./o.gguf", model=model)
    assert "TEMPLATE" not in text and 'PARAMETER stop "x y"' in text and "TEMPLATE of ollama:m:t" in notes[0]


def test_the_python_api_takes_an_ollama_name(store, tmp_path):
    _, facts = store
    run = qedit.edit_model("ollama:tiny:f32", facts, tmp_path / "api.gguf", method="rome", verify=False,
                           settings={"layers": (1,), "stats": StatsConfig(n_samples=16)})
    assert run.plan.job.ollama is not None and run.modelfile is not None
    assert f'SYSTEM """{SYSTEM}"""' in run.modelfile.path.read_text()

"""Edit keys recorded in patched GGUF files (qedit.converters.gguf.keys) and used by the next patch."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qedit.core.errors import QeditError


def test_merge_and_metadata_round_trip():
    from qedit.converters.gguf.keys import edit_keys_kvs, is_keys_field, merged_keys, read_edit_keys

    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), -np.ones((1, 3), np.float32)
    merged = merged_keys({4: a}, {4: torch.from_numpy(b), 5: b})
    assert merged[4].shape == (3, 3) and np.array_equal(merged[4][:2], a) and np.array_equal(merged[5], b)
    kvs = edit_keys_kvs(merged)
    assert [kv.key for kv in kvs] == ["qedit.edit_keys.blk.4", "qedit.edit_keys.blk.4.shape",
                                      "qedit.edit_keys.blk.5", "qedit.edit_keys.blk.5.shape"]
    assert all(is_keys_field(kv.key) for kv in kvs) and not is_keys_field("qedit.manifest")
    fields = {"qedit.edit_keys.blk.4": merged[4].reshape(-1).tolist(), "qedit.edit_keys.blk.4.shape": [3, 3]}
    back = read_edit_keys(SimpleNamespace(fields=fields, path=SimpleNamespace(name="m.gguf")))
    assert np.array_equal(back[4], merged[4])
    with pytest.raises(QeditError, match="different|wide"):
        merged_keys({4: a}, {4: np.ones((1, 5))})


@pytest.mark.parametrize("fields, match", [
    ({"qedit.edit_keys.blk.3": [1.0, 2.0]}, "needs a 2-entry"),
    ({"qedit.edit_keys.blk.3": [1.0, 2.0], "qedit.edit_keys.blk.3.shape": [2, 2]}, "has 2 values"),
])
def test_corrupt_keys_name_the_file_and_entry(fields, match):
    from qedit.converters.gguf.keys import read_edit_keys

    with pytest.raises(QeditError, match=match) as err:
        read_edit_keys(SimpleNamespace(fields=fields, path=SimpleNamespace(name="m.gguf")))
    assert "m.gguf" in str(err.value) and "qedit.edit_keys.blk.3" in str(err.value)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_earlier_keys_make_a_later_edit_the_same_as_a_later_batch(tiny_dirs, method):
    """Editing fact 2 on a model that holds fact 1, given fact 1's keys as `earlier_keys` (what a patch of a
    patched GGUF does), computes the same deltas as the second batch of one sequential run."""
    from conftest import FACTS
    from test_methods_tiny import method_config

    from qedit.converters.loading import load_model
    from qedit.core.delta import applied
    from qedit.core.facts import request_from_dict
    from qedit.edit.compute import compute_edits

    cfg = method_config(method, "llama")
    requests = [request_from_dict(f) for f in FACTS[:2]]
    loaded = load_model(tiny_dirs["llama"])
    both = compute_edits(loaded, requests, method, cfg, batch_size=1)
    first = compute_edits(loaded, requests[:1], method, cfg)
    with applied(loaded.model, first.deltas):
        later = compute_edits(loaded, requests[1:], method, cfg, earlier_keys=first.keys)
    assert set(later.earlier_keys) == set(first.keys) and not first.earlier_keys
    n_first = len(first.deltas)
    assert len(later.deltas) == len(both.deltas) - n_first
    for got, want in zip(later.deltas, both.deltas[n_first:], strict=True):
        torch.testing.assert_close(got.dense(), want.dense(), rtol=1e-3, atol=1e-3 * float(want.dense().abs().max()))


def test_a_patch_of_a_patch_records_and_protects_the_earlier_keys(tiny_dirs, tmp_path, capsys):
    from conftest import FACTS, make_tokenizer
    from test_gguf_export import _tokenizer_template

    from qedit.cli import main
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.keys import read_edit_keys
    from qedit.converters.gguf.read import GGUFFile

    tok = make_tokenizer()
    template = _tokenizer_template(tmp_path / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    src = tmp_path / "tiny.Q8_0.gguf"
    export_gguf(tiny_dirs["llama"], src, "Q8_0", template=template)
    paths = []
    for i, fact in enumerate(FACTS[:2]):
        facts = tmp_path / f"fact{i}.jsonl"
        facts.write_text(json.dumps(fact) + "\n")
        paths.append(tmp_path / f"step{i}.gguf")
        argv = ["edit", str(paths[-2] if i else src), str(facts), "--method", "memit", "--layers", "1,2",
                "--stats-samples", "16", "-o", str(paths[-1]), "--no-verify"]   # a tokenizer llama.cpp cannot run
        assert main(argv + (["--naive"] if i == 0 else [])) == 0   # a naive patch records its keys too
    text = capsys.readouterr().out
    assert text.count("protecting the keys of earlier edits") == 1 and "blk.1: 1, blk.2: 1" in text
    with GGUFFile(paths[0]) as one, GGUFFile(paths[1]) as two:
        k1, k2 = read_edit_keys(one), read_edit_keys(two)
        assert sorted(k1) == sorted(k2) == [1, 2]
        for layer in (1, 2):
            assert k1[layer].shape == (1, 128) and k2[layer].shape == (2, 128)
            assert np.array_equal(k2[layer][:1], k1[layer])
        manifests = json.loads(two.fields["qedit.manifest"])
        assert [m["encoding"]["path"] for m in manifests] == ["naive", "aware"]
    assert main(["inspect", str(paths[1])]) == 0
    assert "edit keys recorded for blk.2: 2" in capsys.readouterr().out


def test_an_export_records_the_edit_keys_after_the_sources(tiny_dirs, tmp_path):
    """export_gguf records an edit's keys as a patch does: after those of a GGUF source, or alone for an HF
    source; an export without keys copies the source's."""
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.keys import stored_edit_keys

    a, b = np.ones((2, 128), np.float32), 2 * np.ones((1, 128), np.float32)
    src = tmp_path / "src.gguf"
    export_gguf(tiny_dirs["llama"], src, "F32", keys={1: a},
                template=_template(tmp_path))
    assert np.array_equal(stored_edit_keys(src)[1].numpy(), a)
    out = tmp_path / "out.gguf"
    export_gguf(src, out, "Q8_0", keys={1: torch.from_numpy(b), 0: b})
    got = stored_edit_keys(out)
    assert sorted(got) == [0, 1] and np.array_equal(got[1].numpy(), np.concatenate([a, b]))
    again = tmp_path / "again.gguf"
    export_gguf(out, again, "Q8_0")
    assert all(np.array_equal(stored_edit_keys(again)[k].numpy(), got[k].numpy()) for k in got)


def _template(tmp_path):
    from conftest import make_tokenizer
    from test_gguf_export import _tokenizer_template

    tok = make_tokenizer()
    return _tokenizer_template(tmp_path / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))

"""Edit keys recorded in patched GGUF files (qedit.converters.gguf.keys) and used by the next patch."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qedit.core.errors import QeditError


def _fields(tmp_path, kvs):
    """The metadata of a GGUF file holding `kvs` and no tensors, as qedit's reader parses it."""
    from qedit.converters.gguf.read import GGUFFile
    from qedit.converters.gguf.write import encode_kv, write_gguf

    path = tmp_path / "keys.gguf"
    write_gguf(path, [encode_kv("general.architecture", "llama", 8), *kvs], [])
    with GGUFFile(path) as gf:
        return dict(gf.fields)


def _reader(fields):
    return SimpleNamespace(fields=fields, path=SimpleNamespace(name="m.gguf"))


def test_keys_round_trip_and_earlier_rows_keep_their_bytes(tmp_path):
    from qedit.converters.gguf.keys import carried_after, carried_kvs, is_keys_field, merged_keys, read_carried

    a, b = np.arange(6, dtype=np.float32).reshape(2, 3) - 2, -np.ones((1, 3), np.float32)
    merged = merged_keys({4: a}, {4: torch.from_numpy(b), 5: b})        # the encoding's keys: exact, float32
    assert merged[4].shape == (3, 3) and np.array_equal(merged[4][:2], a) and np.array_equal(merged[5], b)
    kvs = carried_kvs(None, {4: a})
    assert [kv.key for kv in kvs] == [f"qedit.edit_keys.blk.4{s}" for s in ("", ".shape", ".norms", ".facts", ".sha256")]
    assert all(is_keys_field(kv.key) for kv in kvs) and not is_keys_field("qedit.manifest")
    first = read_carried(_reader(_fields(tmp_path, kvs)))
    np.testing.assert_allclose(first[4].keys(), a, rtol=1e-3, atol=1e-3)   # float16 unit rows, float32 norms
    later = carried_after(first, {4: torch.from_numpy(b), 5: b})
    assert (later[4].rows, later[4].facts, later[5].facts) == (3, 3, 1)
    assert np.array_equal(later[4].units[:2], first[4].units) and np.array_equal(later[4].norms[:2], first[4].norms)
    with pytest.raises(QeditError, match="3-wide"):
        carried_after(first, {4: np.ones((1, 5))})
    with pytest.raises(QeditError, match="different|wide"):
        merged_keys({4: a}, {4: np.ones((1, 5))})


def test_compaction_keeps_the_gram_in_a_bounded_number_of_rows():
    """Past `rank` rows the state is the keys' top singular directions: exact when the keys span no more
    than `rank` directions, else the best rank-`rank` Gram; the rows never grow past `rank`."""
    from qedit.converters.gguf.keys import carried_after

    rng = np.random.default_rng(0)
    low = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 16))               # (40, 16) keys of rank 3
    state: dict = {}
    for batch in np.split(low, 8):                                          # 8 patches of 5 facts
        state = carried_after(state, {2: batch}, rank=4)
        assert state[2].rows <= 5                                           # 4 + the batch's 5, compacted to <= 4
    gram = low.T @ low
    kept = state[2].keys().astype(np.float64)
    assert state[2].facts == 40 and state[2].rows == 4 and state[2].norms[3] < 1e-3 * state[2].norms[0]   # float16 noise
    np.testing.assert_allclose(kept.T @ kept, gram, atol=2e-3 * np.abs(gram).max())
    full = rng.normal(size=(30, 16))                                        # rank 16 > 4: truncated
    one = carried_after({}, {0: full}, rank=4)[0]
    w, v = np.linalg.eigh(full.T @ full)
    best = (v[:, -4:] * w[-4:]) @ v[:, -4:].T
    got = one.keys().astype(np.float64)
    assert one.rows == 4 and np.abs(got.T @ got - best).max() <= 2e-3 * np.abs(best).max()


def test_files_of_raw_float32_keys_are_still_read():
    from qedit.converters.gguf.keys import read_carried

    raw = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    fields = {"qedit.edit_keys.blk.3": raw.reshape(-1).tolist(), "qedit.edit_keys.blk.3.shape": [2, 3]}
    got = read_carried(_reader(fields))[3]
    assert got.facts == 2 and np.allclose(got.keys(), raw, rtol=1e-3)


def _damaged(tmp_path, what):
    from qedit.converters.gguf.keys import carried_kvs

    fields = _fields(tmp_path, carried_kvs(None, {3: np.ones((2, 4), np.float32)}))
    if what == "flipped":
        fields["qedit.edit_keys.blk.3"][1] ^= 1
    elif what == "inf":
        fields["qedit.edit_keys.blk.3.norms"][0] = float("inf")
    elif what == "no-facts":
        del fields["qedit.edit_keys.blk.3.facts"]
    return fields


@pytest.mark.parametrize("what, match", [("flipped", "sha256"), ("inf", "sha256|finite"), ("no-facts", "malformed")])
def test_a_damaged_state_is_a_clear_error(tmp_path, what, match):
    from qedit.converters.gguf.keys import read_carried

    with pytest.raises(QeditError, match=match) as err:
        read_carried(_reader(_damaged(tmp_path, what)))
    assert "m.gguf" in str(err.value) and "qedit.edit_keys.blk.3" in str(err.value) and "intact copy" in str(err.value)


@pytest.mark.parametrize("fields, match", [
    ({"qedit.edit_keys.blk.3": [1.0, 2.0]}, "needs a 2-entry"),
    ({"qedit.edit_keys.blk.3": [1.0, 2.0], "qedit.edit_keys.blk.3.shape": [2, 2]}, "has 2 values"),
])
def test_corrupt_keys_name_the_file_and_entry(fields, match):
    from qedit.converters.gguf.keys import read_edit_keys

    with pytest.raises(QeditError, match=match) as err:
        read_edit_keys(_reader(fields))
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
    assert "edit keys recorded for blk.2: 2 fact(s) as 2 keys" in capsys.readouterr().out


def test_an_export_records_the_edit_keys_after_the_sources(tiny_dirs, tmp_path):
    """export_gguf records an edit's keys as a patch does: after those of a GGUF source, or alone for an HF
    source; an export without keys copies the source's."""
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.keys import stored_edit_keys

    a, b = np.ones((2, 128), np.float32), 2 * np.ones((1, 128), np.float32)
    src = tmp_path / "src.gguf"
    export_gguf(tiny_dirs["llama"], src, "F32", keys={1: a},
                template=_template(tmp_path))
    assert np.allclose(stored_edit_keys(src)[1].numpy(), a, rtol=1e-3)   # float16 unit rows
    out = tmp_path / "out.gguf"
    export_gguf(src, out, "Q8_0", keys={1: torch.from_numpy(b), 0: b})
    got = stored_edit_keys(out)
    assert sorted(got) == [0, 1] and np.allclose(got[1].numpy(), np.concatenate([a, b]), rtol=1e-3)
    again = tmp_path / "again.gguf"
    export_gguf(out, again, "Q8_0")
    assert all(np.array_equal(stored_edit_keys(again)[k].numpy(), got[k].numpy()) for k in got)


def _template(tmp_path):
    from conftest import make_tokenizer
    from test_gguf_export import _tokenizer_template

    tok = make_tokenizer()
    return _tokenizer_template(tmp_path / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))

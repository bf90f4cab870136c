"""A chain of patches of one GGUF file computes what one sequential run computes: each patch reads the
earlier edits' keys from the file (bounded, compacted past the key width) and the statistics of the unedited
file the chain started from."""
from __future__ import annotations

import json

import numpy as np
import pytest

SUBJECTS = [f"{a} {b}" for a in ("red", "green", "blue", "yellow", "famous")
            for b in ("cat", "dog", "bird", "fish", "tree", "river", "mountain", "lake", "sun", "moon")]
CITIES = ("Paris", "London", "Rome", "Berlin", "Tokyo", "Madrid")
# --no-verify: llama.cpp cannot run the tiny word-level tokenizer
SETTINGS = ["--method", "memit", "--layers", "1,2", "--stats-samples", "16", "--no-verify"]


def _facts(n: int) -> list[dict]:
    return [{"prompt": f"The {s} is located in the city of", "subject": s, "target_new": CITIES[i % 6],
             "ground_truth": CITIES[(i + 1) % 6]} for i, s in enumerate(SUBJECTS[:n])]


def _narrow_gguf(tmp_path):
    """A tiny random llama whose MLP keys are 24 wide (fewer than the facts) as an F32 GGUF: patching F32
    tensors is exact, so the chain and the one run differ only in float rounding."""
    import torch
    from conftest import make_config, make_tokenizer
    from test_gguf_export import _tokenizer_template
    from transformers import AutoModelForCausalLM

    from qedit.converters.gguf.export import export_gguf

    tok = make_tokenizer()
    config = make_config("llama", len(tok))
    config.intermediate_size = 24
    torch.manual_seed(3)
    model_dir = tmp_path / "narrow"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    template = _tokenizer_template(tmp_path / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    src = tmp_path / "narrow.F32.gguf"
    export_gguf(model_dir, src, "F32", template=template)
    return src


def _tensors(path, names):
    from qedit.converters.gguf.read import GGUFFile

    with GGUFFile(path) as gf:
        return {n: gf.dequantize(n).astype(np.float64) for n in names}


def test_fifty_facts_in_ten_patches_equal_one_run_of_the_same_batches(tmp_path, capsys):
    from qedit.cli import main
    from qedit.converters.gguf.keys import read_carried
    from qedit.converters.gguf.read import GGUFFile

    src = _narrow_gguf(tmp_path)
    facts = _facts(50)
    every = tmp_path / "all.jsonl"
    every.write_text("".join(json.dumps(f) + "\n" for f in facts))
    one = tmp_path / "one.gguf"
    assert main(["edit", str(src), str(every), "--batch-size", "5", "-o", str(one), *SETTINGS]) == 0
    prev = src
    for i in range(10):
        batch = tmp_path / f"batch{i}.jsonl"
        batch.write_text("".join(json.dumps(f) + "\n" for f in facts[5 * i:5 * i + 5]))
        out = tmp_path / f"patch{i}.gguf"
        assert main(["edit", str(prev), str(batch), "-o", str(out), *SETTINGS]) == 0
        prev = out
    text = capsys.readouterr().out
    assert "blk.1: 45, blk.2: 45" in text                       # the last patch protects the 45 earlier facts
    with GGUFFile(prev) as gf:
        state = read_carried(gf)
    assert sorted(state) == [1, 2] and all(c.facts == 50 and c.rows <= 24 for c in state.values())   # compacted
    names = [f"blk.{layer}.ffn_down.weight" for layer in (1, 2)]
    base, want, got = _tensors(src, names), _tensors(one, names), _tensors(prev, names)
    for name in names:
        change, chained = want[name] - base[name], got[name] - base[name]
        assert np.linalg.norm(change) > 1e-3 * np.linalg.norm(base[name])     # the edits are there
        err = np.linalg.norm(chained - change) / np.linalg.norm(change)
        assert err < 1e-2, (name, err)                                      # float16 keys, float32 files


@pytest.mark.parametrize("rank", [4, 12])
def test_a_state_compacted_below_the_key_rank_still_protects_most_of_the_earlier_keys(rank):
    """Truncating the carried keys to `rank` directions, patch after patch, keeps the directions with the most
    energy: the part of the earlier keys' Gram it drops is close to what the best rank-`rank` approximation of
    all the keys at once drops."""
    from qedit.converters.gguf.keys import carried_after

    rng = np.random.default_rng(1)
    keys = rng.normal(size=(40, 24)) * np.linspace(3.0, 0.1, 24)          # (40, 24) decaying spectrum
    state: dict = {}
    for batch in np.split(keys, 8):
        state = carried_after(state, {0: batch}, rank=rank)
    kept = state[0].keys().astype(np.float64)
    gram = keys.T @ keys
    w = np.linalg.eigvalsh(gram)
    lost = np.linalg.norm(gram - kept.T @ kept)
    best = np.sqrt(np.sum(w[:-rank] ** 2))                                # Frobenius error of the best rank-r
    assert state[0].rows == rank and state[0].facts == 40 and best < lost <= 1.2 * best


def _write(path, facts):
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    return path


def test_a_contradicting_fact_replaces_the_earlier_one_and_inspect_shows_it(tmp_path, capsys):
    """Re-targeting fact 3 of an earlier patch: the new patch says so, takes the old fact's keys out of the
    carried state (4 + 2 facts remain), records the replacement, and `inspect` shows it on both sides."""
    from qedit.cli import main
    from qedit.converters.gguf.keys import read_carried
    from qedit.converters.gguf.patch import read_manifests
    from qedit.converters.gguf.read import GGUFFile

    src, facts = _narrow_gguf(tmp_path), _facts(6)
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    assert main(["edit", str(src), str(_write(tmp_path / "a.jsonl", facts[:5])), "-o", str(first), *SETTINGS]) == 0
    changed = {**facts[2], "target_new": "Tokyo" if facts[2]["target_new"] != "Tokyo" else "Rome"}
    batch = _write(tmp_path / "b.jsonl", [changed, facts[5]])
    capsys.readouterr()
    assert main(["edit", str(first), str(batch), "-o", str(second), *SETTINGS]) == 0
    out = capsys.readouterr().out
    assert f"b.jsonl:1: replaces fact 3 of edit 1 in first.gguf ({facts[2]['subject']}: " in out
    assert "protecting the keys of earlier edits recorded in the file (blk.1: 4, blk.2: 4)" in out
    with GGUFFile(second) as gf:
        state, manifests = read_carried(gf), read_manifests(gf)
    assert {layer: c.facts for layer, c in state.items()} == {1: 6, 2: 6}
    (record,) = manifests[1]["info"]["replaces"]
    assert (record["patch"], record["fact"], record["new_target"]) == (1, 2, changed["target_new"])
    assert main(["inspect", str(second)]) == 0
    text = capsys.readouterr().out
    assert "replaces fact 3 of edit 1" in text and f"fact 3 ({facts[2]['subject']}) was replaced by edit 2" in text


def test_two_contradicting_facts_in_one_patch_are_refused(tmp_path, capsys):
    from qedit.cli import main

    facts = _facts(2)
    batch = _write(tmp_path / "b.jsonl", [facts[0], {**facts[0], "target_new": "Tokyo"}, facts[1]])
    out, src = tmp_path / "out.gguf", _narrow_gguf(tmp_path)
    capsys.readouterr()
    assert main(["edit", str(src), str(batch), "-o", str(out), *SETTINGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.jsonl:1 and " in err[0] and "b.jsonl:2" in err[0] and "keep one" in err[0]
    assert not out.exists()


def test_a_file_whose_carried_keys_were_damaged_is_refused(tmp_path, capsys):
    from qedit.cli import main
    from qedit.converters.gguf.keys import read_carried
    from qedit.converters.gguf.read import GGUFFile

    src, facts = _narrow_gguf(tmp_path), _facts(2)
    first = tmp_path / "first.gguf"
    assert main(["edit", str(src), str(_write(tmp_path / "a.jsonl", facts[:1])), "-o", str(first), *SETTINGS]) == 0
    with GGUFFile(first) as gf:
        digest = read_carried(gf)[1].digest()
    damaged = tmp_path / "damaged.gguf"
    data = first.read_bytes()
    assert data.count(digest.encode()) == 1
    damaged.write_bytes(data.replace(digest.encode(), b"0" * 64))
    capsys.readouterr()
    out = tmp_path / "out.gguf"
    assert main(["edit", str(damaged), str(_write(tmp_path / "b.jsonl", facts[1:])), "-o", str(out), *SETTINGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged.gguf" in err[0] and "qedit.edit_keys.blk.1" in err[0] and "sha256" in err[0]
    assert not out.exists()


def test_a_sequential_run_caches_only_the_targets_computed_on_the_files_weights(tmp_path, monkeypatch):
    """The second batch's targets are computed with the first batch applied: they are not the file's targets and
    must not be cached under its fingerprint (a later edit of the unedited file would read them)."""
    from qedit.converters.loading import load_model
    from qedit.core.facts import request_from_dict
    from qedit.edit.compute import compute_edits
    from qedit.edit.registry import EditContext
    from qedit.edit.target_cache import target_cache_dir
    from qedit.pipeline.jobs import make_config

    monkeypatch.setenv("QEDIT_CACHE", str(tmp_path / "cache"))    # its own cache: other tests edit this model too
    loaded = load_model(_narrow_gguf(tmp_path))
    cfg = make_config("memit", layers=[1, 2])
    where = target_cache_dir(loaded, cfg, EditContext())
    compute_edits(loaded, [request_from_dict(f) for f in _facts(2)], "memit", cfg, batch_size=1)
    assert len([p for p in where.iterdir() if p.suffix == ".pt"]) == 1, sorted(where.iterdir())

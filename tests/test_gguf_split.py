"""Split GGUF files (`name-00001-of-00003.gguf`, llama.cpp's gguf-split): qedit reads all the shards as one
model, refuses a shard other than the first and a missing shard with one line, and writes a patch or an export
of a split model as one file that llama.cpp runs."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import WORDS
from tiny_archs import build_arch_dir, finish, logits, spm_vocab, write_vocab_gguf

from qedit.converters.gguf.read import GGUFFile
from qedit.core.errors import QeditError

IDS = [2, 300, 320, 340, 400, 500]


def split_copy(src: Path, dst: Path, max_tensors: int) -> list[Path]:
    """`src` rewritten by gguf-py's writer as shards of at most `max_tensors` tensors (dst names the set)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents(), split_max_tensors=max_tensors)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    finish(writer, dst)
    return sorted(dst.parent.glob(f"{dst.stem}-*-of-*.gguf"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from qedit.converters.gguf.export import export_gguf

    root = tmp_path_factory.mktemp("split")
    tokens, types, scores = spm_vocab(list(dict.fromkeys(WORDS)))
    template = write_vocab_gguf(root / "vocab.gguf", tokens, types, scores=scores)
    hf, model = build_arch_dir("qwen3", root / "qwen3", len(tokens))
    single = root / "single" / "model.gguf"
    single.parent.mkdir()
    export_gguf(hf, single, "Q8_0", template=template)
    (root / "parts").mkdir()
    shards = split_copy(single, root / "parts" / "model.gguf", max_tensors=9)
    return single, shards, model


def test_the_shards_read_as_one_model(files):
    from qedit.converters.gguf.to_torch import load_gguf

    single, shards, ref = files
    assert len(shards) == 3 and shards[0].name == "model-00001-of-00003.gguf"
    with GGUFFile(single) as one, GGUFFile(shards[0]) as split:
        assert split.shards == shards and set(split.split) == {"split.no", "split.count", "split.tensors.count"}
        assert not any(k.startswith("split.") for k in split.fields)  # outputs are written as one file
        assert one.tensors.keys() == split.tensors.keys()
        for name in one.tensors:
            assert bytes(one.raw(name)) == bytes(split.raw(name)), name
    model, tokenizer, stored = load_gguf(shards[0])
    assert stored["model.layers.1.mlp.down_proj.weight"] == "Q8_0"
    assert np.abs(logits(model, IDS) - logits(ref, IDS)).max() < 0.05 * np.abs(logits(ref, IDS)).max()
    assert tokenizer("the city").input_ids[0] == 2


def test_other_shards_and_missing_shards_are_one_line_errors(files, tmp_path):
    _, shards, _ = files
    with pytest.raises(QeditError, match="shard 2 of a split GGUF; give the first shard, model-00001-of-00003.gguf"):
        GGUFFile(shards[1])
    lone = tmp_path / shards[0].name
    lone.write_bytes(shards[0].read_bytes())
    with pytest.raises(QeditError, match="shard 2 of 3 of model-00001-of-00003.gguf is missing") as err:
        GGUFFile(lone)
    assert "\n" not in str(err.value)
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(shards[0].read_bytes())
    with pytest.raises(QeditError, match="the name is not '<name>-00001-of-00003.gguf'"):
        GGUFFile(renamed)


@pytest.mark.runtime
def test_a_patch_of_a_split_model_is_one_file_llama_cpp_runs(files, tmp_path):
    from test_gguf_export import _delta, _llama_logits

    from qedit.converters.gguf.patch import patch_gguf

    single, shards, _ = files
    delta = _delta("model.layers.1.mlp.down_proj.weight", 64, 96, seed=2, scale=0.5)
    patch_gguf(single, tmp_path / "from_single.gguf", [delta], {"method": "test"})
    patch_gguf(shards[0], tmp_path / "from_split.gguf", [delta], {"method": "test"})
    with GGUFFile(tmp_path / "from_single.gguf") as a, GGUFFile(tmp_path / "from_split.gguf") as b:
        assert b.split == {} and a.tensors.keys() == b.tensors.keys()
        for name in a.tensors:
            assert bytes(a.raw(name)) == bytes(b.raw(name)), name
    want = _llama_logits(shards[0], IDS)  # llama.cpp reads the shards itself
    np.testing.assert_allclose(_llama_logits(single, IDS), want, atol=1e-5)
    patched = _llama_logits(tmp_path / "from_split.gguf", IDS)
    assert not np.allclose(patched, want) and np.isfinite(patched).all()

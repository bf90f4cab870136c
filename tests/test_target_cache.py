"""The on-disk target cache: keyed by model state, site, prefixes, settings and the chunk of requests."""
from __future__ import annotations

import torch
from conftest import FACTS

from qedit.converters.loading import load_model
from qedit.core.delta import LowRankDelta, applied
from qedit.core.facts import request_from_dict
from qedit.edit import targets as _target
from qedit.edit.registry import TargetConfig
from qedit.edit.target_cache import weights_digest
from qedit.unlearn.objectives import AwayFromAnswer

CFG = TargetConfig(steps=6, stop_nll=2.0, n_prefixes=0, chunk=2)
SITE_LAYER = 1


def _setup(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"])
    return loaded, [request_from_dict(f) for f in FACTS], loaded.arch.mlp_out.format(SITE_LAYER)


def _count_chunks(monkeypatch) -> list[int]:
    real_chunk = _target._chunk_targets
    seen: list[int] = []

    def counting(loaded_, chunk_reqs, *args):
        seen.append(len(chunk_reqs))
        return real_chunk(loaded_, chunk_reqs, *args)

    monkeypatch.setattr(_target, "_chunk_targets", counting)
    return seen


def test_cached_targets_equal_computed_ones(tiny_dirs, tmp_path, monkeypatch):
    loaded, reqs, site = _setup(tiny_dirs)
    plain, nll_plain = _target.optimize_targets(loaded, reqs, site, [""], CFG)                  # (3, d)
    first, nll_first = _target.optimize_targets(loaded, reqs, site, [""], CFG, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2                                               # chunks [0, 1], [2]
    seen = _count_chunks(monkeypatch)
    again, nll_again = _target.optimize_targets(loaded, reqs, site, [""], CFG, cache_dir=tmp_path)
    assert seen == []
    assert torch.equal(again, first) and torch.equal(first, plain) and nll_again == nll_first == nll_plain


def test_cache_misses_on_any_change(tiny_dirs, tmp_path, monkeypatch):
    loaded, reqs, site = _setup(tiny_dirs)
    _target.optimize_targets(loaded, reqs[:2], site, [""], CFG, cache_dir=tmp_path)
    seen = _count_chunks(monkeypatch)
    _target.optimize_targets(loaded, reqs[1:2], site, [""], CFG, cache_dir=tmp_path)           # other chunk
    _target.optimize_targets(loaded, reqs[:2], site, [""], TargetConfig(steps=5, stop_nll=2.0, n_prefixes=0, chunk=2),
                             cache_dir=tmp_path)                                                 # other settings
    _target.optimize_targets(loaded, reqs[:2], site, ["Hello. "], CFG, cache_dir=tmp_path)    # other prefixes
    _target.optimize_targets(loaded, reqs[:2], loaded.arch.mlp_out.format(0), [""], CFG, cache_dir=tmp_path)
    w = loaded.edit_weight(SITE_LAYER)                                                           # (out, in)
    delta = LowRankDelta(loaded.arch.weight_name(SITE_LAYER), SITE_LAYER, torch.full((w.shape[0], 1), 1e-3),
                         torch.ones(1, w.shape[1]), 1.0, loaded.arch.mlp_out_orientation)
    before = weights_digest(loaded.model)
    with applied(loaded.model, [delta]):
        assert weights_digest(loaded.model) != before
        _target.optimize_targets(loaded, reqs[:2], site, [""], CFG, cache_dir=tmp_path)        # changed model
    assert seen == [1, 2, 2, 2, 2]
    assert weights_digest(loaded.model) == before
    # with applied deltas the cache is neither read nor written
    n_files = len(list(tmp_path.glob("*.pt")))
    _target.optimize_targets(loaded, reqs[:2], site, [""], CFG, applied=[delta], cache_dir=tmp_path)
    _target.optimize_targets(loaded, reqs[:2], site, [""], CFG, applied=[delta], cache_dir=tmp_path)
    assert seen == [1, 2, 2, 2, 2, 2, 2] and len(list(tmp_path.glob("*.pt"))) == n_files == 6


def test_damaged_cache_entry_is_recomputed(tiny_dirs, tmp_path):
    loaded, reqs, site = _setup(tiny_dirs)
    first, _ = _target.optimize_targets(loaded, reqs[:1], site, [""], CFG, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.pt")
    entry.write_bytes(b"not a tensor file")
    again, _ = _target.optimize_targets(loaded, reqs[:1], site, [""], CFG, cache_dir=tmp_path)
    assert torch.equal(again, first)
    assert torch.load(entry, weights_only=True)["deltas"].shape == first.shape


def test_unlearning_targets_have_their_own_entries(tiny_dirs, tmp_path, monkeypatch):
    """kforget's targets (AwayFromAnswer) never answer for an edit's targets with the same requests, nor the
    other way round, and each margin has its own entry."""
    loaded, reqs, site = _setup(tiny_dirs)
    edit_t, _ = _target.optimize_targets(loaded, reqs[:2], site, [""], CFG, cache_dir=tmp_path)
    seen = _count_chunks(monkeypatch)
    away, hinge = _target.optimize_targets(loaded, reqs[:2], site, [""], CFG, cache_dir=tmp_path, objective=AwayFromAnswer(3.0))
    assert seen == [2] and not torch.equal(away, edit_t) and all(h >= 0 for h in hinge)
    _target.optimize_targets(loaded, reqs[:2], site, [""], CFG, cache_dir=tmp_path, objective=AwayFromAnswer(3.0))   # a hit
    _target.optimize_targets(loaded, reqs[:2], site, [""], CFG, cache_dir=tmp_path, objective=AwayFromAnswer(1.0))   # a miss
    assert seen == [2, 2]

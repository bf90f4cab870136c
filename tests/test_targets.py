"""Target optimisation: each request leaves once its own loss is met, so a chunk's targets are each request's
own; the layers under the site are replayed, not run again, with the same result."""
from __future__ import annotations

import pytest
import torch
from conftest import FACTS, FAMILIES

from qedit.converters.loading import load_model
from qedit.core.batching import build_batch, logits_at, target_index
from qedit.core.facts import request_from_dict
from qedit.core.hooks import edit_outputs, record_whole, replay
from qedit.edit import targets as _target
from qedit.edit.registry import TargetConfig

CFG = TargetConfig(steps=20, stop_nll=3.0, n_prefixes=0, chunk=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_layers_give_the_full_forward(tiny_dirs, family):
    loaded = load_model(tiny_dirs[family])
    batch = build_batch(loaded, [f["prompt"] for f in FACTS], [f["target_new"] for f in FACTS])
    rows, cols, _ = target_index(batch)
    below = [loaded.arch.layer.format(i) for i in range(loaded.n_layers - 1)]
    site = loaded.arch.mlp_out.format(loaded.n_layers - 1)
    bump = {site: lambda _inp, out: out + torch.linspace(-1, 1, out.shape[-1])}   # a change above the replayed layers
    with torch.no_grad():
        with record_whole(loaded.model, below[-1]) as under:
            logits_at(loaded, batch, rows, cols)
        with edit_outputs(loaded.model, bump):
            full = logits_at(loaded, batch, rows, cols)                                     # (n_t, vocab)
        with replay(loaded.model, below, under[0]), edit_outputs(loaded.model, bump):
            replayed = logits_at(loaded, batch, rows, cols)
        changed = logits_at(loaded, batch, rows, cols)         # the layers are back: the bump is gone
    torch.testing.assert_close(replayed, full, rtol=0, atol=1e-6)
    assert (changed - full).abs().max() > 1e-3


def test_a_chunks_targets_are_each_requests_own(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"])
    reqs = [request_from_dict(f) for f in FACTS]
    site = loaded.arch.mlp_out.format(1)
    together, nll_together = _target.optimize_targets(loaded, reqs, site, [""], CFG)            # (3, d)
    for i, req in enumerate(reqs):
        alone, nll_alone = _target.optimize_targets(loaded, [req], site, [""], CFG)             # (1, d)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-6)
        assert nll_together[i] == pytest.approx(nll_alone[0], rel=1e-4, abs=1e-6)
    # the requests finish at different steps, or this would not test the freezing
    steps = [_steps_to_finish(loaded, req, site) for req in reqs]
    assert len(set(steps)) > 1, steps


def _steps_to_finish(loaded, req, site) -> int:
    for steps in range(1, CFG.steps + 1):
        _, nll = _target.optimize_targets(loaded, [req], site, [""], TargetConfig(
            steps=steps, stop_nll=CFG.stop_nll, n_prefixes=0, chunk=8))
        if nll[0] < CFG.stop_nll:
            return steps
    return CFG.steps + 1

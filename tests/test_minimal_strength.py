"""Minimal strength (qedit.edit.strength) on the tiny models: ROME, MEMIT and AlphaEdit scaled to the
smallest edit that reaches `target_margin` (and up to `max_scale` when the full edit falls short), the
margin as the lead over every other token, the bisection, and unlearning's forget gap."""
from __future__ import annotations

import pytest
import torch
from conftest import EDIT_PROMPT, EDIT_SUBJECT
from test_methods_tiny import CANDIDATES, counterfactual, method_config

from qedit.converters.loading import load_model
from qedit.core.delta import LowRankDelta
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest
from qedit.edit.registry import EditContext, TargetConfig, get_method
from qedit.runtimes.torch_runner import TorchRunner

# A full edit that makes the target top-1 with room to spare, so there is something to scale.
STRONG_TARGET = TargetConfig(steps=100, stop_nll=0.05, clamp_norm=10.0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rome_minimal_strength_reaches_the_target_margin_with_a_smaller_edit(tiny, family):
    from qedit.edit.keys import context_prefixes
    from qedit.edit.strength import _margin

    loaded = load_model(tiny[family])
    request = counterfactual(TorchRunner(loaded))
    full = get_method("rome").compute(loaded, [request], method_config("rome", family, target=STRONG_TARGET,
                                                                       target_margin=None), EditContext())
    full_margin = _margin(loaded, [request], context_prefixes(loaded, method_config("rome", family)), full.deltas)
    assert full_margin > 0, "the full edit must make the new target top-1"
    target = full_margin / 3  # well below what the full edit reaches
    cfg = method_config("rome", family, target=STRONG_TARGET, target_margin=target)
    minimal = get_method("rome").compute(loaded, [request], cfg, EditContext())
    (d,) = minimal.deltas
    assert 0.0 < d.scale < 1.0 and d.norm() < full.deltas[0].norm()
    assert d.meta["margin"] >= target
    assert torch.allclose(d.a, full.deltas[0].a) and torch.allclose(d.b, full.deltas[0].b)
    with pytest.raises(ValueError, match="target_margin"):
        method_config("rome", family, target_margin=0.0)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_spread_minimal_strength_scales_the_whole_batch_to_the_target_margin(tiny, method):
    """MEMIT and AlphaEdit with target_margin: every layer's delta is the full edit's, scaled by one factor
    alpha < 1 at which the batch's weakest request still reaches the target margin."""
    from qedit.edit.keys import context_prefixes
    from qedit.edit.strength import _margin

    loaded = load_model(tiny["llama"])
    request = counterfactual(TorchRunner(loaded))
    full = get_method(method).compute(loaded, [request], method_config(method, "llama", target=STRONG_TARGET,
                                                                       target_margin=None), EditContext())
    prefixes = context_prefixes(loaded, method_config(method, "llama"))
    full_margin = _margin(loaded, [request], prefixes, full.deltas)
    target = max(0.5, full_margin / 3)
    assert full_margin > target
    res = get_method(method).compute(loaded, [request], method_config(method, "llama", target=STRONG_TARGET,
                                                                      target_margin=target), EditContext())
    alpha = res.info["scale"]
    assert 0.0 < alpha < 1.0 and res.info["margin"] >= target
    assert _margin(loaded, [request], prefixes, res.deltas) == pytest.approx(res.info["margin"], abs=1e-4)
    assert len(res.deltas) == len(full.deltas)
    for d, f in zip(res.deltas, full.deltas):
        assert d.layer == f.layer and d.scale == pytest.approx(alpha * f.scale)
        assert torch.allclose(d.dense(), alpha * f.dense(), atol=1e-6)
    for layer, k in full.keys.items():
        assert torch.allclose(res.keys[layer], k)
    with pytest.raises(ValueError, match="target_margin"):
        method_config(method, "llama", target_margin=-1.0)


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_an_edit_below_its_target_margin_is_scaled_up_to_max_scale(tiny, method):
    """max_scale > 1: an edit whose full strength stays below target_margin is scaled up by one factor, to the
    smallest that reaches the margin (or max_scale); with the default max_scale 1 it keeps full strength."""
    from qedit.edit.keys import context_prefixes
    from qedit.edit.strength import _margin

    loaded = load_model(tiny["llama"])
    request = counterfactual(TorchRunner(loaded))
    full = get_method(method).compute(loaded, [request], method_config(method, "llama", target_margin=None),
                                      EditContext())
    prefixes = context_prefixes(loaded, method_config(method, "llama"))
    full_margin = _margin(loaded, [request], prefixes, full.deltas)
    target = full_margin + 1.0                        # out of the full edit's reach
    kept = get_method(method).compute(loaded, [request], method_config(method, "llama", target_margin=target),
                                      EditContext())
    up = get_method(method).compute(loaded, [request], method_config(method, "llama", target_margin=target,
                                                                     max_scale=8.0), EditContext())
    for d, f in zip(kept.deltas, full.deltas):
        assert torch.allclose(d.dense(), f.dense(), atol=1e-6)
    alphas = {round(d.scale / f.scale, 6) for d, f in zip(up.deltas, full.deltas)}
    assert len(alphas) == 1 and 1.0 < alphas.pop() <= 8.0
    reached = _margin(loaded, [request], prefixes, up.deltas)
    assert reached >= target or all(d.scale == pytest.approx(8.0 * f.scale) for d, f in zip(up.deltas, full.deltas))
    with pytest.raises(QeditError, match="max_scale"):
        method_config(method, "llama", max_scale=0.5)


def test_the_minimal_strength_margin_is_the_lead_over_every_other_token(tiny):
    """`_margin` is the new target's lead over the true answer AND over the strongest other token: a target
    that beats the true answer but is not the model's top-1 has a negative margin."""
    from qedit.edit.strength import _margin

    loaded = load_model(tiny["llama"])
    runner = TorchRunner(loaded)
    logp = [s.mean_logprob for s in runner.score([(EDIT_PROMPT, c) for c in CANDIDATES])]
    order = sorted(range(len(CANDIDATES)), key=lambda i: -logp[i])
    runner_up, last = CANDIDATES[order[1]], CANDIDATES[order[-1]]    # beats `last`, loses to order[0]
    request = EditRequest(EDIT_PROMPT, EDIT_SUBJECT, runner_up, last)
    vs_true = logp[order[1]] - logp[order[-1]]
    assert vs_true > 0
    margin = _margin(loaded, [request], [""], [])
    assert margin < 0 < vs_true
    leader = EditRequest(EDIT_PROMPT, EDIT_SUBJECT, CANDIDATES[order[0]], last)
    assert _margin(loaded, [leader], [""], []) <= logp[order[0]] - logp[order[-1]] + 1e-4


@pytest.mark.parametrize("target, max_scale, expected", [
    (1.0, 1.0, 0.5),      # the full edit overshoots: scaled down
    (3.0, 1.0, 1.0),      # below the target at full strength, and no scaling up allowed
    (3.0, 4.0, 1.5),      # scaled up to reach it
    (10.0, 4.0, 4.0),     # even max_scale stays below: max_scale
])
def test_minimal_scale_bisects_down_to_the_margin_and_up_to_max_scale(target, max_scale, expected):
    """minimal_scale on a margin that grows as 2 x the edit's scale (a stand-in margin function)."""
    from qedit.edit.strength import minimal_scale

    delta = LowRankDelta("w", 0, torch.ones(2, 1), torch.ones(1, 3))

    def margin(loaded, reqs, prefixes, deltas):
        return 2.0 * sum(d.scale for d in deltas)

    alpha, reached = minimal_scale(None, [], [""], [delta], [], target, steps=10, max_scale=max_scale, margin_fn=margin)
    assert alpha == pytest.approx(expected, abs=4.0 / 2 ** 10)
    assert reached == pytest.approx(2.0 * alpha)
    assert reached >= target or alpha in (1.0, max_scale)


def test_forget_gap_is_the_lead_of_the_best_other_token_over_the_answer(tiny):
    """`forget_gap`: log P(best other) - log P(answer's first token), negative while the answer is top-1."""
    from qedit.edit.strength import forget_gap

    loaded = load_model(tiny["llama"])
    logp = [s.mean_logprob for s in TorchRunner(loaded).score([(EDIT_PROMPT, c) for c in CANDIDATES])]
    order = sorted(range(len(CANDIDATES)), key=lambda i: -logp[i])
    top, other = (EditRequest(EDIT_PROMPT, EDIT_SUBJECT, CANDIDATES[i]) for i in (order[0], order[-1]))
    assert forget_gap(loaded, [other], [""], []) > 0
    assert forget_gap(loaded, [top, other], [""], []) == pytest.approx(forget_gap(loaded, [top], [""], []))

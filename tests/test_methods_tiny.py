"""Every edit method on a tiny random model of every supported family.

For each (family, method): the edit reaches efficacy on its own request (judged by
qedit.evaluation.metrics on a TorchRunner), leaves the unrelated prompts' next-token distributions nearly
unchanged, computes without touching the weights, and returns low-rank deltas in the weight's
own orientation that `applied` puts in the right place. Plus: ranks per method, keys at the
subject's last token, AlphaEdit's sequential history, and the key-statistics cache (minimal strength:
test_minimal_strength).

Tiny random models are hard to edit, so the configs below are small and explicit, and the edit
request is chosen per model so that the unedited model prefers the ground truth (the test fails
if the edit does nothing).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import EDIT_PROMPT, EDIT_SUBJECT, FACTS, FAMILIES, UNRELATED

from qedit.converters.loading import load_model
from qedit.core.delta import LowRankDelta, applied, combine
from qedit.core.facts import EditRequest, request_from_dict
from qedit.core.model import LoadedModel
from qedit.core.stats import StatsConfig
from qedit.edit.compute import compute_edits
from qedit.edit.registry import (
    EDIT_METHODS,
    EditContext,
    EditMethod,
    MethodConfig,
    MethodRegistry,
    TargetConfig,
    get_method,
)
from qedit.evaluation.metrics import evaluate
from qedit.runtimes.torch_runner import TorchRunner

METHODS = ("rome", "memit", "alphaedit", "ft")
CANDIDATES = ("Rome", "Paris", "London", "Berlin", "Tokyo", "Madrid")

# 64 x 15 = 960 key tokens, more than the widest key (gpt2: 256), so C is full rank.
STATS = StatsConfig(n_samples=64, sample_len=16)
TARGET = TargetConfig(steps=25, stop_nll=1.0)   # stop once the target is likely; overshooting only costs locality
FT_SETTINGS = {
    "default": dict(steps=30, lr=2e-2, linf=5e-2, stop_nll=1.5),
    # gpt2's GELU keys share a large mean direction, so an entrywise update shifts every
    # position; a 12x tighter box keeps FT's collateral change in bounds there.
    "gpt2": dict(steps=40, lr=1e-3, linf=4e-3, stop_nll=1.5),
}
# Measured over the 16 (family, method) cases: mean KL(before || after) over all positions of
# conftest.UNRELATED is <= 0.2 nats (the models' mean entropy is 1.9-5.4 nats) while each edit
# raises log P(target) on its own prompt by >= 1.7 nats. The former least-squares solve on a
# singular key covariance gave 0.7-4.9 nats here.
KL_BOUND = 0.3
# How much of the target's log-prob gain may leak onto unrelated positions. Measured: <= 0.27
# for the locate-then-edit methods; FT has no locality mechanism and leaks 0.64 on gpt2.
# The sampled statistics text moves these by seed: with another sampler or seed, gpt2/alphaedit
# leaked 0.41 and ROME on a singular C moved unrelated prompts by 0.33 nats; the bounds below leave
# room for that and still fail the broken solves (0.7-4.9 nats).
LEAK_BOUND = {"rome": 0.4, "memit": 0.4, "alphaedit": 0.5, "ft": 0.85}
SINGULAR_KL_BOUND = 0.45



def method_config(method: str, family: str, **overrides) -> MethodConfig:
    settings: dict = dict(stats=STATS)
    if method == "ft":
        settings.update(FT_SETTINGS.get(family, FT_SETTINGS["default"]))
    else:
        settings["target"] = TARGET
    if method == "memit":
        settings["cov_weight"] = 100.0     # MEMIT's lambda ~ d_in (GPT-J: 1.5e4 for 16384); here d_in is 128-256
    if method == "alphaedit":
        # A tiny model's key spectrum is flat: below 1e-2 of the top eigenvalue there is no null space.
        settings.update(nullspace_threshold=0.1, l2=1.0)
    settings.update(overrides)
    return EDIT_METHODS.make_config(method, **settings)


def counterfactual(runner: TorchRunner, prompt: str = EDIT_PROMPT, subject: str = EDIT_SUBJECT) -> EditRequest:
    """ground_truth = the candidate the model prefers; target_new = the likeliest candidate at
    least 1 nat below it (so the unedited model fails efficacy by a clear margin)."""
    logp = [s.mean_logprob for s in runner.score([(prompt, c) for c in CANDIDATES])]
    best = max(range(len(CANDIDATES)), key=lambda i: logp[i])
    below = [i for i in range(len(CANDIDATES)) if logp[i] <= logp[best] - 1.0]
    target = max(below, key=lambda i: logp[i]) if below else min(range(len(CANDIDATES)), key=lambda i: logp[i])
    return EditRequest(prompt, subject, CANDIDATES[target], CANDIDATES[best])


@torch.no_grad()
def next_token_logprobs(loaded: LoadedModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """log-softmax of the full model's logits (n, seq, vocab) and the mask of real tokens (n, seq)."""
    enc = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
    logits = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return F.log_softmax(logits.float(), dim=-1), enc["attention_mask"].bool()


def mean_kl(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> float:
    kl = (before.exp() * (before - after)).sum(-1)                              # (n, seq)
    return float(kl[mask].mean())


def check_deltas(loaded: LoadedModel, deltas: list[LowRankDelta], method: str, n_requests: int) -> None:
    """Types, names, orientation, shapes and ranks of a method's deltas."""
    assert deltas and all(isinstance(d, LowRankDelta) for d in deltas)
    for d in deltas:
        assert d.name == loaded.arch.weight_name(d.layer)
        assert d.orientation is loaded.arch.mlp_out_orientation
        assert d.shape == tuple(loaded.edit_weight(d.layer).shape)                 # math (out, in)
        assert torch.isfinite(d.a).all() and torch.isfinite(d.b).all()
    if method == "rome":
        assert len(deltas) == n_requests and all(d.rank == 1 for d in deltas)
    elif method in ("memit", "alphaedit"):
        layers = [d.layer for d in deltas]
        assert len(layers) == len(set(layers)), "one delta per layer"
        assert all(1 <= d.rank <= n_requests for d in deltas)
    else:
        assert all(1 <= d.rank < min(d.shape) for d in deltas), "FT's update is projected to low rank"


@torch.no_grad()
def check_applied_orientation(loaded: LoadedModel, deltas: list[LowRankDelta]) -> None:
    """With the delta applied, each edited module maps x to its old output plus dW x (math orientation),
    also for gpt2's Conv1D, which stores its weight as (in, out)."""
    gen = torch.Generator().manual_seed(0)
    for d in combine(deltas):
        module = loaded.module(loaded.arch.mlp_out.format(d.layer))
        x = torch.randn(5, d.shape[1], generator=gen)                               # (5, in)
        before = module(x)
        with applied(loaded.model, [d]):
            after = module(x)
        torch.testing.assert_close(after - before, d.output_change(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_is_effective_and_local(tiny, family, method):
    loaded = load_model(tiny[family])
    runner = TorchRunner(loaded)
    request = counterfactual(runner)
    before = evaluate(runner, [request]).cases[0]
    assert before.efficacy == 0.0
    base_logp, mask = next_token_logprobs(loaded, UNRELATED)
    weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}

    result = get_method(method).compute(loaded, [request], method_config(method, family), EditContext())

    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, weights[name]), f"computing the edit changed {name}"
    check_deltas(loaded, result.deltas, method, n_requests=1)
    check_applied_orientation(loaded, result.deltas)
    with applied(loaded.model, result.deltas):
        after = evaluate(runner, [request]).cases[0]
        logp, _ = next_token_logprobs(loaded, UNRELATED)
    gain = after.logp_new - before.logp_new
    assert after.efficacy == 1.0, f"{family}/{method}: margin {before.margin:.2f} -> {after.margin:.2f}"
    assert after.margin - before.margin >= 1.0

    kl = mean_kl(base_logp, logp, mask)
    assert kl < KL_BOUND, f"{family}/{method}: unrelated prompts moved by KL {kl:.3f} nats"
    target_id = runner.score([(EDIT_PROMPT, request.target_new)])[0].target_ids[0]
    leak = float((logp[..., target_id] - base_logp[..., target_id])[mask].mean())
    assert leak < LEAK_BOUND[method] * gain, f"{family}/{method}: target gains {leak:.2f} nats on unrelated prompts vs {gain:.2f}"


def test_rome_on_singular_key_covariance(tiny):
    """16 x 15 = 240 key tokens for gpt2's 256-wide keys: C is singular. ROME must still edit
    locally (a least-squares solve that inverted C's rounding noise made the edit backfire)."""
    loaded = load_model(tiny["gpt2"])
    runner = TorchRunner(loaded)
    request = counterfactual(runner)
    base_logp, mask = next_token_logprobs(loaded, UNRELATED)
    result = get_method("rome").compute(loaded, [request], method_config("rome", "gpt2", stats=StatsConfig(
        n_samples=16, sample_len=16)), EditContext())
    with applied(loaded.model, result.deltas):
        assert evaluate(runner, [request]).cases[0].efficacy == 1.0
        assert mean_kl(base_logp, next_token_logprobs(loaded, UNRELATED)[0], mask) < SINGULAR_KL_BOUND


@pytest.mark.parametrize("method", ("rome", "memit", "alphaedit"))
@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_ranks_with_several_requests(tiny, family, method):
    loaded = load_model(tiny[family])
    requests = [request_from_dict(f) for f in FACTS]
    result = get_method(method).compute(loaded, requests, method_config(method, family), EditContext())
    check_deltas(loaded, result.deltas, method, n_requests=len(requests))
    if method == "rome":
        assert combine(result.deltas)[0].rank == len(requests)
    for layer, keys in result.keys.items():
        assert keys.shape == (len(requests), loaded.edit_weight(layer).shape[1])


def test_ft_rank_setting_truncates(tiny):
    loaded = load_model(tiny["llama"])
    request = counterfactual(TorchRunner(loaded))
    result = get_method("ft").compute(loaded, [request], method_config("ft", "llama", rank=2, energy=None), EditContext())
    assert [d.rank for d in result.deltas] == [2]


@pytest.mark.parametrize("optimizer", ["adam", "normalized"])
def test_ft_key_penalty_shrinks_the_change_on_ordinary_keys(tiny, optimizer):
    """FT's key_weight penalises tr(dW C dW^T): the output change on the statistics' keys. A strong
    penalty must leave a smaller change there than none (same request, steps and optimizer)."""
    from qedit.core.stats import key_covariance

    loaded = load_model(tiny["llama"])
    request = counterfactual(TorchRunner(loaded))
    lr = 2e-2 if optimizer == "adam" else 0.5

    def key_energy(weight: float) -> float:
        cfg = method_config("ft", "llama", optimizer=optimizer, lr=lr, key_weight=weight, stop_nll=1e-3, steps=15)
        (d,) = get_method("ft").compute(loaded, [request], cfg, EditContext()).deltas
        cov = key_covariance(loaded, [d.layer], STATS)[d.layer]                       # (in, in)
        dw = d.dense()                                                                 # (out, in)
        return float(((dw @ cov) * dw).sum())

    free, held = key_energy(0.0), key_energy(1e3)
    assert held < 0.5 * free, f"{optimizer}: penalised change {held:.3g} against {free:.3g} without"


def test_ft_config_checks():
    for bad in (dict(optimizer="sgd"), dict(key_weight=-1.0), dict(retain_weight=-1.0), dict(linf=0.0)):
        with pytest.raises(ValueError):
            EDIT_METHODS.make_config("ft", **bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_keys_at_subject_last_token(tiny, family):
    """The key of a mid-prompt subject is the MLP-out input at the subject's last token."""
    from qedit.core.hooks import record
    from qedit.edit.keys import edit_keys

    loaded = load_model(tiny[family])
    request = request_from_dict(FACTS[1])                       # "Michael Jordan plays the sport of"
    tok = loaded.tokenizer
    ids = tok(request.prompt)["input_ids"]
    tokens = [tok.decode([i]).strip() for i in ids]
    position = tokens.index("Jordan")
    assert position < len(ids) - 1, "the subject must sit mid-prompt for this test"
    name = loaded.arch.mlp_out.format(1)
    with torch.no_grad(), record(loaded.model, [name], kind="input") as rec:
        loaded.model(input_ids=torch.tensor([ids]))
    key = edit_keys(loaded, [request], 1, [""])[0]
    torch.testing.assert_close(key, rec[name][0, position].float())


def test_alphaedit_sequential_batches_use_history(tiny):
    """compute_edits with batch_size passes the earlier batches' keys on; AlphaEdit then keeps the
    later update off them (|dW2 k1| drops by far) without weakening it on its own keys. The model is
    unchanged afterwards."""
    loaded = load_model(tiny["llama"])
    weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    requests = [request_from_dict(f) for f in FACTS[:2]]
    cfg = method_config("alphaedit", "llama")
    spec = get_method("alphaedit")
    histories: list[dict[int, torch.Tensor]] = []
    results = []

    spied = MethodRegistry("edit", EditMethod, EditRequest, "")

    @spied.register(EditMethod.ALPHAEDIT, spec.config_cls, multi_layer=True)
    def spy(loaded_, reqs, cfg_, ctx):
        histories.append({k: v.clone() for k, v in ctx.history.items()})
        results.append(spec.compute(loaded_, reqs, cfg_, ctx))
        return results[-1]

    outcome = compute_edits(loaded, requests, "alphaedit", cfg, batch_size=1, registry=spied)
    assert all(torch.equal(p, weights[n]) for n, p in loaded.model.named_parameters()), "the model was left edited"
    assert len(results) == 2 and len(outcome.info["batches"]) == 2
    first, second = results
    assert histories[0] == {} and set(histories[1]) == set(first.keys)
    for layer, keys in first.keys.items():               # history = sum of k k^T over the first batch's keys
        torch.testing.assert_close(histories[1][layer], keys.double().t() @ keys.double())
    # Batch 2 again on the model with batch 1 applied, without the history:
    with applied(loaded.model, first.deltas):
        without = spec.compute(loaded, requests[1:], cfg, EditContext())
    for d_hist, d_free in zip(second.deltas, without.deltas, strict=True):
        k1, k2 = first.keys[d_hist.layer], second.keys[d_hist.layer]
        on_k1 = float(d_hist.output_change(k1).norm()), float(d_free.output_change(k1).norm())
        on_k2 = float(d_hist.output_change(k2).norm()), float(d_free.output_change(k2).norm())
        assert on_k1[0] < 0.2 * on_k1[1], f"layer {d_hist.layer}: |dW2 k1| with/without history {on_k1}"
        assert on_k2[0] > 0.8 * on_k2[1], f"layer {d_hist.layer}: |dW2 k2| with/without history {on_k2}"


def test_key_statistics_cache(tiny, tmp_path, monkeypatch):
    """The second call reads the cache (keyed by model fingerprint, layer, sample count)."""
    import qedit.core.stats as stats

    cfg = StatsConfig(n_samples=8, sample_len=8, cache_dir=tmp_path)
    loaded = load_model(tiny["llama"])
    first = stats.key_covariance(loaded, [1, 2], cfg)
    entry = tmp_path / loaded.fingerprint[:20] / "self-s0-n8-l8-bfloat16"
    assert sorted(p.name for p in entry.iterdir() if not p.name.startswith(".")) == ["cov_layer1.pt", "cov_layer2.pt",
                                                                                  "tokens.json"]
    calls: list[tuple[int, ...]] = []
    real_compute, real_sample = stats._compute, stats._sample_from_model

    def counting(loaded_, layers, cfg_):
        calls.append(tuple(layers))
        return real_compute(loaded_, layers, cfg_)

    def no_sampling(*_args):
        raise AssertionError("the sampled corpus should come from the cache")

    monkeypatch.setattr(stats, "_compute", counting)
    monkeypatch.setattr(stats, "_sample_from_model", no_sampling)
    again = stats.key_covariance(load_model(tiny["llama"]), [1, 2], cfg)
    assert calls == [] and all(torch.equal(first[k], again[k]) for k in first)
    stats.key_covariance(loaded, [0, 1], cfg)                                  # layer 0 is new
    assert calls == [(0,)]
    monkeypatch.setattr(stats, "_sample_from_model", real_sample)
    stats.key_covariance(loaded, [1], StatsConfig(n_samples=4, sample_len=8, cache_dir=tmp_path))  # other sample count
    other = load_model(tiny["gpt2"])
    stats.key_covariance(other, [1], cfg)                                      # other model
    assert calls == [(0,), (1,), (1,)]
    assert (tmp_path / loaded.fingerprint[:20] / "self-s0-n4-l8-bfloat16" / "cov_layer1.pt").is_file()
    assert (tmp_path / other.fingerprint[:20] / "self-s0-n8-l8-bfloat16" / "cov_layer1.pt").is_file()

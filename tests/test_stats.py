"""Key statistics: the sampler, the covariance computed while sampling, the caches."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import FAMILIES

from qedit.converters.loading import load_model
from qedit.core import stats
from qedit.core.errors import QeditError
from qedit.core.stats import StatsConfig, draw_tokens


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {family: load_model(path) for family, path in tiny_dirs.items()}


def test_draw_tokens_follows_the_softmax():
    """Empirical frequencies match softmax(logits) over a vocabulary spanning several draw blocks."""
    vocab, rows = 2500, 40_000                  # 2500 = 2 full blocks + a padded one
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(vocab, generator=gen) * 2.0
    logits[:5] += 6.0                           # a few heavy tokens, as in a language model
    logits[2100:2200] = float("-inf")           # impossible tokens in the last (padded) block
    banned = [0, 7, 2499]
    drawn = draw_tokens(logits.expand(rows, vocab), torch.Generator().manual_seed(2), banned + [vocab, 10**6])
    assert drawn.shape == (rows, 1) and drawn.dtype == torch.long
    counts = torch.bincount(drawn[:, 0], minlength=vocab).double()
    assert counts[banned].sum() == 0 and counts[2100:2200].sum() == 0
    allowed = logits.clone()
    allowed[banned] = float("-inf")
    probs = torch.softmax(allowed.double(), -1)
    tv = 0.5 * float((counts / rows - probs).abs().sum())
    assert tv < 0.08, tv                        # sampling noise alone: about 0.05 here
    heavy = counts[1:5] / rows                  # the heavy tokens, each within 4 sigma
    sigma = (probs[1:5] * (1 - probs[1:5]) / rows).sqrt()
    assert ((heavy - probs[1:5]).abs() < 4 * sigma).all(), (heavy, probs[1:5])


def test_draw_tokens_is_seeded():
    logits = torch.randn(8, 3000)
    a = draw_tokens(logits, torch.Generator().manual_seed(0))
    b = draw_tokens(logits, torch.Generator().manual_seed(0))
    c = draw_tokens(logits, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_covariance_while_sampling_matches_a_separate_pass(models, family, tmp_path):
    """Keys summed during KV-cached sampling = keys of one forward pass over the sampled text.

    24 tokens cross the tiny gemma3's sliding window (16), and 3 batches of 4 exercise the batching."""
    loaded = models[family]
    cfg = StatsConfig(n_samples=10, sample_len=24, batch_size=4, cache_dir=tmp_path)
    inline = stats._compute(loaded, [1, 3], cfg)          # nothing cached: samples and sums together
    entry = tmp_path / loaded.fingerprint[:20] / "self-s0-n10-l24-bfloat16"
    assert (entry / "tokens.json").is_file()
    seqs = stats.corpus_tokens(loaded, cfg)
    assert len(seqs) == 10 and all(len(s) == 24 for s in seqs)
    tok = loaded.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert all(s[0] == start for s in seqs) and len({tuple(s) for s in seqs}) == 10
    separate = stats._compute(loaded, [1, 3], cfg)        # text cached: one forward pass over it
    for layer in (1, 3):
        assert inline[layer][1] == separate[layer][1] == 10 * 23
        a, b = inline[layer][0], separate[layer][0]                # float32 rounding of two kernel orders
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_sampling_is_reproducible_and_seeded(models, tmp_path):
    loaded = models["llama"]
    cfg = StatsConfig(n_samples=6, sample_len=12, use_cache=False)
    first = stats._sample_from_model(loaded, cfg)
    assert first == stats._sample_from_model(loaded, cfg)
    assert first != stats._sample_from_model(loaded, StatsConfig(n_samples=6, sample_len=12, seed=1, use_cache=False))


def test_bfloat16_output_layer_keeps_the_logits(models):
    """The sampling head in bfloat16 gives the model's own logits up to bfloat16 rounding."""
    for family in ("gemma3", "gpt2"):
        loaded = models[family]
        ids = torch.tensor([[2, 5, 9, 14, 20, 33]])
        with torch.no_grad():
            want = loaded.model(input_ids=ids).logits[0]                                 # (seq, vocab)
            hidden = loaded.module(loaded.arch.base_model)(input_ids=ids).last_hidden_state[0]
            exact = stats._sampling_head(loaded, torch.float32)(hidden)
            rounded = stats._sampling_head(loaded, torch.bfloat16)(hidden)
        torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-5)
        assert float((rounded - want).abs().max()) < 0.02 * float(want.abs().max())


def test_new_layer_reuses_the_sampled_text(models, tmp_path, monkeypatch):
    loaded = models["gemma3"]
    cfg = StatsConfig(n_samples=4, sample_len=8, cache_dir=tmp_path)
    stats.key_covariance(loaded, [1], cfg)

    def no_sampling(*_args):
        raise AssertionError("the text of a known corpus must come from the cache")

    monkeypatch.setattr(stats, "_sample_from_model", no_sampling)
    cov = stats.key_covariance(loaded, [2], cfg)[2]
    assert cov.shape == (128, 128) and torch.allclose(cov, cov.t())
    assert (tmp_path / loaded.fingerprint[:20] / "self-s0-n4-l8-bfloat16" / "cov_layer2.pt").is_file()


def test_without_cache_nothing_is_written(models, tmp_path):
    loaded = models["qwen2"]
    cfg = StatsConfig(n_samples=4, sample_len=8, cache_dir=tmp_path, use_cache=False)
    cov = stats.key_covariance(loaded, [0, 2], cfg)
    assert set(cov) == {0, 2} and all(c.shape == (128, 128) for c in cov.values())
    assert not any(tmp_path.iterdir())


def test_eigendecomposition_is_cached_and_exact(models, tmp_path, monkeypatch):
    loaded = models["gemma3"]
    cfg = StatsConfig(n_samples=4, sample_len=8, cache_dir=tmp_path)
    cov = stats.key_covariance(loaded, [1], cfg)[1]
    evals, evecs = stats.key_eigh(loaded, [1], cfg)[1]
    # (d, d): V diag(e) V^T reproduces the covariance
    assert torch.allclose(evecs @ torch.diag(evals) @ evecs.t(), cov.double(), atol=1e-5 * float(cov.abs().max()))
    path = tmp_path / loaded.fingerprint[:20] / "self-s0-n4-l8-bfloat16" / "eigh_layer1.pt"
    assert path.is_file()

    def no_eigh(*_args, **_kw):
        raise AssertionError("a cached eigendecomposition must not be recomputed")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    monkeypatch.setattr(stats, "key_covariance", no_eigh)  # a cached decomposition needs no covariance either
    again = stats.key_eigh(loaded, [1], cfg)[1]
    assert torch.equal(again[0], evals) and torch.equal(again[1], evecs)
    monkeypatch.undo()
    path.write_bytes(b"broken")
    fixed = stats.key_eigh(loaded, [1], cfg)[1]
    assert torch.equal(fixed[1], evecs)


def test_broken_token_cache_is_resampled(models, tmp_path):
    loaded = models["llama"]
    cfg = StatsConfig(n_samples=3, sample_len=6, cache_dir=tmp_path)
    path = tmp_path / loaded.fingerprint[:20] / "self-s0-n3-l6-bfloat16" / "tokens.json"
    path.parent.mkdir(parents=True)
    path.write_text("[[1, 2")
    seqs = stats.corpus_tokens(loaded, cfg)
    assert len(seqs) == 3 and stats.corpus_tokens(loaded, cfg) == seqs


def test_corpus_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the city of Paris is in France. " * 50)
    cfg = StatsConfig(corpus=corpus)
    hashed = []
    real = stats.hashlib.sha256

    def counting(*args):
        hashed.append(1)
        return real(*args)

    monkeypatch.setattr(stats.hashlib, "sha256", counting)
    key = stats._corpus_key(cfg)
    assert key.startswith("file-") and key.endswith("-n64-l64")
    assert stats._corpus_key(cfg) == key and len(hashed) == 1
    corpus.write_text("a different text, of a different length " * 50)
    os.utime(corpus, ns=(1, 1))                 # and a different mtime
    changed = stats._corpus_key(cfg)
    assert changed != key and len(hashed) == 2
    assert "_digest_memo" not in dataclasses.asdict(cfg)    # the memo is not part of the config


def test_config_checks():
    with pytest.raises(ValueError, match="sampling_precision"):
        StatsConfig(sampling_precision="fp8")
    with pytest.raises(QeditError, match="corpus file not found"):
        StatsConfig(corpus="/nonexistent/corpus.txt")
    assert stats.resolve_sampling_dtype(StatsConfig(sampling_precision="float32")) is torch.float32
    assert stats.resolve_sampling_dtype(StatsConfig(sampling_precision="bfloat16")) is torch.bfloat16


def test_sampling_precision_is_fixed_and_keyed(monkeypatch):
    """The default does not depend on the CPU (it once did, and edits differed between machines),
    and a corpus drawn at one precision is never reused for another."""
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native, raising=False)
        assert stats.resolve_sampling_dtype(StatsConfig()) is torch.bfloat16
    assert stats._corpus_key(StatsConfig()) != stats._corpus_key(StatsConfig(sampling_precision="float32"))

"""What the memory budget counts for an edit (`qedit.core.memory.Workload`, `qedit.pipeline.budget`), and the
changes that let it count less: MEMIT reads each layer's covariance back from the statistics cache at its
solve, which gives the deltas of the covariances held in memory bit for bit; a backward pass keeps activations
only from the lowest edited layer; each method's solve copies and held statistics come from its registration."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import FACTS

from qedit.converters.loading import load_model
from qedit.core.facts import request_from_dict
from qedit.core.memory import Shape, Workload
from qedit.core.stats import StatsConfig
from qedit.edit.compute import compute_edits
from qedit.edit.registry import EDIT_METHODS, TargetConfig
from qedit.pipeline.jobs import make_config
from qedit.unlearn.registry import UNLEARN_METHODS

# Llama-3.1-8B's shape: the sizes at which the terms differ by gigabytes
SHAPE_8B = Shape(d_model=4096, d_ff=14336, n_layers=32, vocab=128256, n_heads=32, n_kv_heads=8, head_dim=128,
                 context=131072)


def test_memit_reads_each_covariance_back_from_the_cache_with_the_same_bits(tiny_dirs, monkeypatch, tmp_path) -> None:
    """With the statistics cache on, MEMIT's spread holds one layer's covariance at a time (read back from the
    cache); its deltas equal those of the same edit with the cache off (every covariance in memory)."""
    monkeypatch.setenv("QEDIT_CACHE", str(tmp_path / "cache"))
    loaded = load_model(tiny_dirs["llama"])
    requests = [request_from_dict(f) for f in FACTS[:2]]
    target = TargetConfig(steps=5)
    deltas = {}
    for use_cache in (False, True, True):   # the second cached run reads every covariance from the cache
        stats = StatsConfig(n_samples=16, sample_len=16, use_cache=use_cache)
        cfg = make_config("memit", stats=stats, target=target, layers=(0, 1), target_margin=None)
        out = compute_edits(loaded, requests, "memit", cfg)
        deltas.setdefault(use_cache, []).append([(d.a.clone(), d.b.clone()) for d in out.deltas])
    (cold,) = deltas[False]
    for run in deltas[True]:
        assert len(run) == len(cold) == 2
        for (a, b), (a0, b0) in zip(run, cold):
            assert torch.equal(a, a0) and torch.equal(b, b0)


def test_the_workload_counts_the_method_and_its_layers() -> None:
    base = Workload(rows=12, tokens=40, stats_layers=4, edited=4)
    # a backward pass from layer 8 keeps 24 layers' activations, not 32
    assert dataclasses.replace(base, first_layer=8).passes(SHAPE_8B) < base.passes(SHAPE_8B)
    assert dataclasses.replace(base, backward=False).passes(SHAPE_8B) < base.passes(SHAPE_8B)
    # covariances read back one at a time: nothing held per layer, one covariance beside the solve
    lazy = dataclasses.replace(base, stats_held=0)
    ff2 = SHAPE_8B.d_ff ** 2
    assert base.held(SHAPE_8B) - lazy.held(SHAPE_8B) == 4 * 4 * ff2
    assert lazy.solve(SHAPE_8B) >= 8 * 2 * ff2 + 4 * ff2
    # the statistics' sums of every layer are counted while they are computed
    assert lazy.bytes(SHAPE_8B) >= lazy.held(SHAPE_8B) + 4 * 4 * ff2
    # more solve copies, more bytes
    assert dataclasses.replace(base, solve_copies=6).bytes(SHAPE_8B) > base.bytes(SHAPE_8B)


@pytest.mark.parametrize(("registry", "name", "copies", "held"), [
    (EDIT_METHODS, "memit", 2, 0), (EDIT_METHODS, "rome", 2, 4), (EDIT_METHODS, "alphaedit", 6, 8),
    (UNLEARN_METHODS, "kforget", 4, 8)])
def test_methods_register_what_their_solves_hold(registry, name, copies, held) -> None:
    spec = registry.get(name)
    assert (spec.solve_copies, spec.stats_held) == (copies, held)


def test_freed_memory_is_returned_to_the_os() -> None:
    """On glibc (this machine's libc) the threshold is set; freeing a 64 MiB tensor then lowers RSS. In a child
    process: the setting lasts for the process's lifetime."""
    code = ("import torch; from qedit.core.memory import current_rss, return_freed_memory\n"
            "assert return_freed_memory()\n"
            "big = torch.ones(64 << 18); held = current_rss(); del big\n"
            "print(held - current_rss())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) > 48 << 20


def test_without_repacking_turns_off_llama_cpps_weight_copies_while_a_model_loads() -> None:
    """The statistics sampler loads the file inside `without_repacking`: llama.cpp then reads every weight from
    the map (the file's size is what the budget counts for it) instead of copying most of it into memory."""
    low = pytest.importorskip("llama_cpp.llama_cpp")
    from qedit.runtimes.llama import without_repacking

    assert low.llama_model_default_params().use_extra_bufts
    with without_repacking():
        assert not low.llama_model_default_params().use_extra_bufts
    assert low.llama_model_default_params().use_extra_bufts

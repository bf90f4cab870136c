"""The cache under $QEDIT_CACHE: entries labelled per model, listed with size and last use, cleared on demand,
kept under QEDIT_CACHE_MAX by evicting the least recently used, and consistent when qedit runs twice at once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_survival_equals_edit import _tensor_bytes, tiny_gguf  # noqa: F401  (tiny_gguf: a fixture)

from qedit.cli import main
from qedit.cli.cache import evict_after_run, model_lines
from qedit.converters.loading import load_model
from qedit.core import cache, stats
from qedit.core.errors import QeditError
from qedit.core.stats import StatsConfig
from qedit.edit.registry import TargetConfig
from qedit.edit.target_cache import TargetCache

SETTINGS = ["--method", "rome", "--layers", "1", "--stats-samples", "48", "--no-verify"]
WEEK = 7 * 86400


@pytest.fixture()
def root(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("QEDIT_CACHE", str(path))
    monkeypatch.delenv("QEDIT_CACHE_MAX", raising=False)
    return path


def _fake(root: Path, key: str, name: str, size: int, age: float, label: str = "m.gguf") -> Path:
    """An entry of `size` bytes last used `age` seconds ago."""
    entry = root / key / name
    entry.mkdir(parents=True)
    (root / key / cache.MODEL_FILE).write_text(json.dumps({"label": label, "source": f"/x/{label}", "sha256": key}))
    (entry / "data.pt").write_bytes(b"x" * size)
    (entry / cache.LAST_USE).touch()
    when = time.time() - age
    os.utime(entry / cache.LAST_USE, (when, when))
    return entry


def test_sizes_and_ages_parse():
    assert cache.parse_size("500M") == 500 * 10**6 and cache.parse_size("5G") == cache.parse_size("5GB") == 5 * 10**9
    assert cache.parse_size("5GiB") == 5 * 2**30 and cache.parse_size("1024") == 1024
    assert cache.parse_age("7d") == WEEK and cache.parse_age("12h") == 12 * 3600
    for bad in ("5X", "", "G5"):
        with pytest.raises(QeditError, match="not a size"):
            cache.parse_size(bad)
    with pytest.raises(QeditError, match="not an age"):
        cache.parse_age("soon")


def test_entries_are_labelled_listed_and_marked_when_read(tiny_dirs, root, capsys):
    loaded = load_model(tiny_dirs["llama"])
    cfg = StatsConfig(n_samples=4, sample_len=8)
    stats.key_covariance(loaded, [1], cfg)
    targets = TargetCache(root / loaded.fingerprint[:20] / "targets", loaded, "site", [""], TargetConfig())
    targets.put([], torch.zeros(0, 4), [])
    model_dir = root / loaded.fingerprint[:20]
    assert json.loads((model_dir / cache.MODEL_FILE).read_text())["label"] == "llama"   # the source's name
    listed = cache.entries(root)
    assert [(e.label, e.kind) for e in listed] == [("llama", "statistics"), ("llama", "targets")]
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(root) in out and "llama" in out and "statistics" in out and "targets" in out and "just now" in out
    assert "statistics" in model_lines(root, loaded.fingerprint)[0]
    cache.release(root)                        # what a run does at its end: markers folded into .last-use
    old = time.time() - WEEK
    for marker in model_dir.rglob(cache.LAST_USE):
        os.utime(marker, (old, old))
    assert all(e.last_use < time.time() - WEEK + 60 for e in cache.entries(root))
    stats.key_covariance(loaded, [1], cfg)     # a read marks the statistics' use, and only theirs
    used = {e.kind: e.last_use for e in cache.entries(root)}
    assert used["statistics"] > time.time() - 60 and used["targets"] < time.time() - WEEK + 60


def test_clear_removes_what_it_is_asked_to_and_says_so(root, capsys):
    _fake(root, "a" * 20, "self-s0", 3000, 10 * 86400, "old.gguf")
    _fake(root, "a" * 20, "targets", 1000, 60, "old.gguf")
    _fake(root, "b" * 20, "self-s0", 2000, 60, "new.gguf")
    _fake(root, "b" * 20, "survival-artifacts", 500, 60, "new.gguf")
    (root / "mine").mkdir()                    # not qedit's: never listed, never removed
    assert main(["cache", "clear", "--older-than", "7d"]) == 0
    out = capsys.readouterr().out
    assert "removing old.gguf statistics (self-s0): 3.0 kB" in out and "removed 1 of 4 entries" in out, out
    assert "3.0 kB freed" in out and (root / ("a" * 20) / "targets").is_dir()
    assert main(["cache", "clear", "--kind", "survival-artifacts"]) == 0
    out = capsys.readouterr().out
    assert "removing new.gguf survival artifacts: 500 B" in out and "removed 1 of 3 entries" in out, out
    assert main(["cache", "clear", "--model", "new.gguf"]) == 0
    assert not (root / ("b" * 20)).exists() and "2.0 kB freed" in capsys.readouterr().out   # with its label
    assert main(["cache", "clear", "--model", "other.gguf"]) == 2
    assert "nothing is cached for it; cached models: old.gguf" in capsys.readouterr().err
    assert main(["cache", "clear"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["mine"]


def test_eviction_keeps_the_cap_least_recently_used_first(root, monkeypatch, capsys):
    old = _fake(root, "a" * 20, "self-s0", 1_000_000, 3 * 86400)
    busy = _fake(root, "b" * 20, "self-s0", 1_000_000, 5 * 86400)
    mid = _fake(root, "c" * 20, "targets", 1_000_000, 2 * 86400)
    new = _fake(root, "d" * 20, "self-s0", 1_000_000, 60)
    (busy / f"{cache.USE_PREFIX}{os.getppid()}").touch()          # in use by another live process
    os.utime(busy / f"{cache.USE_PREFIX}{os.getppid()}", (time.time() - 5 * 86400,) * 2)
    monkeypatch.setenv("QEDIT_CACHE_MAX", "bad")
    evict_after_run()
    assert "QEDIT_CACHE_MAX='bad'" in capsys.readouterr().out and old.exists()
    monkeypatch.setenv("QEDIT_CACHE_MAX", "2.5MB")
    evict_after_run()
    out = capsys.readouterr().out
    assert not old.exists() and not mid.exists() and busy.exists() and new.exists()
    assert "evicted the least recently used" in out and "2.0 MB freed" in out, out
    monkeypatch.setenv("QEDIT_CACHE_MAX", "0")
    evict_after_run()
    assert busy.exists() and not new.exists() and "in use by other qedit processes were kept" in capsys.readouterr().out


def test_first_writer_wins_and_a_damaged_file_is_replaced(tmp_path):
    entry = cache.CacheEntry(tmp_path / "e")
    read = Path.read_text
    assert entry.publish("f", lambda p: p.write_text("first"), read) is None
    assert entry.publish("f", lambda p: p.write_text("second"), read) == "first"   # another run's stands

    def strict(path: Path) -> str:
        text = path.read_text()
        if text != "ok":
            raise ValueError("damaged")
        return text

    assert entry.publish("f", lambda p: p.write_text("ok"), strict) is None
    assert (tmp_path / "e" / "f").read_text() == "ok"
    assert sorted(p.name for p in (tmp_path / "e").iterdir() if not p.name.startswith(cache.USE_PREFIX)) == ["f"]


def test_a_covariance_another_run_stored_first_is_the_one_used(tiny_dirs, tmp_path, monkeypatch):
    loaded = load_model(tiny_dirs["qwen2"])
    cfg = StatsConfig(n_samples=4, sample_len=8, cache_dir=tmp_path)
    theirs = torch.eye(128)
    real = stats._compute

    def racing(loaded_, layers, cfg_):
        mine = real(loaded_, layers, cfg_)
        entry = stats._entry(loaded_, cfg_)                # meanwhile, another process stored its statistics
        (entry.path / "cov_layer1.pt").unlink()
        torch.save({"cov": theirs, "count": 1}, entry.path / "cov_layer1.pt")
        return mine

    monkeypatch.setattr(stats, "_compute", racing)
    assert torch.equal(stats.key_covariance(loaded, [1], cfg)[1], theirs)


def test_a_sampled_corpus_is_stored_after_its_statistics(tiny_dirs, tmp_path, monkeypatch):
    """A run that finds the text cached finds the statistics sampled with it too, and never computes them again
    in another kernel order (which would differ in the last bits)."""
    loaded = load_model(tiny_dirs["gemma3"])
    cfg = StatsConfig(n_samples=4, sample_len=8, cache_dir=tmp_path)
    real, seen = stats._store_tokens, []

    def store(loaded_, cfg_, seqs):
        seen.append(sorted(p.name for p in stats._entry(loaded_, cfg_).path.glob("cov_layer*.pt")))
        return real(loaded_, cfg_, seqs)

    monkeypatch.setattr(stats, "_store_tokens", store)
    stats.key_covariance(loaded, [1, 2], cfg)
    assert seen == [["cov_layer1.pt", "cov_layer2.pt"]]


def _cached_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_two_cold_runs_at_once_leave_the_cache_a_single_run_leaves(tiny_gguf, tmp_path, monkeypatch, capsys):  # noqa: F811
    src, facts = tiny_gguf
    env = {**os.environ, "QEDIT_CACHE": str(tmp_path / "shared"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    outs = [tmp_path / f"out{i}" / "e.gguf" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "qedit", "-v", "edit", str(src), str(facts), "-o", str(out),
                               *SETTINGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for out in outs]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert all("computing key statistics" in log for log in logs)        # both started cold
    monkeypatch.setenv("QEDIT_CACHE", str(tmp_path / "single"))
    single = tmp_path / "single-out" / "e.gguf"
    assert main(["edit", str(src), str(facts), "-o", str(single), *SETTINGS]) == 0
    capsys.readouterr()
    shared, alone = _cached_files(tmp_path / "shared"), _cached_files(tmp_path / "single")
    assert sorted(shared) == sorted(alone) and any(name.endswith("cov_layer1.pt") for name in alone)
    for name, path in alone.items():
        if path.suffix == ".pt":
            a, b = torch.load(path, weights_only=True), torch.load(shared[name], weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a), name
        else:
            assert path.read_bytes() == shared[name].read_bytes(), name
    assert _tensor_bytes(outs[0]) == _tensor_bytes(outs[1]) == _tensor_bytes(single)

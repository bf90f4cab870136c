"""Devices, without a GPU: qedit's code creates no tensor on torch's default device (run with the default device
set to `meta` for every tensor qedit's own code creates, every edit method gives the deltas it gives without: a
tensor made without `device=` would land on meta and fail, or index garbage, when it meets the model's; tensors
transformers creates are left alone, as it moves them itself), `--device-map auto` on this machine's one device
equals `--device cpu`, and a device map is refused for a model streamed from its file. The CUDA tests at the end
(an end-to-end `qedit edit --device cuda`, statistics, targets and solves against the CPU's, and layers spread
over two GPUs) are skipped unless CUDA is available."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import FACTS
from test_methods_tiny import method_config
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import qedit
from qedit.cli import main
from qedit.converters.loading import load_model, spread
from qedit.core import linalg
from qedit.core.delta import DELTAS_FILE, load_deltas
from qedit.core.errors import QeditError
from qedit.core.facts import request_from_dict
from qedit.core.memory import MemoryBudget
from qedit.core.model import LoadedModel
from qedit.core.stats import StatsConfig, key_covariance
from qedit.edit.compute import EditOutcome, compute_edits
from qedit.edit.registry import TargetConfig
from qedit.edit.targets import optimize_targets
from qedit.evaluation.metrics import evaluate
from qedit.runtimes.torch_runner import TorchRunner
from qedit.unlearn.registry import UNLEARN_METHODS
from qedit.unlearn.requests import ForgetRequest

# no cache: the statistics' text is sampled, the covariances summed and the targets optimised in every run
STATS = StatsConfig(n_samples=16, sample_len=16, use_cache=False)
EDITS = [request_from_dict(f) for f in FACTS[:2]]
FORGETS = [ForgetRequest(prompt=r.prompt, subject=r.subject, answer=r.ground_truth) for r in EDITS]
FAST = ["--stats-samples", "16", "--set", "target.steps=5"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available (no GPU here)")
QEDIT = str(Path(qedit.__file__).parent)


class QeditDefaultsToMeta(TorchFunctionMode):
    """torch.set_default_device("meta"), for the tensors qedit's own code creates (a factory call without a device
    made in a qedit module): transformers makes some on the default device and moves them itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and \
                sys._getframe(1).f_code.co_filename.startswith(QEDIT):
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def q4(tiny_dirs, facts_file, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny llama as a Q4_K_M GGUF file, and the facts."""
    from conftest import make_tokenizer
    from test_gguf_export import _tokenizer_template

    from qedit.converters.gguf.export import export_gguf

    root = tmp_path_factory.mktemp("devices")
    tok = make_tokenizer()
    template = _tokenizer_template(root / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    export_gguf(tiny_dirs["llama"], root / "llama.Q4_K_M.gguf", "Q4_K_M", template=template)
    return root / "llama.Q4_K_M.gguf", facts_file


def _outcome(loaded: LoadedModel, method: str, **settings) -> EditOutcome:
    if method in UNLEARN_METHODS:
        cfg = UNLEARN_METHODS.make_config(method, stats=STATS, **settings)
        return compute_edits(loaded, FORGETS, method, cfg, registry=UNLEARN_METHODS)
    family = loaded.model.config.model_type
    return compute_edits(loaded, EDITS, method, method_config(method, family, stats=STATS, **settings))


def _same(a: EditOutcome, b: EditOutcome) -> bool:
    return len(a.deltas) == len(b.deltas) and all(
        x.name == y.name and x.scale == y.scale and torch.equal(x.a, y.a) and torch.equal(x.b, y.b)
        for x, y in zip(a.deltas, b.deltas))


# (family, method, settings): every method, MEMIT on gemma3 for the post-MLP norm's Jacobian, FT with both retain
# terms and the normalized optimizer, qforget with each saliency and subspace (its Q4_0 view: the requantizer)
CASES = [
    ("llama", "rome", {}),
    ("llama", "memit", {}),
    ("gemma3", "memit", {}),
    ("llama", "alphaedit", {}),
    ("llama", "ft", dict(steps=4, key_weight=1.0, retain_weight=0.1, optimizer="normalized")),
    ("llama", "kforget", {}),
    ("llama", "qforget", dict(steps=3, polish=1, rounds=1, saliency="gradient")),
    ("llama", "qforget", dict(steps=3, polish=1, rounds=1, subspace="keys")),
    ("llama", "npo", dict(steps=3)),
]


@pytest.mark.parametrize("family, method, settings", CASES, ids=[f"{f}-{m}-{i}" for i, (f, m, _) in enumerate(CASES)])
def test_no_tensor_of_an_edit_lands_on_the_default_device(tiny, family, method, settings):
    loaded = load_model(tiny[family])
    expected = _outcome(loaded, method, **settings)
    with QeditDefaultsToMeta():
        got = _outcome(loaded, method, **settings)
    assert _same(expected, got)
    assert all(d.a.device.type == "cpu" for d in got.deltas)


def test_no_tensor_of_an_evaluation_lands_on_the_default_device(tiny):
    runner = TorchRunner(load_model(tiny["llama"]))
    expected = evaluate(runner, EDITS)
    nll = runner.nll("The sun is in the sky")
    with QeditDefaultsToMeta():
        got = evaluate(runner, EDITS)   # teacher-forced scores and greedy generation
        assert runner.nll("The sun is in the sky") == nll
    assert got.aggregate() == expected.aggregate()


def test_a_streamed_model_decodes_onto_its_device(q4):
    """Streamed weights (placeholders, decoded matrices, embedding rows, LM head chunks) land on the model's
    device, not the default one."""
    loaded = load_model(q4[0], max_memory=MemoryBudget(0, stream=True, cache_limit=0))
    assert loaded.streamer is not None
    expected = _outcome(loaded, "rome")
    with QeditDefaultsToMeta():
        got = _outcome(loaded, "rome")
    assert _same(expected, got)


def test_float64_runs_where_the_device_has_it():
    assert linalg.float64_device("mps") == torch.device("cpu")
    assert linalg.float64_device("cuda:1") == torch.device("cuda:1")
    assert linalg.float64_device("meta") == torch.device("meta")
    t = torch.ones(2, 2, device="meta")
    assert linalg.wide(t).device.type == "meta" and linalg.wide(t).dtype == torch.float64
    assert linalg.wide(torch.ones(2), "meta").device.type == "meta"


# ---- --device-map auto on this machine (one device: the CPU) -------------------------------------------------


def test_device_map_auto_equals_the_cpu(tiny):
    plain = load_model(tiny["llama"])
    mapped = load_model(tiny["llama"], device_map="auto")
    assert set(mapped.model.hf_device_map.values()) == {"cpu"} and mapped.device == torch.device("cpu")
    assert mapped.layer_device(0) == torch.device("cpu")
    assert _same(_outcome(plain, "memit"), _outcome(mapped, "memit"))


def test_cli_device_map_auto_equals_device_cpu(tiny, facts_file, tmp_path):
    outs = {}
    for name, flags in (("cpu", ["--device", "cpu"]), ("auto", ["--device-map", "auto"])):
        outs[name] = tmp_path / name
        assert main(["edit", str(tiny["llama"]), str(facts_file), "-o", str(outs[name]), "--method", "memit",
                     *FAST, *flags]) == 0
    (a, _), (b, _) = load_deltas(outs["cpu"]), load_deltas(outs["auto"])
    assert len(a) == len(b) and all(torch.equal(x.a, y.a) and torch.equal(x.b, y.b) for x, y in zip(a, b))
    assert (outs["cpu"] / DELTAS_FILE).read_bytes() == (outs["auto"] / DELTAS_FILE).read_bytes()
    metrics = {}
    for name, flags in (("cpu", []), ("auto", ["--device-map", "auto"])):
        metrics[name] = tmp_path / f"{name}.json"
        assert main(["eval", str(outs["cpu"]), str(facts_file), "--json", str(metrics[name]), *flags]) == 0
    assert json.loads(metrics["cpu"].read_text()) == json.loads(metrics["auto"].read_text())


def test_cli_device_map_with_a_device_is_refused(tiny, facts_file, tmp_path, capsys):
    out = tmp_path / "out"
    for command in (["edit", "-o", str(out)], ["forget", "-o", str(out), "--method", "kforget"], ["eval"]):
        argv = [command[0], str(tiny["llama"]), str(facts_file), *command[1:], "--device", "cuda", "--device-map", "auto"]
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "--device-map auto places the model's layers itself" in err[0]
    assert not out.exists()


def test_device_map_refuses_a_streamed_model(q4):
    with pytest.raises(QeditError, match="--device-map auto spreads a model held whole"):
        load_model(q4[0], max_memory=MemoryBudget(0, stream=True), device_map="auto")
    streamed = load_model(q4[0], max_memory=MemoryBudget(0, stream=True))
    with pytest.raises(QeditError, match="cannot spread a model streamed layer by layer"):
        spread(streamed)


# ---- CUDA (skipped without a GPU) ----------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Statistics text from a file: the same tokens on every device (sampled text follows the logits)."""
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(["the city of Paris is in France and the river is blue ."] * 40))
    return path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@needs_cuda
def test_cuda_statistics_targets_and_solve_match_the_cpu(tiny, corpus):
    stats = StatsConfig(n_samples=16, sample_len=16, corpus=corpus, use_cache=False)
    cpu, gpu = load_model(tiny["llama"]), load_model(tiny["llama"], device="cuda")
    assert gpu.device.type == "cuda" and gpu.layer_device(1).type == "cuda"
    cov_c, cov_g = key_covariance(cpu, [1], stats)[1], key_covariance(gpu, [1], stats)[1]
    assert cov_g.device.type == "cuda" and _rel(cov_g, cov_c) < 1e-5
    site = cpu.arch.mlp_out.format(1)
    target = TargetConfig(steps=5, stop_nll=0.0)   # a fixed number of steps on both
    t_c, _ = optimize_targets(cpu, EDITS, site, [""], target)
    t_g, _ = optimize_targets(gpu, EDITS, site, [""], target)
    assert t_g.device.type == "cuda" and _rel(t_g, t_c) < 1e-3
    cfg = method_config("memit", "llama", stats=stats, target=target, target_margin=None)
    d_c = compute_edits(cpu, EDITS, "memit", cfg).deltas
    d_g = compute_edits(gpu, EDITS, "memit", cfg).deltas
    for x, y in zip(d_c, d_g):
        assert y.a.device.type == "cuda" and _rel(y.dense(), x.dense()) < 1e-3
    with torch.no_grad():   # a keys-sized solve: float64 on the GPU
        k = torch.randn(3, 64, dtype=torch.float64)
        r = torch.randn(3, 32, dtype=torch.float64)
        c = torch.eye(64, dtype=torch.float64)
        assert _rel(linalg.batch_update(k.cuda(), r.cuda(), c), linalg.batch_update(k, r, c)) < 1e-10


@needs_cuda
def test_cuda_edit_end_to_end(q4, corpus, tmp_path):
    """`qedit edit tiny.gguf facts.jsonl -o out.gguf --device cuda` (load, statistics, targets, solve, patch) patches
    the file as the CPU does, within float tolerance (the recorded edit keys)."""
    from qedit.converters.gguf.keys import stored_edit_keys

    model, facts = q4
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / f"{device}.gguf"
        assert main(["edit", str(model), str(facts), "-o", str(outs[device]), "--method", "memit",
                     "--no-verify", "--device", device, "--corpus", str(corpus), "--set", "stats.use_cache=false",
                     *FAST]) == 0
    keys_c, keys_g = stored_edit_keys(outs["cpu"]), stored_edit_keys(outs["cuda"])
    assert keys_c.keys() == keys_g.keys() and all(_rel(keys_g[k], keys_c[k]) < 1e-4 for k in keys_c)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layers_on_two_gpus_edit_as_the_cpu(tiny, corpus):
    """Half the decoder layers (the embedding with them) on cuda:0, the rest and the head on cuda:1: hooks find
    each module's device, keys move to where the solves run, deltas go to their weights' devices."""
    import dataclasses

    from accelerate import dispatch_model

    stats = StatsConfig(n_samples=16, sample_len=16, corpus=corpus, use_cache=False)
    cpu, split = load_model(tiny["llama"]), load_model(tiny["llama"])
    n = split.n_layers
    placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
                 **{f"model.layers.{i}": 0 if i < n // 2 else 1 for i in range(n)}}
    dispatch_model(split.model, placement)
    split = dataclasses.replace(split, device=split.model.get_input_embeddings().weight.device)
    assert {split.layer_device(i).index for i in range(n)} == {0, 1}
    target = TargetConfig(steps=5, stop_nll=0.0)
    cfg = method_config("memit", "llama", stats=stats, target=target, target_margin=None, layers=tuple(range(n)))
    outcome_c, outcome_s = compute_edits(cpu, EDITS, "memit", cfg), compute_edits(split, EDITS, "memit", cfg)
    for x, y in zip(outcome_c.deltas, outcome_s.deltas):
        assert y.a.device == split.layer_device(y.layer) and _rel(y.dense(), x.dense()) < 1e-3
    runner = TorchRunner(split)
    assert evaluate(runner, EDITS).aggregate()["n_cases"] == len(EDITS)

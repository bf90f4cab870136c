"""The memory budget: a GGUF model streamed layer by layer from its file gives the edits the model held whole in
float32 gives (the golden test: ROME and MEMIT, key statistics and target optimisation included, and the patched
file), the pieces of streaming (chunked LM head, backward re-decoding, pins), and the budget's refusals (a budget
too small for the model, a fact longer than the model's context)."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from qedit.cli import main
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.rows import TensorReader
from qedit.converters.loading import load_model
from qedit.core.delta import LowRankDelta, applied
from qedit.core.errors import QeditError
from qedit.core.facts import load_requests
from qedit.core.linalg import chunked_linear
from qedit.core.memory import MemoryBudget, parse_size
from qedit.core.stats import StatsConfig
from qedit.core.streaming import _ChunkedLinear
from qedit.pipeline.jobs import EditJob, MethodChoice, Output, make_config
from qedit.pipeline.run import run_edit

IDS = torch.tensor([[2, 10, 20, 30, 40, 50, 60]])
# streamed with no cache at all, and with a cache that holds a few matrices (the cache path)
STREAMED = {"no-cache": MemoryBudget(0, stream=True, cache_limit=0),
            "cache": MemoryBudget(0, stream=True, cache_limit=60_000)}


@pytest.fixture(scope="module")
def tiny_q4(tiny_dirs, tmp_path_factory):
    """The tiny llama and gemma3 models as Q4_K_M GGUF files, and the facts."""
    from conftest import FACTS, make_tokenizer
    from test_gguf_export import _tokenizer_template

    from qedit.converters.gguf.export import export_gguf

    root = tmp_path_factory.mktemp("streamed")
    tok = make_tokenizer()
    template = _tokenizer_template(root / "vocab.gguf", tok.convert_ids_to_tokens(list(range(len(tok)))))
    files = {}
    for family in ("llama", "gemma3"):
        files[family] = root / f"{family}.Q4_K_M.gguf"
        export_gguf(tiny_dirs[family], files[family], "Q4_K_M", template=template)
    facts = root / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return files, facts


def _steer(loaded, x):
    """A forward pass with `x` added to layer 0's MLP output: logits at the last position, and d logp / d x."""
    handle = loaded.model.get_submodule("model.layers.0.mlp.down_proj").register_forward_hook(lambda m, a, out: out + x)
    try:
        logits = loaded.model(input_ids=IDS).logits[0, -1]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.log_softmax(-1)[7], x)
    return logits.detach(), grad


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_streamed_forward_and_backward_equal_the_whole_model(tiny_q4, family):
    files, _ = tiny_q4
    whole = load_model(files[family])
    streamed = load_model(files[family], max_memory=STREAMED["no-cache"])
    assert whole.streamer is None and streamed.streamer is not None
    assert streamed.model.device.type == "cpu"           # the embedding's stand-in answers the device
    assert all(p.is_meta for n, p in streamed.model.named_parameters() if n.endswith("down_proj.weight"))
    x = torch.zeros(1, whole.model.config.hidden_size, requires_grad=True)
    logits_w, grad_w = _steer(whole, x)
    before = streamed.streamer.decoded
    logits_s, grad_s = _steer(streamed, x)
    assert torch.equal(logits_w, logits_s) and torch.equal(grad_w, grad_s)
    n_matrices = sum(1 for n in streamed.streamer.slots if ".layers." in n)
    # the backward pass decoded the matrices above the steered site again instead of keeping them
    assert streamed.streamer.decoded > before + n_matrices


@pytest.mark.parametrize("setting", list(STREAMED))
@pytest.mark.parametrize("method,layers", [("rome", (1,)), ("memit", (1, 2))])
def test_golden_streamed_edits_equal_the_edits_of_the_whole_model(tiny_q4, tmp_path, monkeypatch, method, layers,
                                                                  setting):
    """Key statistics (sampled in torch), target optimisation (backward through the streamed layers), keys and the
    solve: the deltas are the same to the bit, and so is the patched file."""
    files, facts = tiny_q4
    monkeypatch.setenv("QEDIT_CACHE", str(tmp_path / "cache"))   # nothing shared between the two runs
    requests = load_requests(facts)
    cfg = make_config(method, layers=layers, stats=StatsConfig(n_samples=16, use_cache=False))
    runs = {}
    for name, budget in (("whole", None), (setting, STREAMED[setting])):
        job = EditJob(files["llama"], requests, MethodChoice(method, cfg), Output(tmp_path / f"{name}.gguf", verify=False),
                      max_memory=budget)
        runs[name] = run_edit(job, notify=lambda line: None)
    whole, streamed = runs["whole"].outcome, runs[setting].outcome
    assert len(whole.deltas) == len(streamed.deltas)
    for a, b in zip(whole.deltas, streamed.deltas):
        assert a.name == b.name and torch.equal(a.dense(), b.dense())   # tolerance 0: the same bits
    for layer in whole.keys:
        assert torch.equal(whole.keys[layer], streamed.keys[layer])
    with GGUFFile(tmp_path / "whole.gguf") as gw, GGUFFile(tmp_path / f"{setting}.gguf") as gs:
        assert {n: gw.raw(n).tobytes() for n in gw.tensors} == {n: gs.raw(n).tobytes() for n in gs.tensors}


def test_chunked_lm_head_equals_one_product_forward_and_backward():
    torch.manual_seed(0)
    weight, hidden = torch.randn(300, 16), torch.randn(2, 5, 16, requires_grad=True)
    read = lambda lo, hi: weight[lo:hi]  # noqa: E731
    out = _ChunkedLinear.apply(hidden, read, 300, 64)                     # five chunks, the last one short
    ref = torch.nn.functional.linear(hidden, weight)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(ref)
    (g_out,) = torch.autograd.grad(out, hidden, grad)
    (g_ref,) = torch.autograd.grad(ref, hidden, grad)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-5)
    bf16 = chunked_linear(hidden.detach(), read, 300, 64, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (2, 5, 300)


def test_applied_pins_a_streamed_weight_and_drops_it_after(tiny_q4):
    files, _ = tiny_q4
    whole = load_model(files["llama"])
    streamed = load_model(files["llama"], max_memory=STREAMED["no-cache"])
    name = "model.layers.1.mlp.down_proj.weight"
    out_dim, in_dim = streamed.edit_shape(1)
    delta = LowRankDelta(name, 1, torch.ones(out_dim, 1) * 0.1, torch.ones(1, in_dim))
    with torch.no_grad():
        with applied(whole.model, [delta]):
            edited_w = whole.model(input_ids=IDS).logits
        with applied(streamed.model, [delta]):
            assert name in streamed.streamer.pins
            edited_s = streamed.model(input_ids=IDS).logits
        assert name not in streamed.streamer.pins
        assert torch.equal(edited_w, edited_s)
        assert torch.equal(whole.model(input_ids=IDS).logits, streamed.model(input_ids=IDS).logits)
    # edit_weight pins the stored value, in math orientation
    assert torch.equal(streamed.edit_weight(1), whole.edit_weight(1)) and name in streamed.streamer.pins


def test_rows_read_by_pread_equal_the_decoded_tensor(tiny_q4):
    files, _ = tiny_q4
    with GGUFFile(files["llama"]) as gf:
        reader = TensorReader(gf)
        for name in ("token_embd.weight", "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"):
            full = gf.dequantize(name)
            assert np.array_equal(reader.tensor(name), full)
            if full.ndim == 2:
                assert np.array_equal(reader.rows(name, 3, 9), full[3:9])
                assert np.array_equal(reader.row_ids(name, [0, 1, 5, 7, 8]), full[[0, 1, 5, 7, 8]])
        assert b"".join(bytes(c) for c in reader.chunks("blk.1.ffn_down.weight", 1000)) == \
            gf.raw("blk.1.ffn_down.weight").tobytes()
        reader.close()


@pytest.mark.parametrize("text,size", [("10GiB", 10 << 30), ("1.5GB", 1_500_000_000), ("512MiB", 512 << 20),
                                       ("2g", 2_000_000_000), ("4096", 4096)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "10XB", "-1GB", "0"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(QeditError, match="memory size"):
        parse_size(text)


def test_a_budget_too_small_is_one_line_naming_the_shortfall_and_writes_nothing(tiny_q4, tmp_path, capsys):
    files, facts = tiny_q4
    out = tmp_path / "out.gguf"
    argv = ["edit", str(files["llama"]), str(facts), "-o", str(out), "--method", "rome", "--layers", "1",
            "--max-memory", "1MB", "--set", "target.steps=5", "--set", "stats.n_samples=8", "--no-verify"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "memory budget of 976.6 KiB is too small by" in err and "raise --max-memory" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(QeditError, match="too small by"):
        load_model(files["llama"], max_memory="1MB")


def test_a_fact_longer_than_the_context_is_refused_before_any_model_work(tiny_q4, tmp_path, capsys, monkeypatch):
    """The fuzzing case: a 400,000-character prompt. One line naming the file's line and the limit, exit 2, and no
    model loaded (load_model would be the first model work)."""
    from conftest import FACTS

    import qedit.pipeline.budget as budget

    files, _ = tiny_q4
    facts = tmp_path / "long.jsonl"
    long = dict(FACTS[1], prompt="a " * 200_000 + FACTS[1]["prompt"])          # 400,033 characters
    facts.write_text(json.dumps(FACTS[0]) + "\n\n" + json.dumps(long) + "\n")
    monkeypatch.setattr(budget, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out.gguf"
    assert main(["edit", str(files["llama"]), str(facts), "-o", str(out), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{facts}:3: the prompt is " in err and "(400,033 characters), over the limit of 112 tokens" in err
    assert "the model's context is 128 tokens" in err
    assert not out.exists()


def test_a_locality_prompt_over_the_memory_budget_names_its_line(tiny_q4, tmp_path):
    """Within the context but over what the budget lets a pass hold: the budget is named."""
    from conftest import FACTS

    from qedit.converters.loading import budget_floor, read_header
    from qedit.pipeline.budget import check_requests

    files, _ = tiny_q4
    facts = tmp_path / "loc.jsonl"
    facts.write_text(json.dumps(dict(FACTS[0], locality_prompt="a " * 50)) + "\n")
    header = read_header(files["llama"])
    floor = budget_floor(header, MemoryBudget(0))
    method = MethodChoice("rome", make_config("rome", layers=(1,)))
    tight = MemoryBudget(floor + (8 << 20), explicit=True)   # room for a pass of a few dozen tokens only
    with pytest.raises(QeditError, match=rf"{facts}:1: the locality_prompt is 102 tokens .* memory budget"):
        check_requests(method, load_requests(facts), header, tight)
    check_requests(method, load_requests(facts), header, MemoryBudget(floor + (1 << 30), explicit=True))


def test_set_and_max_memory_reach_the_job(tiny_q4, tmp_path, monkeypatch):
    """--set nested settings and --max-memory together: the job the CLI hands to the pipeline."""
    import qedit.cli.edit as edit_cli

    files, facts = tiny_q4
    seen = {}
    monkeypatch.setattr(edit_cli, "run_edit", lambda job, **kw: seen.setdefault("job", job) and pytest.skip("seen"))
    with pytest.raises(pytest.skip.Exception):
        main(["edit", str(files["llama"]), str(facts), "-o", str(tmp_path / "o.gguf"), "--method", "rome",
              "--max-memory", "2GiB", "--set", "target.steps=2", "--set", "stats.n_samples=4",
              "--set", "target_margin=none"])
    job = seen["job"]
    cfg = job.method.resolved_config()
    assert job.budget.total == 2 << 30 and job.budget.explicit
    assert cfg.target.steps == 2 and cfg.stats.n_samples == 4 and cfg.target_margin is None


def test_patch_copies_untouched_tensors_without_mapping_them(tmp_path):
    """The streaming writer copies a tensor with pread: a 64 MiB tensor copied leaves the peak RSS where it was."""
    import subprocess
    import sys

    src = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_tensor("big.weight", np.ones((4096, 4096), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code = f"""
from pathlib import Path
from qedit.converters.gguf.patch import patch_gguf
from qedit.core.memory import current_rss, peak_rss
Path('/proc/self/clear_refs').write_text('5')   # reset the peak
before = current_rss()
patch_gguf(Path({str(src)!r}), Path({str(tmp_path / 'copy.gguf')!r}), [], {{}})
print(peak_rss() - before)
"""
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert grown < 40 << 20, f"the copy grew the resident set by {grown >> 20} MiB"
    with GGUFFile(src) as a, GGUFFile(tmp_path / "copy.gguf") as b:
        assert np.array_equal(a.raw("big.weight"), b.raw("big.weight"))


@pytest.mark.parametrize("command", ["forget", "export", "survival"])
def test_every_command_with_a_budget_refuses_one_too_small(tiny_q4, tmp_path, capsys, command):
    files, facts = tiny_q4
    out = tmp_path / ("out.gguf" if command != "survival" else "report")
    argv = {"forget": ["forget", str(files["llama"]), str(facts), "-o", str(out)],
            "export": ["export", str(files["llama"]), "-o", str(out), "--quant", "Q8_0"],
            "survival": ["survival", str(files["llama"]), str(facts), "-o", str(out), "--ladder", "Q8_0"]}[command]
    assert main(argv + ["--max-memory", "1MiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "memory budget of 1.00 MiB is too small by" in err
    assert not out.exists()

"""Every supported architecture (llama, Mistral as llama, qwen2, qwen3, gemma2, gemma3, phi3, smollm3, granite,
olmo2) on tiny random models built in-process: qedit's HF -> GGUF export, its GGUF loader, transformers' own
GGUF loader where it reads the architecture, llama.cpp's logits, and an edit patched into a Q8_0 file (and as a
LoRA adapter) moving the target in llama.cpp as in torch. Refusals: mixture-of-experts files and configs
llama.cpp cannot hold."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import WORDS
from tiny_archs import GOLDEN, TINY, build_arch_dir, finish, logits, spm_vocab, write_vocab_gguf

from qedit.core.errors import QeditError

IDS = [2, 300, 320, 340, 400, 500, 600, 700, 9]


class Tiny:
    """The tiny models of TINY and a SentencePiece vocabulary for them, built once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # no whitespace-only user-defined tokens: qedit refuses them next to Phi-3's right-stripped special tokens
        self.tokens, types, scores = spm_vocab(list(dict.fromkeys(WORDS)), user_defined=("<think>", "</think>"))
        self.template = write_vocab_gguf(root / "vocab.gguf", self.tokens, types, scores=scores)
        self._built: dict[str, tuple[Path, torch.nn.Module]] = {}

    def model(self, name: str) -> tuple[Path, torch.nn.Module]:
        if name not in self._built:
            self._built[name] = build_arch_dir(name, self.root / name, len(self.tokens))
        return self._built[name]

    def gguf(self, name: str, ftype: str = "F32") -> Path:
        from qedit.converters.gguf.export import export_gguf

        path = self.root / f"{name}.{ftype}.gguf"
        if not path.exists():
            export_gguf(self.model(name)[0], path, ftype, template=self.template)
        return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("archs"))


@pytest.mark.parametrize("name", list(TINY))
def test_export_then_load_gives_the_hf_model(tiny, name):
    from qedit.converters.gguf.read import GGUFFile
    from qedit.converters.gguf.to_torch import load_gguf

    _, ref = tiny.model(name)
    path = tiny.gguf(name)
    model, _, stored = load_gguf(path)
    assert type(model).__name__ == type(ref).__name__.replace("Mistral", "Llama")  # Mistral is stored as llama
    assert stored["model.layers.1.mlp.down_proj.weight"] == "F32"
    got, want = logits(model, IDS), logits(ref, IDS)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    folded = "q_proj" if name == "gemma2-qpas" else "\0"  # the query scale is folded into q_proj on export
    ref_state = ref.state_dict()
    for key, value in model.state_dict().items():
        if folded not in key:
            torch.testing.assert_close(value, ref_state[key], atol=1e-6, rtol=0, msg=key)
    with GGUFFile(path) as gf:  # llama.cpp's olmo2 needs output.weight, tied or not
        assert ("output.weight" in gf.tensors) == (not ref.config.tie_word_embeddings or name.startswith("olmo2"))


@pytest.mark.parametrize("name", GOLDEN)
def test_loader_matches_transformers_gguf_loader(tiny, name):
    from transformers import AutoModelForCausalLM

    from qedit.converters.gguf.to_torch import load_gguf

    path = tiny.gguf(name, "Q8_0")
    model, _, stored = load_gguf(path)
    assert stored["model.layers.1.mlp.down_proj.weight"] == "Q8_0"
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    got, want = logits(model, IDS), logits(ref, IDS)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name


@pytest.mark.runtime
@pytest.mark.parametrize("name", list(TINY))
def test_llama_cpp_runs_the_export_with_the_torch_logits(tiny, name):
    from test_gguf_export import _llama_logits

    pytest.importorskip("llama_cpp")
    want = logits(tiny.model(name)[1], IDS)
    got = _llama_logits(tiny.gguf(name), IDS)
    assert np.abs(got - want).max() <= 5e-4 * np.abs(want).max(), name  # gemma: ggml's GELU uses an F16 table


@pytest.mark.runtime
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "smollm3", "granite", "olmo2"])
def test_an_edit_patched_into_q8_0_moves_the_target_in_llama_cpp_as_in_torch(tiny, facts_file, tmp_path, name):
    from test_gguf_patch import _fast_rome

    from qedit.converters.gguf.lora import write_lora_gguf
    from qedit.converters.gguf.patch import patch_gguf
    from qedit.converters.loading import load_model
    from qedit.core.delta import applied
    from qedit.core.facts import load_requests
    from qedit.edit.compute import compute_edits
    from qedit.runtimes.llama import LlamaCppRunner
    from qedit.runtimes.torch_runner import TorchRunner

    pytest.importorskip("llama_cpp")
    q8 = tiny.gguf(name, "Q8_0")
    loaded = load_model(q8)
    request = load_requests(facts_file)[0]
    pairs = [(request.prompt, request.target_new), (request.prompt, request.ground_truth)]
    cfg = dataclasses.replace(_fast_rome(), layers=(0,))  # the subject's MLP output reaches the answer through layer 1
    outcome = compute_edits(loaded, [request], "rome", cfg)
    assert [d.name for d in outcome.deltas] == ["model.layers.0.mlp.down_proj.weight"]
    before = [s.mean_logprob for s in TorchRunner(loaded).score(pairs)]
    with applied(loaded.model, outcome.deltas):
        after = [s.mean_logprob for s in TorchRunner(loaded).score(pairs)]
    patched, lora = tmp_path / "patched.gguf", tmp_path / "edit.lora.gguf"
    report = patch_gguf(q8, patched, outcome.deltas, outcome.manifest(loaded))
    assert [(t.name, t.type_after) for t in report.tensors] == [("blk.0.ffn_down.weight", "Q8_0")]
    write_lora_gguf(q8, lora, outcome.deltas)
    runs = {"base": LlamaCppRunner(q8, n_ctx=64), "patch": LlamaCppRunner(patched, n_ctx=64),
            "lora": LlamaCppRunner(q8, n_ctx=64, lora=lora)}
    got = {k: [s.mean_logprob for s in r.score(pairs)] for k, r in runs.items()}
    moved = np.subtract(after, before)  # torch: how far the edit moves log P(new), log P(true)
    assert abs(moved[0]) > 0.1, (name, moved)
    # ggml quantizes activations to 8 bits for Q8_0 matmuls: the runtimes already differ on the unedited file, most
    # on tokens far in the tail, and a moved residual stream moves that noise; the edit must agree beyond it
    noise = np.abs(np.subtract(got["base"], before))
    assert noise.max() < 0.1 + 0.03 * np.abs(before).max(), (name, got["base"], before)
    for kind in ("patch", "lora"):
        np.testing.assert_array_less(np.abs(np.subtract(got[kind], got["base"]) - moved),
                                     0.05 + 0.05 * abs(moved).max() + 1.5 * noise, err_msg=f"{name} {kind}")


@pytest.mark.runtime
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "smollm3", "granite", "olmo2"])
def test_cli_edit_and_survival_run_on_every_architecture(tiny, facts_file, tmp_path, capsys, name):
    """`qedit edit` (MEMIT: the post-MLP norms of gemma2/olmo2, Granite's residual multiplier) patches an F16 file
    and checks it in llama.cpp; `qedit survival` measures the edit at Q8_0 and Q4_K_M."""
    from qedit.cli import main
    from qedit.converters.gguf.read import GGUFFile

    pytest.importorskip("llama_cpp")
    src = tiny.gguf(name, "F16")
    common = [str(facts_file), "--method", "memit", "--layers", "0", "--stats-samples", "16", "--limit", "2"]
    assert main(["edit", str(src), *common, "-o", str(tmp_path / "edited.gguf")]) == 0
    assert "verify:" in capsys.readouterr().out
    with GGUFFile(tmp_path / "edited.gguf") as gf, GGUFFile(src) as base:
        changed = [n for n in gf.tensors if bytes(gf.raw(n)) != bytes(base.raw(n))]
    assert changed == ["blk.0.ffn_down.weight"]
    assert main(["survival", str(src), *common, "-o", str(tmp_path / "report"), "--ladder", "Q8_0,Q4_K_M"]) == 0
    out = capsys.readouterr().out
    assert "Q8_0" in out and "Q4_K_M" in out


def _rewrite_qkv(src: Path, dst: Path, fuse: bool) -> Path:
    """`src` with attn_q/k/v fused into attn_qkv = [q; k; v] (llama.cpp's --fuse-qkv; `fuse`), or attn_qkv split
    into attn_q/k/v (not `fuse`), every other tensor and key as it is."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    data = {t.name: np.array(t.data) for t in reader.tensors}  # F32, GGUF numpy layout
    arch = reader.fields["general.architecture"].contents()
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    for name, values in data.items():
        block, _, rest = name.rpartition(".attn_")
        if fuse and rest in ("q.weight", "q.bias"):
            kind = rest[2:]
            w.add_tensor(f"{block}.attn_qkv.{kind}", np.concatenate([data[f"{block}.attn_{p}.{kind}"] for p in "qkv"]))
        elif fuse and rest in ("k.weight", "v.weight", "k.bias", "v.bias"):
            continue
        elif not fuse and rest.startswith("qkv."):
            q = heads * values.shape[0] // (heads + 2 * kv)
            k = (values.shape[0] - q) // 2
            for part, rows in zip("qkv", np.split(values, [q, q + k])):
                w.add_tensor(f"{block}.attn_{part}.{rest[4:]}", np.ascontiguousarray(rows))
        else:
            w.add_tensor(name, values)
    return finish(w, dst)


@pytest.mark.parametrize("name, fuse", [("llama-bias", True), ("qwen2", True), ("phi3", False)])
def test_fused_or_separate_attention_loads_either_way(tiny, tmp_path, name, fuse):
    """llama.cpp loads attn_qkv or attn_q/k/v in every architecture; so does qedit, for HF models with either."""
    from qedit.converters.gguf.read import GGUFFile
    from qedit.converters.gguf.to_torch import load_gguf

    path = _rewrite_qkv(tiny.gguf(name), tmp_path / f"{name}.gguf", fuse)
    with GGUFFile(path) as gf:
        assert ("blk.0.attn_qkv.weight" in gf.tensors) == fuse and ("blk.0.attn_q.weight" in gf.tensors) != fuse
    model, _, stored = load_gguf(path)
    ref = tiny.model(name)[1]
    assert np.abs(logits(model, IDS) - logits(ref, IDS)).max() <= 1e-5 * np.abs(logits(ref, IDS)).max()
    assert stored[next(n for n in stored if ".self_attn." in n and "o_proj" not in n)] == "F32"


@pytest.mark.runtime
def test_llama_cpp_runs_a_fused_permuted_llama_as_qedit_loads_it(tiny, tmp_path):
    """A NORM-rope file with attn_qkv: q and k were permuted before fusion (the order llama.cpp's converter uses)."""
    from test_gguf_export import _llama_logits

    path = _rewrite_qkv(tiny.gguf("llama-bias"), tmp_path / "fused.gguf", fuse=True)
    want = logits(tiny.model("llama-bias")[1], IDS)
    assert np.abs(_llama_logits(path, IDS) - want).max() <= 5e-4 * np.abs(want).max()


# ---- refusals ---------------------------------------------------------------------------------------


def _gguf(path: Path, arch: str, fields: dict, tensors: dict[str, tuple[int, ...]]) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for key, value in fields.items():
        w.add_uint32(key, value)
    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    return finish(w, path)


@pytest.mark.parametrize("arch, fields, tensors, match", [
    ("llama", {"llama.expert_count": 8}, {"blk.0.ffn_gate_exps.weight": (8, 4, 4)},
     "llama is a mixture-of-experts model \\(8 experts per layer\\)"),  # Mixtral
    ("llama", {}, {"blk.0.ffn_gate.3.weight": (4, 4)}, "llama is a mixture-of-experts model"),  # old Mixtral files
    ("qwen3moe", {}, {}, "qwen3moe is a mixture-of-experts model"),
    ("gpt-oss", {}, {}, "gpt-oss is a mixture-of-experts model"),
    ("qwen3", {"qwen3.pooling_type": 1}, {}, "embedding or reranking qwen3 model"),
    ("mamba", {}, {}, "GGUF architecture 'mamba' is not supported"),
])
def test_unsupported_and_mixture_of_experts_files_are_one_line_errors(tmp_path, arch, fields, tensors, match):
    from qedit.converters.gguf.to_torch import load_gguf

    path = _gguf(tmp_path / "m.gguf", arch, fields, {"token_embd.weight": (8, 4), **tensors})
    with pytest.raises(QeditError, match=match) as err:
        load_gguf(path)
    assert "\n" not in str(err.value) and "supported" in str(err.value) and "gemma2" in str(err.value)


def test_cli_refuses_a_mixture_of_experts_file_with_exit_code_2(tmp_path, facts_file, capsys):
    from qedit.cli import main

    path = _gguf(tmp_path / "mixtral.gguf", "llama", {"llama.expert_count": 8},
                 {"token_embd.weight": (8, 4), "blk.0.ffn_down_exps.weight": (8, 4, 4)})
    assert main(["edit", str(path), str(facts_file), "-o", str(tmp_path / "out.gguf"), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixture-of-experts" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixtral.gguf"]


def test_hf_mixture_of_experts_config_is_refused(tmp_path):
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.loading import load_model

    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(QeditError, match="'mixtral' is a mixture-of-experts model.*supported: .*olmo2"):
        load_model(tmp_path / "moe")
    with pytest.raises(QeditError, match="model_type 'mixtral' cannot be exported"):
        export_gguf(tmp_path / "moe", tmp_path / "moe.gguf", "F16")


def _edited_config(tiny: Tiny, name: str, root: Path, **changes) -> Path:
    """A copy of tiny model `name` with config.json entries changed (weights linked)."""
    src = tiny.model(name)[0]
    out = root / f"{name}-changed"
    out.mkdir()
    for item in src.iterdir():
        (out / item.name).symlink_to(item)
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps({**cfg, **changes}))
    return out


@pytest.mark.parametrize("name, changes, match", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32}, "use_sliding_window is true"),
    ("smollm3", {"no_rope_layers": [1, 0, 1, 0]}, "no_rope_layers differ"),
    ("gemma2", {"final_logit_softcapping": None}, "always soft-caps"),
    ("gemma2", {"tie_word_embeddings": False}, "tie_word_embeddings is false"),
    ("granite", {"head_dim": 32}, "head_dim 32 \\* 4 heads != hidden_size 64"),
    ("qwen2", {"head_dim": 32}, "llama.cpp's qwen2 sizes its attention"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'dynamic'"),
])
def test_configs_llama_cpp_cannot_hold_are_refused(tiny, tmp_path, name, changes, match):
    from qedit.converters.gguf.export import export_gguf

    src = _edited_config(tiny, name, tmp_path, **changes)
    with pytest.raises(QeditError, match=match):
        export_gguf(src, tmp_path / "x.gguf", "F32", template=tiny.template)
    assert not (tmp_path / "x.gguf").exists()


def test_mistral_sliding_window_is_warned_about(tiny, tmp_path, caplog):
    from qedit.converters.gguf.export import export_gguf
    from qedit.converters.gguf.read import GGUFFile

    src = _edited_config(tiny, "mistral", tmp_path, sliding_window=64)
    with caplog.at_level(logging.WARNING):
        export_gguf(src, tmp_path / "mistral.gguf", "F32", template=tiny.template)
    assert "sliding_window 64 is dropped" in caplog.text and "beyond 64 tokens" in caplog.text
    with GGUFFile(tmp_path / "mistral.gguf") as gf:
        assert gf.architecture == "llama"

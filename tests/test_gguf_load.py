"""load_gguf: tiny llama/qwen2/gemma3/gpt2 GGUF round trips, and the real Gemma 3 270M file against
transformers' own `gguf_file=` loader."""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.to_torch import SUPPORTED_ARCHITECTURES, load_gguf
from qedit.core.errors import QeditError

ARCHS = ("llama", "qwen2", "gemma3", "gpt2")
ARCH_DOWN = {"llama": "model.layers.1.mlp.down_proj.weight", "qwen2": "model.layers.1.mlp.down_proj.weight",
             "gemma3": "model.layers.1.mlp.down_proj.weight", "gpt2": "transformer.h.1.mlp.c_proj.weight"}
TEXTS = ["the cat is at the hat", "hello world", "a  b\n\nc ThE éclair 🙂", "<|endoftext|>the"]
PROMPT_IDS = [[2, 40, 41, 42, 43, 44, 45], [5, 6, 7]]

# ---- tiny GGUF writer: a random HF model -> GGUF, applying llama.cpp's forward transforms ----------

_BPE_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "a"), ("i", "s")]
_SPM_PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "at", "▁c", "▁cat", "is", "▁is"]


def _vocab(arch: str) -> dict[str, object]:
    """Tokenizer metadata: SentencePiece-style for llama/gemma3, byte-level BPE for qwen2/gpt2."""
    if arch in ("llama", "gemma3"):
        specials = ["<unk>", "<s>", "</s>"] if arch == "llama" else ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
        tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + _SPM_PIECES
        types = [3] * len(specials) + [6] * 256 + [1] * len(_SPM_PIECES)
        unk = tokens.index("<unk>")
        types[unk] = 2
        bos, eos = (1, 2) if arch == "llama" else (2, 1)
        return dict(model="llama", pre="default", tokens=tokens, types=types, merges=None,
                    scores=[0.0] * (len(specials) + 256) + [-float(i) for i in range(len(_SPM_PIECES))],
                    bos=bos, eos=eos, unk=unk, pad=0 if arch == "gemma3" else None, add_bos=True)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + [a + b for a, b in _BPE_MERGES] + ["<|endoftext|>"]
    end = len(tokens) - 1
    return dict(model="gpt2", pre="qwen2" if arch == "qwen2" else "gpt-2", tokens=tokens,
                types=[1] * end + [3], merges=[f"{a} {b}" for a, b in _BPE_MERGES], scores=None,
                bos=end, eos=end, unk=None, pad=None, add_bos=False)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _tiny_model(arch: str, vocab_size: int, head_dim: int, n_positions: int, llama3: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, max_position_embeddings=64, rms_norm_eps=1e-6)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, **common)
        cfg.rope_parameters = dict(LLAMA3_ROPE) if llama3 else {"rope_type": "default", "rope_theta": 5e5}
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, tie_word_embeddings=True, **common)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=head_dim, sliding_window=4,
                               query_pre_attn_scalar=head_dim, **common)  # as llama.cpp: 1/sqrt(head_dim)
    else:
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=n_positions, vocab_size=vocab_size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms away from their init value, so a missed +1/-1 would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _to_gguf_layout(arch: str, model: torch.nn.Module, gguf_name: str, t: np.ndarray) -> np.ndarray:
    cfg = model.config
    if arch == "llama" and gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
        n_head = cfg.num_attention_heads if ".attn_q." in gguf_name else cfg.num_key_value_heads
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return t + 1.0
    conv1d = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")
    if arch == "gpt2" and gguf_name.endswith(conv1d):
        return np.ascontiguousarray(t.T)
    return t


def write_tiny_gguf(
    path: Path,
    arch: str,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    head_dim: int = 32,
    n_positions: int = 64,
    llama3_rope: bool = False,
):
    """Write a random tiny `arch` model as GGUF; 2-D weights in `qtype`. Returns the HF model."""
    voc = _vocab(arch)
    model = _tiny_model(arch, len(voc["tokens"]), head_dim, n_positions, llama3_rope)
    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    if arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
        w.add_rope_freq_base(rope["rope_theta"])
        if arch == "llama":
            w.add_rope_dimension_count(cfg.head_dim)
        if arch == "gemma3":
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
            w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model(voc["model"])
    w.add_tokenizer_pre(voc["pre"])
    w.add_token_list(voc["tokens"])
    w.add_token_types(voc["types"])
    if voc["scores"] is not None:
        w.add_token_scores(voc["scores"])
    if voc["merges"] is not None:
        w.add_token_merges(voc["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if voc[key] is not None:
            getattr(w, f"add_{key}_token_id")(voc[key])
    w.add_add_bos_token(voc["add_bos"])
    names = gguf.TensorNameMap(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 64)
    state = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False) and arch != "gpt2":
        state.pop("lm_head.weight")
    for hf_name, tensor in state.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            continue  # buffers such as GPT-2's attention mask
        data = _to_gguf_layout(arch, model, gguf_name, tensor.float().numpy())
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, data)
    if llama3_rope:
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(cfg.head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def _llama3_rope_freqs(head_dim: int) -> np.ndarray:
    """What llama.cpp's converter writes for llama 3.x rope scaling: a divisor per frequency."""
    r = LLAMA3_ROPE
    freqs = 1.0 / r["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for wavelen in 2 * np.pi / freqs:
        if wavelen < r["original_max_position_embeddings"] / r["high_freq_factor"]:
            out.append(1.0)
        elif wavelen > r["original_max_position_embeddings"] / r["low_freq_factor"]:
            out.append(r["factor"])
        else:
            smooth = (r["original_max_position_embeddings"] / wavelen - r["low_freq_factor"]) / (
                r["high_freq_factor"] - r["low_freq_factor"]
            )
            out.append(1.0 / ((1 - smooth) / r["factor"] + smooth))
    return np.array(out, dtype=np.float32)  # (head_dim/2,)


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (seq, vocab)


# ---- tiny round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_f32_roundtrip_reproduces_logits(tmp_path: Path, arch: str) -> None:
    path = tmp_path / f"{arch}.gguf"
    ref = write_tiny_gguf(path, arch)
    model, tokenizer, stored = load_gguf(path)
    assert type(model) is type(ref)
    with GGUFFile(path) as gf:
        assert model.config.tie_word_embeddings == ("output.weight" not in gf.tensors)
    assert stored[f"{ARCH_DOWN[arch]}"] == "F32"
    for ids in PROMPT_IDS:
        torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-4, rtol=1e-4)
    ref_state = ref.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_matches_transformers_gguf_loader(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / f"{arch}.gguf"
    # transformers keeps Gemma 3's default query_pre_attn_scalar (256) where llama.cpp uses head_dim, and
    # GPT-2's default n_positions (1024) whatever context_length says: use shapes where both agree
    write_tiny_gguf(path, arch, gguf.GGMLQuantizationType.Q8_0, head_dim=256, n_positions=1024)
    model, tokenizer, _ = load_gguf(path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    # qedit's tokenizer follows llama.cpp (test_tokenizer_exact); transformers' agrees on byte-level BPE files
    # whose pre-tokenizer it knows, while for SentencePiece files it does not apply llama.cpp's space prefix rules
    if arch in ("qwen2", "gpt2"):
        for text in TEXTS:
            assert tokenizer(text).input_ids == ref_tok(text).input_ids, text
    for ids in PROMPT_IDS:
        torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_quantized_weights_equal_gguf_py_dequantize(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    ref = write_tiny_gguf(path, "llama", gguf.GGMLQuantizationType.Q8_0)
    model, _, stored = load_gguf(path)
    assert stored["model.layers.1.mlp.down_proj.weight"] == "Q8_0"
    with GGUFFile(path) as gf:
        info = gf.tensors["blk.1.ffn_down.weight"]
        assert info.ggml_type == gguf.GGMLQuantizationType.Q8_0
        expected = gguf.quants.dequantize(np.asarray(gf.raw(info.name)).reshape(info.shape[0], -1), info.ggml_type)
    np.testing.assert_array_equal(model.model.layers[1].mlp.down_proj.weight.detach().numpy(), expected)
    # Q8_0 stays close to the float model
    got, want = _logits(model, PROMPT_IDS[0]), _logits(ref, PROMPT_IDS[0])
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_llama3_rope_freqs_become_rope_parameters(tmp_path: Path) -> None:
    path = tmp_path / "llama3.gguf"
    ref = write_tiny_gguf(path, "llama", llama3_rope=True)
    freqs = _llama3_rope_freqs(ref.config.head_dim)
    assert 1.0 < freqs.max() and freqs.min() == 1.0 and len(set(freqs.tolist())) > 2  # all three bands
    model, _, _ = load_gguf(path)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.rope_parameters["factor"] == 8.0
    for ids in PROMPT_IDS:
        torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_dtype_and_bos(tmp_path: Path) -> None:
    path = tmp_path / "gemma3.gguf"
    write_tiny_gguf(path, "gemma3")
    model, tokenizer, _ = load_gguf(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.layer_types.count("full_attention") == 1  # 7 layers, pattern 6
    assert tokenizer("the cat").input_ids[0] == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_reloads_offline(tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from qedit.converters.loading import load_hf_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, arch)
    model, tokenizer, _ = load_gguf(path)
    out = tmp_path / "hf"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok_again = load_hf_tokenizer(out)
    assert type(tok_again) is type(tokenizer)
    for text in TEXTS:
        assert tok_again(text).input_ids == tokenizer(text).input_ids
    torch.testing.assert_close(_logits(again, PROMPT_IDS[0]), _logits(model, PROMPT_IDS[0]), atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QeditError, match="mamba.*not supported.*" + ", ".join(SUPPORTED_ARCHITECTURES)):
        load_gguf(path)


def test_missing_tensor_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "qwen2.gguf"
    write_tiny_gguf(path, "qwen2")
    with GGUFFile(path) as gf:
        drop = gf.tensors["blk.1.attn_v.bias"]
    # rewrite the file without that tensor, keeping every other field
    src = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(tmp_path / "cut.gguf", "qwen2")
    for field in src.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            value = field.contents()
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                w.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1])
            else:
                w.add_key_value(field.name, value, field.types[0])
    for t in src.tensors:
        if t.name != drop.name:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QeditError, match="cut.gguf.*blk.1.attn_v.bias"):
        load_gguf(tmp_path / "cut.gguf")


# ---- the real Gemma 3 270M file -----------------------------------------------------------------

GEMMA_PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Michael Jordan plays the sport of",
    "Toyota is a company from the country of",
]
GEMMA_TEXTS = [*GEMMA_PROMPTS, "Hello world", "  two  spaces\n\nnewline\ttab", "émigré 日本語 🙂 <start_of_turn>user"]


@pytest.fixture(scope="module")
def qedit_gemma(gemma_gguf: Path):
    model, tokenizer, _ = load_gguf(gemma_gguf)
    return model, tokenizer


@pytest.fixture(scope="module")
def transformers_gemma(gemma_gguf: Path):
    """transformers' own GGUF loading (about 60 s): done once per module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gemma_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gemma_gguf.parent, dtype=torch.float32, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(gemma_gguf.parent, **kwargs)


@pytest.mark.real_model
def test_gemma_paris(qedit_gemma) -> None:
    model, tokenizer = qedit_gemma
    ids = tokenizer(GEMMA_PROMPTS[0], return_tensors="pt").input_ids
    assert ids[0, 0].item() == 2  # add_bos
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([top]) == " Paris"
    assert model.config.model_type == "gemma3_text"
    assert model.config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]


@pytest.mark.real_model
def test_gemma_matches_transformers(qedit_gemma, transformers_gemma) -> None:
    model, tokenizer = qedit_gemma
    ref, ref_tok = transformers_gemma
    for text in GEMMA_TEXTS:  # on Gemma's file (add_space_prefix false) transformers' tokenizer agrees with llama.cpp
        assert tokenizer(text).input_ids == ref_tok(text).input_ids, text
    for prompt in GEMMA_PROMPTS:
        ids = ref_tok(prompt, return_tensors="pt").input_ids
        got, want = _logits(model, ids[0].tolist()), _logits(ref, ids[0].tolist())
        torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=0)


@pytest.mark.real_model
def test_gemma_tokenizer_roundtrip(qedit_gemma, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, tokenizer = qedit_gemma
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert type(again) is type(tokenizer)
    for text in GEMMA_TEXTS:
        assert again(text).input_ids == tokenizer(text).input_ids
    assert os.path.exists(tmp_path / "tokenizer.json")

"""Tiny random models of every architecture qedit supports, and GGUF vocabularies (SentencePiece-style and
byte-level BPE) that llama.cpp and qedit both tokenize text with. Built in-process, nothing downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

SPECIALS = ("<pad>", "</s>", "<s>", "<unk>")  # ids 0..3: pad, eos, bos, unk (conftest's ids)
CONTROL = ("<start_of_turn>", "<end_of_turn>", "<|endoftext|>")  # the last: llama.cpp looks it up in Phi-3 files
USER_DEFINED = ("<think>", "  ", "\n\n")
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=2, eos_token_id=1, pad_token_id=0, rms_norm_eps=1e-6,
              initializer_range=0.2)
_LONG = [1.0 + 0.5 * i for i in range(4)]  # longrope factors: rotary_dim / 2 = 16 * 0.5 / 2

# name -> (transformers config class, settings on top of COMMON); the first part of the name is the family
TINY: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=4096)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=128)),  # transformers' GGUF loader fixes Qwen3's head_dim at 128
    "gemma2": ("Gemma2Config", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                    query_pre_attn_scalar=256, sliding_window=64)),
    "gemma3": ("Gemma3TextConfig", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                        sliding_window=64)),
    "phi3": ("Phi3Config", dict(pad_token_id=None)),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4)),  # layer 3 runs without rope
    "granite": ("GraniteConfig", dict(attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      logits_scaling=4.0)),
    "olmo2": ("Olmo2Config", {}),
    # settings transformers' GGUF loader does not read back, but llama.cpp runs
    "llama-bias": ("LlamaConfig", dict(attention_bias=True)),  # q/k biases are permuted like the weights
    "gemma2-qpas": ("Gemma2Config", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                         query_pre_attn_scalar=24, sliding_window=64)),
    "phi3-longrope": ("Phi3Config", dict(pad_token_id=None, partial_rotary_factor=0.5, max_position_embeddings=512,
                                         rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                          "long_factor": _LONG, "short_factor": _LONG[::-1],
                                                          "original_max_position_embeddings": 128,
                                                          "partial_rotary_factor": 0.5})),
    "olmo2-tied": ("Olmo2Config", dict(tie_word_embeddings=True)),
}
FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "smollm3", "granite", "olmo2")
# transformers' own GGUF loader reads these back (with the settings above). Mistral is stored as llama; the file
# of a directory named "mistral" sends transformers to a "mistral" GGUF path gguf-py does not have.
GOLDEN = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def spm_vocab(words: list[str], user_defined: tuple[str, ...] = USER_DEFINED) -> tuple[list[str], list[int], list[float]]:
    """A SentencePiece-style vocabulary: specials, control and user-defined tokens, the 256 byte tokens, "▁" and
    the letters, then every prefix of "▁word" (so llama.cpp's merges build whole words), scores by order."""
    tokens = [*SPECIALS, *CONTROL, *user_defined] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [3] * len(CONTROL) + [4] * len(user_defined) + [6] * 256
    pieces = dict.fromkeys(["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'!?"])
    for word in words:
        for end in range(2, len(word) + 2):
            pieces.setdefault("▁" + word[:end - 1])
        pieces.setdefault(word)
    tokens += list(pieces)
    types += [1] * len(pieces)
    scores = [0.0] * (len(types) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def bpe_vocab(corpus: list[str], size: int = 600) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE (GPT-2 alphabet) trained on `corpus` without any split, so that its merges cross word,
    digit, case and space boundaries (a pre-tokenizer that splits elsewhere than llama.cpp's gives other ids),
    plus special tokens and one token no merge makes (for llama.cpp's ignore_merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [1] * len(tokens)
    tokens += ["ĠEiffelTower", "<|endoftext|>", "<|im_start|>", "<think>"]  # a whole word no merge reaches
    types += [1, 3, 3, 4]
    return tokens, types, merges


def write_vocab_gguf(path: Path, tokens: list[str], types: list[int], *, model: str = "llama", pre: str = "default",
                     scores: list[float] | None = None, merges: list[str] | None = None, arch: str = "llama",
                     add_space_prefix: bool | None = None, add_bos: bool | None = True, name: str = "tiny",
                     bos: int | None = 2, eos: int | None = 1) -> Path:
    """A tensor-less GGUF holding a tokenizer (and the few hparams llama.cpp's vocab-only load reads)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for key, value in (("bos", bos), ("eos", eos)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    if model == "llama":
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    return finish(w, path)


def finish(writer: gguf.GGUFWriter, path: Path) -> Path:
    """Write a GGUFWriter's header, metadata and tensors, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_arch_dir(name: str, path: Path, vocab_size: int, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """The tiny `name` model (TINY) saved as an HF directory (safetensors, config.json), its 1-D weights moved
    off their init values so that a missed norm offset or bias shows. Returns (path, model in eval mode)."""
    import transformers

    cls_name, extra = TINY[name]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra, "vocab_size": vocab_size})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    return path, model


def logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()  # (len(ids), vocab)

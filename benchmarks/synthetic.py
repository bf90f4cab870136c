"""Build a synthetic Q4_K_M GGUF with the shapes of a real model: random weights, real tensor shapes, types,
hyperparameters and tokenizer size, written tensor by tensor (never more than one row chunk in memory).

What comes from where (nothing about the architecture is hand-written here):
- the hyperparameters: a transformers config of the real model's shape (`SHAPES`) saved to a temporary
  directory and read by qedit's HF -> GGUF mapping (`qedit.converters.gguf.hf_config.hf_export`), which also
  gives llama3's `rope_freqs` tensor and Gemma's stored norm form (1 + w);
- the tensor names and shapes: the transformers model built on the meta device, its parameter names mapped
  to GGUF names by gguf-py's `TensorNameMap` (`archs.name_map`), the tied LM head left out as llama.cpp does;
- the tensor types: llama.cpp's Q4_K_M mix as qedit computes it (`kernels.mixes.plan_tensor_types`), in
  llama.cpp's (block, name) order;
- the weights: random but valid encoded blocks, made directly as bytes: random quant bytes with each
  block's float16 scale fields (d, and dmin/m where the type has one) set so that the decoded weights have
  mean about 0 and std about 0.02 (calibrated per type by decoding a sample with qedit's kernels); norms are
  F32 near 1 (Gemma's stored 1 + w with w near 0); every tensor's first chunk is decoded and checked (finite,
  std in a sane range);
- the tokenizer: a synthetic vocabulary of the real size that llama.cpp and qedit's tokenizer builder accept:
  byte-level BPE for the Llama 3 shapes (model "gpt2", pre "llama-bpe", 128000 tokens made by 127744 merges
  over GPT-2's byte alphabet, plus Llama 3's 256 special tokens), SentencePiece for Gemma 3 (model "llama",
  262144 pieces with scores, Gemma's control tokens and the 256 byte tokens).

    python benchmarks/synthetic.py --shape llama-3.1-8b -o /tmp/qedit-big/llama-3.1-8b.Q4_K_M.gguf
    python benchmarks/synthetic.py --shape gemma-3-12b --layers 2 -o /tmp/qedit-big/gemma-3-12b-L2.gguf

`--check` (default) then loads the vocabulary in llama.cpp (vocab_only) and with qedit's tokenizer builder and
compares their ids on a few texts; `--check-model` also runs the shallow file in llama.cpp (a few tokens).
Prints the file size and the build time (and, with --json F, writes them).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

T, VT = gguf.GGMLQuantizationType, gguf.GGUFValueType
TARGET_STD = 0.02
CHUNK_BYTES = 32 << 20  # encoded bytes per produced chunk

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# The real models' configs (config.json of meta-llama/Llama-3.2-1B-Instruct, Llama-3.2-3B-Instruct,
# Llama-3.1-8B-Instruct and the text part of google/gemma-3-12b-it).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        model_type="llama", name="Llama 3.2 1B", size_label="1B", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={**_LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 32.0},
        bos_token_id=128000, eos_token_id=128009),
    "llama-3.2-3b": dict(
        model_type="llama", name="Llama 3.2 3B", size_label="3B", hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={**_LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 32.0},
        bos_token_id=128000, eos_token_id=128009),
    "llama-3.1-8b": dict(
        model_type="llama", name="Llama 3.1 8B", size_label="8B", hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={**_LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 8.0},
        bos_token_id=128000, eos_token_id=128009),
    "gemma-3-12b": dict(
        model_type="gemma3_text", name="Gemma 3 12B", size_label="12B", hidden_size=3840, intermediate_size=15360,
        num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262144,
        tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
        sliding_window=1024, sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        bos_token_id=2, eos_token_id=1, pad_token_id=0),
}


# ---- the config, the tensor list and the hyperparameters, from transformers and qedit -------------------

def hf_config(shape: str, layers: int | None = None) -> Any:
    """The transformers config of `shape` (`layers` blocks when given)."""
    from transformers import AutoConfig

    params = {k: v for k, v in SHAPES[shape].items() if k not in ("name", "size_label")}
    model_type = params.pop("model_type")
    if layers is not None:
        params["num_hidden_layers"] = layers
    if model_type == "gemma3_text":
        n, pattern = params["num_hidden_layers"], params.pop("sliding_window_pattern")
        params["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    return AutoConfig.for_model(model_type, **params)


def model_layout(config: Any) -> tuple[Any, dict[str, tuple[int, ...]], dict[str, str]]:
    """(qedit's HFExport of `config`, GGUF name -> numpy-order shape, GGUF name -> HF name): the HF model built on
    the meta device, its parameters under their GGUF names (the tied LM head left out)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qedit.converters.gguf.archs import name_map
    from qedit.converters.gguf.hf_config import hf_export

    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        exp = hf_export(Path(tmp))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = name_map(exp.arch, exp.n_layers)
    shapes: dict[str, tuple[int, ...]] = {}
    hf_names: dict[str, str] = {}
    for hf_name, param in model.named_parameters(remove_duplicate=True):
        if exp.tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name in shapes:
            raise SystemExit(f"{hf_name}: no (or a duplicate) GGUF name for {exp.arch}")
        shapes[name], hf_names[name] = tuple(param.shape), hf_name
    for name, values in exp.extra.items():  # rope_freqs (llama3 rope scaling)
        shapes[name] = tuple(values.shape)
    return exp, shapes, hf_names


# ---- random but valid blocks ---------------------------------------------------------------------------

# byte offsets of each block's float16 scale fields: (d, the second field or None); the rest is quant data.
# From ggml-common.h: block_q4_0 {d, qs}, q4_1 {d, m, qs}, q5_0 {d, qh, qs}, q5_1 {d, m, qh, qs}, q8_0 {d, qs},
# q2_K {scales, qs, d, dmin}, q3_K {hmask, qs, scales, d}, q4_K/q5_K {d, dmin, ...}, q6_K {ql, qh, scales, d}.
SCALE_FIELDS: dict[T, tuple[int, int | None]] = {
    T.Q4_0: (0, None), T.Q4_1: (0, 2), T.Q5_0: (0, None), T.Q5_1: (0, 2), T.Q8_0: (0, None),
    T.Q2_K: (80, 82), T.Q3_K: (108, None), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208, None),
}


def _set_scales(blocks: np.ndarray, ggml_type: T, d: np.ndarray, m: np.ndarray | None) -> None:
    """Write float16 d (and m) into every block of `blocks` (uint8 (n_blocks, type_size)) in place."""
    d_off, m_off = SCALE_FIELDS[ggml_type]
    blocks[:, d_off:d_off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    if m_off is not None and m is not None:
        blocks[:, m_off:m_off + 2] = m.astype(np.float16).view(np.uint8).reshape(-1, 2)


class BlockMaker:
    """Random blocks of one type whose decoded values have mean ~0 and std ~TARGET_STD.

    The decoded value of every supported type is d * a + m * b, with a and b functions of the quant bytes
    only; decoding a random sample with (d, m) = (1, 0) and (0, 1) gives a and b, from which d and m are set:
    m = -d * mean(a) / mean(b) (mean 0), d = TARGET_STD / std(a + b * m / d).
    """

    def __init__(self, ggml_type: T, rng: np.random.Generator) -> None:
        from qedit.kernels import dequantize_tensor

        self.type = ggml_type
        self.block_size, self.type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        n = 4096
        sample = rng.integers(0, 256, (n, self.type_size), dtype=np.uint8)
        one, zero = np.ones(n), np.zeros(n)
        _set_scales(sample, ggml_type, one, zero)
        a = dequantize_tensor(sample, ggml_type, (n, self.block_size)).astype(np.float64).ravel()
        ratio = 0.0
        if SCALE_FIELDS[ggml_type][1] is not None:
            _set_scales(sample, ggml_type, zero, one)
            b = dequantize_tensor(sample, ggml_type, (n, self.block_size)).astype(np.float64).ravel()
            ratio = -a.mean() / b.mean()
            a = a + ratio * b
        self.d = TARGET_STD / a.std()
        self.m = ratio * self.d

    def make(self, rng: np.random.Generator, n_blocks: int) -> np.ndarray:
        """uint8 (n_blocks, type_size): random quant bytes, scales d (and m) within +-25% of the calibrated ones."""
        blocks = rng.integers(0, 256, (n_blocks, self.type_size), dtype=np.uint8)
        jitter = rng.uniform(0.75, 1.25, n_blocks)
        _set_scales(blocks, self.type, self.d * jitter, self.m * jitter if self.m else None)
        return blocks


class Weights:
    """Producers of every tensor's bytes; records the std of each tensor's first chunk, decoded."""

    def __init__(self, exp: Any, hf_names: dict[str, str], seed: int) -> None:
        self.exp, self.hf_names, self.seed = exp, hf_names, seed
        self.makers: dict[T, BlockMaker] = {}
        self.checked: dict[str, dict[str, float]] = {}

    def _rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def producer(self, name: str, shape: tuple[int, ...], ggml_type: T) -> Callable[[], Iterator[np.ndarray]]:
        if ggml_type in (T.F32, T.F16):
            return lambda: self._floats(name, shape, ggml_type)
        if ggml_type not in SCALE_FIELDS:
            raise SystemExit(f"{name}: no random block maker for {ggml_type.name}")
        return lambda: self._blocks(name, shape, ggml_type)

    def _floats(self, name: str, shape: tuple[int, ...], ggml_type: T) -> Iterator[np.ndarray]:
        if name in self.exp.extra:  # rope_freqs: the real values
            values = self.exp.extra[name].astype(np.float32)
        else:
            rng = self._rng(name)
            if name.endswith("norm.weight"):  # HF's value: near 1 (llama) or near 0 (Gemma, stored as 1 + w)
                base = 0.0 if self.exp.spec.norm_offset else 1.0
                hf = (base + rng.normal(0.0, 0.02, shape)).astype(np.float32)
                values = np.asarray(self.exp.transform(name, hf), dtype=np.float32)
            else:
                values = rng.normal(0.0, TARGET_STD, shape).astype(np.float32)
        self._record(name, values, ggml_type)
        yield values.astype(np.float16 if ggml_type == T.F16 else np.float32)

    def _blocks(self, name: str, shape: tuple[int, ...], ggml_type: T) -> Iterator[np.ndarray]:
        from qedit.kernels import dequantize_tensor

        rng = self._rng(name)
        if ggml_type not in self.makers:
            self.makers[ggml_type] = BlockMaker(ggml_type, np.random.default_rng([self.seed, int(ggml_type)]))
        maker = self.makers[ggml_type]
        n_cols = shape[-1]
        n_rows = math.prod(shape) // n_cols
        blocks_per_row = n_cols // maker.block_size
        step = max(1, CHUNK_BYTES // (blocks_per_row * maker.type_size))
        for lo in range(0, n_rows, step):
            rows = min(n_rows, lo + step) - lo
            blocks = maker.make(rng, rows * blocks_per_row)
            if lo == 0:
                k = min(rows, 8)
                sample = dequantize_tensor(blocks[:k * blocks_per_row].reshape(k, -1), ggml_type, (k, n_cols))
                self._record(name, sample, ggml_type)
            yield blocks

    def _record(self, name: str, values: np.ndarray, ggml_type: T) -> None:
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise SystemExit(f"{name}: decoded values are not finite ({ggml_type.name}); the block maker is wrong")
        std, mean = float(values.std()), float(values.mean())
        if ggml_type not in (T.F32, T.F16) and not (0.25 * TARGET_STD < std < 4 * TARGET_STD and abs(mean) < std):
            raise SystemExit(f"{name}: decoded std {std:.4g}, mean {mean:.4g} ({ggml_type.name}); expected std ~"
                             f"{TARGET_STD}")
        self.checked[name] = {"type": ggml_type.name, "std": std, "mean": mean}


# ---- synthetic tokenizers ------------------------------------------------------------------------------

def _gpt2_bytes() -> list[str]:
    """GPT-2's byte -> unicode alphabet, in its order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _grow(tokens: list[str], seen: set[str], n_total: int, rng: random.Random, word_start: str,
          letters: list[str], merges: list[str] | None, max_len: int = 14) -> None:
    """Add merged tokens until `tokens` has n_total: each is a word-like token (a word start, a letter token,
    or an earlier merged token) followed by a short letter token, so that every token is two earlier ones."""
    pieces = [t for t in tokens if t in letters]                         # right parts: letters, then short merges
    lefts = [t for t in tokens if t in letters] + [word_start + c for c in letters if word_start + c in seen]
    while len(tokens) < n_total:
        left = lefts[int(len(lefts) * rng.random() ** 1.5)]              # earlier (shorter, frequent) more often
        right = rng.choice(letters) if rng.random() < 0.6 else pieces[rng.randrange(len(pieces))]
        new = left + right
        if new in seen or len(new) > max_len:
            continue
        seen.add(new)
        tokens.append(new)
        lefts.append(new)
        if len(new) <= 3 and word_start not in new:
            pieces.append(new)
        if merges is not None:
            merges.append(f"{left} {right}")


_LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])


def llama3_vocab(n_vocab: int, seed: int) -> list[tuple]:
    """tokenizer.* entries of a byte-level BPE vocabulary like Llama 3's: 256 byte tokens, merged tokens up to
    n_vocab - 256, then Llama 3's 256 special tokens (CONTROL)."""
    rng = random.Random(seed)
    n_regular = n_vocab - len(_LLAMA3_SPECIAL)
    alphabet = _gpt2_bytes()
    tokens, merges = list(alphabet), []
    seen = set(tokens)
    space, newline = "Ġ", "Ċ"
    letters = [c for c in alphabet if c.isascii() and c.isalpha()]
    digits = [str(i) for i in range(10)]
    for left, right in [(space, c) for c in letters] + [(space, space), (newline, newline), (space, "(")]:
        tokens.append(left + right)
        seen.add(left + right)
        merges.append(f"{left} {right}")
    for a in digits:                                                     # Llama 3 has every 1-3 digit number
        for b in digits:
            tokens.append(a + b)
            seen.add(a + b)
            merges.append(f"{a} {b}")
    for a in [str(i) for i in range(10, 100)]:
        for b in digits:
            tokens.append(a + b)
            seen.add(a + b)
            merges.append(f"{a} {b}")
    _grow(tokens, seen, n_regular, rng, space, letters, merges)
    all_tokens = tokens + _LLAMA3_SPECIAL
    types = [int(gguf.TokenType.NORMAL)] * n_regular + [int(gguf.TokenType.CONTROL)] * len(_LLAMA3_SPECIAL)
    ids = {t: i for i, t in enumerate(all_tokens)}
    return [("tokenizer.ggml.model", "gpt2", VT.STRING), ("tokenizer.ggml.pre", "llama-bpe", VT.STRING),
            ("tokenizer.ggml.tokens", all_tokens, VT.ARRAY, VT.STRING),
            ("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32),
            ("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING),
            ("tokenizer.ggml.bos_token_id", ids["<|begin_of_text|>"], VT.UINT32),
            ("tokenizer.ggml.eos_token_id", ids["<|eot_id|>"], VT.UINT32),
            ("tokenizer.ggml.padding_token_id", ids["<|finetune_right_pad_id|>"], VT.UINT32)]


def gemma_vocab(n_vocab: int, seed: int) -> list[tuple]:
    """tokenizer.* entries of a SentencePiece vocabulary like Gemma 3's: its control tokens, the 256 byte
    tokens, single characters, then merged pieces ("▁" starts a word) scored by rank, up to n_vocab."""
    rng = random.Random(seed)
    TT = gguf.TokenType
    control = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(99)]
               + ["<start_of_turn>", "<end_of_turn>"])
    types = [int(TT.CONTROL)] * len(control)
    types[3], types[5] = int(TT.UNKNOWN), int(TT.USER_DEFINED)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    space = "\u2581"
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    accented = [chr(c) for c in range(0xC0, 0x250) if chr(c).isalpha()]
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    chars = ([space, "\n", "\t"] + letters + [str(i) for i in range(10)] + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
             + accented + cjk)
    tokens = control + byte_tokens + chars
    seen = set(tokens)
    for piece in [space + c for c in letters] + [space * 2, "\n\n", space * 4]:
        tokens.append(piece)
        seen.add(piece)
    _grow(tokens, seen, n_vocab, rng, space, letters, None)
    n_special = len(control) + len(byte_tokens)
    types += [int(TT.BYTE)] * len(byte_tokens) + [int(TT.NORMAL)] * (len(tokens) - n_special)
    scores = [-1000.0] * len(control) + [0.0] * len(byte_tokens) + [-float(i) for i in range(len(tokens) - n_special)]
    ids = {t: i for i, t in enumerate(tokens)}
    return [("tokenizer.ggml.model", "llama", VT.STRING), ("tokenizer.ggml.pre", "default", VT.STRING),
            ("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
            ("tokenizer.ggml.scores", scores, VT.ARRAY, VT.FLOAT32),
            ("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32),
            ("tokenizer.ggml.bos_token_id", ids["<bos>"], VT.UINT32),
            ("tokenizer.ggml.eos_token_id", ids["<eos>"], VT.UINT32),
            ("tokenizer.ggml.unknown_token_id", ids["<unk>"], VT.UINT32),
            ("tokenizer.ggml.padding_token_id", ids["<pad>"], VT.UINT32),
            ("tokenizer.ggml.add_bos_token", True, VT.BOOL), ("tokenizer.ggml.add_eos_token", False, VT.BOOL),
            ("tokenizer.ggml.add_space_prefix", False, VT.BOOL)]


# ---- the file ------------------------------------------------------------------------------------------

def build(shape: str, dst: Path, layers: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the synthetic Q4_K_M GGUF of `shape` to `dst`; returns what was built (size, time, types, stds)."""
    from qedit.converters.gguf.export import QUANTIZATION_VERSION
    from qedit.converters.gguf.write import TensorSpec, encode_kv, write_gguf
    from qedit.kernels import mix_model_from_metadata, plan_tensor_types
    from qedit.kernels.mixes import ftype_from_name

    start = time.perf_counter()
    config = hf_config(shape, layers)
    exp, shapes, hf_names = model_layout(config)
    fields = {"general.architecture": exp.arch, **{kv[0]: kv[1] for kv in exp.kvs}}
    ftype = ftype_from_name("Q4_K_M")
    types = plan_tensor_types(ftype, shapes, mix_model_from_metadata(fields, list(shapes)))
    n_vocab = shapes["token_embd.weight"][0]
    vocab = gemma_vocab(n_vocab, seed) if exp.arch.startswith("gemma") else llama3_vocab(n_vocab, seed)
    n_tokens = len(next(v for k, v, *_ in vocab if k == "tokenizer.ggml.tokens"))
    if n_tokens != n_vocab:
        raise SystemExit(f"the synthetic vocabulary has {n_tokens} tokens, token_embd {n_vocab} rows")
    info = SHAPES[shape]
    label = f"{info['name']} (synthetic{'' if layers is None else f', {layers} layers'})"
    general = [("general.architecture", exp.arch, VT.STRING), ("general.type", "model", VT.STRING),
               ("general.name", label, VT.STRING), ("general.size_label", info["size_label"], VT.STRING)]
    ftype_kvs = [("general.quantization_version", QUANTIZATION_VERSION, VT.UINT32),
                 ("general.file_type", int(ftype), VT.UINT32)]
    kvs = [encode_kv(*kv) for kv in general + list(exp.kvs) + vocab + ftype_kvs]
    weights = Weights(exp, hf_names, seed)
    specs = [TensorSpec(name, shapes[name], types[name], weights.producer(name, shapes[name], types[name]))
             for name in types]  # llama.cpp's (block, name) order
    dst.parent.mkdir(parents=True, exist_ok=True)
    done = [0]

    def progress(spec: TensorSpec) -> None:
        done[0] += 1
        if done[0] % 50 == 0 or done[0] == len(specs):
            print(f"  {done[0]}/{len(specs)} tensors, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    size = write_gguf(dst, kvs, specs, on_tensor=progress)
    seconds = time.perf_counter() - start
    by_type: dict[str, dict[str, Any]] = {}
    for name, spec in zip(types, specs):
        row = by_type.setdefault(spec.ggml_type.name, {"tensors": 0, "bytes": 0, "std": []})
        row["tensors"] += 1
        row["bytes"] += spec.nbytes
        row["std"].append(weights.checked[name]["std"])
    for row in by_type.values():
        row["std"] = [round(min(row["std"]), 5), round(max(row["std"]), 5)]
    n_params = sum(math.prod(s) for s in shapes.values())
    return {"shape": shape, "layers": exp.n_layers, "path": str(dst), "size_bytes": size, "build_s": round(seconds, 1),
            "arch": exp.arch, "n_params": n_params, "n_tensors": len(specs), "n_vocab": n_vocab,
            "tied": exp.tied, "types": by_type, "seed": seed}


# ---- checks ------------------------------------------------------------------------------------------

_CHECK_TEXTS = ["The Eiffel Tower is located in the city of", "Danielle Darrieux's mother tongue is",
                "  two  spaces,\nnew lines\n\n and 12345 digits!", "Übermäßig café 東京 🙂",
                "<|start_header_id|>user<|end_header_id|> <start_of_turn>user"]


def check_vocab(path: Path) -> dict[str, Any]:
    """Load the vocabulary in llama.cpp (vocab_only) and with qedit's tokenizer builder; compare their ids."""
    import llama_cpp

    from qedit.converters.gguf.read import GGUFFile
    from qedit.converters.gguf.tokenizer import build_tokenizer

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    t1 = time.perf_counter()
    with GGUFFile(path) as gf:
        tok = build_tokenizer(gf)
    t2 = time.perf_counter()
    mismatches = []
    for text in _CHECK_TEXTS:
        ours = tok(text)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
        if list(ours) != list(theirs):
            mismatches.append({"text": text, "qedit": list(ours), "llama.cpp": list(theirs)})
    return {"llama_cpp_vocab_s": round(t1 - t0, 1), "qedit_tokenizer_s": round(t2 - t1, 1),
            "n_vocab_llama_cpp": llm.n_vocab(), "texts": len(_CHECK_TEXTS), "mismatches": mismatches}


def check_model(path: Path) -> dict[str, Any]:
    """Run the file in llama.cpp and in qedit's torch loader on one prompt: logits finite in both, and their
    correlation at the last position (for shallow variants: both load the whole model)."""
    import llama_cpp
    import torch

    from qedit.converters.gguf.to_torch import load_gguf

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    ids = llm.tokenize(b"The Eiffel Tower is in", add_bos=True, special=True)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
    del llm
    model, tok, _ = load_gguf(path)
    qedit_ids = tok("The Eiffel Tower is in")["input_ids"]
    with torch.no_grad():
        ours = model(torch.tensor([qedit_ids])).logits[0, -1].double().numpy()
    return {"llama_cpp_finite": bool(np.isfinite(theirs).all()), "qedit_finite": bool(np.isfinite(ours).all()),
            "same_ids": list(qedit_ids) == list(ids), "logit_std": float(theirs.std()),
            "logit_corr": float(np.corrcoef(theirs, ours)[0, 1]),
            "same_top1": int(theirs.argmax()) == int(ours.argmax())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("-o", "--output", required=True, type=Path, help="the .gguf to write")
    p.add_argument("--layers", type=int, help="build a shallower variant with N blocks (quick checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare llama.cpp's and qedit's tokenization of a few texts (default: on)")
    p.add_argument("--check-model", action="store_true", help="also run the file in llama.cpp on a few tokens")
    p.add_argument("--json", type=Path, help="write what was built as JSON")
    args = p.parse_args(argv)
    result = build(args.shape, args.output, args.layers, args.seed)
    print(f"{args.output}: {result['size_bytes'] / 2**30:.2f} GiB ({result['size_bytes']} bytes), "
          f"{result['n_tensors']} tensors, {result['n_params'] / 1e9:.2f} B parameters, built in "
          f"{result['build_s']:.1f} s", flush=True)
    for name, row in result["types"].items():
        print(f"  {name:5s} {row['tensors']:4d} tensors {row['bytes'] / 2**20:9.1f} MiB  decoded std {row['std']}")
    if args.check:
        result["vocab_check"] = check_vocab(args.output)
        bad = result["vocab_check"]["mismatches"]
        print(f"  vocabulary: llama.cpp {result['vocab_check']['n_vocab_llama_cpp']} tokens, qedit and llama.cpp ids "
              f"{'agree' if not bad else 'DIFFER'} on {len(_CHECK_TEXTS)} texts", flush=True)
        for row in bad:
            print(f"    {row}", file=sys.stderr)
    if args.check_model:
        result["model_check"] = check_model(args.output)
        print(f"  llama.cpp run: {result['model_check']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

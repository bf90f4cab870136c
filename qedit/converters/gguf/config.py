"""The transformers config of a GGUF model, rebuilt from its metadata as llama.cpp reads it.

The keys every decoder shares come first (with llama.cpp's defaults when a key is absent); each architecture's
own settings come from its entry in `_EXTRAS`. A setting llama.cpp honours but the HF class cannot hold, or a
file this rebuild would get wrong, is refused with a one-line QeditError naming the key.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import AutoConfig, PretrainedConfig

from qedit.converters.gguf.archs import GGUFArch, Tied, check_arch
from qedit.converters.gguf.read import GGUFFile
from qedit.core.errors import QeditError

_REQUIRED = object()


class Meta:
    """Typed access to `{arch}.*` metadata of a GGUF file; every failure is a QeditError naming the key."""

    def __init__(self, gf: GGUFFile) -> None:
        self.gf, self.arch, self.label = gf, gf.architecture, gf.path.name

    def value(self, key: str, default: Any = _REQUIRED) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.gf.fields:
            return self.gf.fields[full]
        if default is _REQUIRED:
            raise QeditError(f"{self.label}: metadata key {full!r} is missing; cannot build the model config")
        return default

    def _number(self, key: str, default: Any, integer: bool) -> Any:
        value = self.value(key, default)
        if value is default and default is not _REQUIRED:
            return default
        if integer and isinstance(value, list):  # per-layer counts: HF configs take one value
            if not value or len(set(value)) != 1:
                raise self.refuse(f"{self.arch}.{key} varies per layer ({value}); not supported for this architecture")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise self.refuse(f"metadata key {self.arch}.{key!r} is {value!r}; expected "
                              f"{'an integer' if integer else 'a number'}")
        return value if integer else float(value)

    def int(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._number(key, default, integer=True)

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._number(key, default, integer=False)

    def has_tensor(self, name: str) -> bool:
        return name in self.gf.tensors

    def refuse(self, what: str) -> QeditError:
        return QeditError(f"{self.label}: {what}")


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    n_layers: int
    rope_dims: int
    theta: float


def _dims(m: Meta, spec: GGUFArch) -> Dims:
    hidden, heads = m.int("embedding_length"), m.int("attention.head_count")
    head_dim = m.int("attention.key_length", hidden // heads)  # llama.cpp's default: n_embd / n_head
    if m.int("attention.value_length", head_dim) != head_dim:
        raise m.refuse(f"{m.arch}.attention.value_length differs from key_length; transformers has one head size")
    rope_dims = m.int("rope.dimension_count", head_dim)
    if rope_dims != head_dim and not (spec.partial_rotary and 0 < rope_dims < head_dim and rope_dims % 2 == 0):
        raise m.refuse(f"{m.arch}.rope.dimension_count is {rope_dims} of a head size of {head_dim}; partial "
                       f"rotary is not supported for {m.arch}")
    return Dims(hidden, heads, m.int("attention.head_count_kv", heads), head_dim, m.int("block_count"), rope_dims,
                m.float("rope.freq_base", 10000.0))


def rope_parameters(m: Meta, d: Dims, theta: float | None = None) -> dict[str, Any]:
    """HF `rope_parameters` from `{arch}.rope.scaling.*` and the llama3 `rope_freqs` tensor."""
    theta = d.theta if theta is None else theta
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    kind, factor = m.value("rope.scaling.type", "none"), m.float("rope.scaling.factor", 1.0)
    if kind == "linear" and factor != 1.0:
        params.update(rope_type="linear", factor=factor)
    elif kind == "yarn":
        params.update(rope_type="yarn", factor=factor,
                      original_max_position_embeddings=m.int("rope.scaling.original_context_length"))
    elif kind not in ("none", "linear"):
        raise m.refuse(f"rope scaling type {kind!r} is not supported (only linear and yarn)")
    if m.has_tensor("rope_freqs.weight"):  # llama 3.x stores its rope scaling as per-frequency divisors
        params.update(_llama3_rope(m, theta, d.head_dim))
    return params


def _llama3_rope(m: Meta, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover HF's llama3 rope parameters from `rope_freqs` (divisors of each inverse frequency).

    Every Llama 3.x release uses low/high frequency factors 1 and 4 and an original context of 8192;
    the scale factor is the largest divisor. The result is checked against the stored divisors.
    """
    divisors = m.gf.dequantize("rope_freqs.weight").astype(np.float64).reshape(-1)  # (head_dim/2,)
    factor, low, high, original = float(divisors.max()), 1.0, 4.0, 8192
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (head_dim/2,)
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1.0 - smooth) / factor + smooth)  # (head_dim/2,): 1 at high, factor at low frequencies
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-3):
        raise m.refuse("rope_freqs.weight does not match llama3 rope scaling (factor, low 1, high 4, original "
                       "context 8192); this rope variant is not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}


def swa_layers(m: Meta, n_layers: int, default_pattern: int) -> list[bool]:
    """Per layer, whether llama.cpp runs it with the sliding window (`attention.sliding_window_pattern`: a bool
    per layer, or n: layer i slides iff i % n < n - 1, n = 0 meaning every layer)."""
    pattern = m.value("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        is_swa = [bool(x) for x in pattern]
    else:
        n = int(pattern)
        is_swa = [n == 0 or i % n < n - 1 for i in range(n_layers)]
    if len(is_swa) != n_layers:
        raise m.refuse(f"sliding_window_pattern has {len(is_swa)} entries for {n_layers} layers")
    return is_swa


def _layer_types(is_swa: list[bool]) -> list[str]:
    return ["sliding_attention" if s else "full_attention" for s in is_swa]


def _biases(m: Meta) -> dict[str, Any]:
    """llama-style configs: attention and MLP biases are there iff their tensors are."""
    return {"attention_bias": m.has_tensor("blk.0.attn_q.bias") or m.has_tensor("blk.0.attn_qkv.bias"),
            "mlp_bias": m.has_tensor("blk.0.ffn_up.bias")}


def _plain_head(m: Meta, d: Dims) -> None:
    if d.head_dim * d.heads != d.hidden:
        raise m.refuse(f"{m.arch} needs head_dim * head_count == embedding_length (llama.cpp sizes its attention "
                       f"that way), got {d.head_dim} * {d.heads} != {d.hidden}")


def _llama(m: Meta, d: Dims) -> dict[str, Any]:
    return {**_biases(m), "rope_parameters": rope_parameters(m, d)}


def _qwen(m: Meta, d: Dims) -> dict[str, Any]:
    return {"attention_bias": m.has_tensor("blk.0.attn_q.bias") or m.has_tensor("blk.0.attn_qkv.bias"),
            "use_sliding_window": False, "rope_parameters": rope_parameters(m, d)}


def _gemma_scalar(d: Dims, big_model_layers: int) -> int:
    """llama.cpp scales queries by 1/sqrt(head_dim), except the 27B models: 1/sqrt(hidden/heads)."""
    return d.hidden // d.heads if d.n_layers == big_model_layers else d.head_dim


def _gemma2(m: Meta, d: Dims) -> dict[str, Any]:
    if m.float("rope.freq_base_swa", d.theta) != d.theta:
        raise m.refuse("gemma2.rope.freq_base_swa differs from rope.freq_base; transformers' Gemma 2 has one rope base")
    return {"sliding_window": m.int("attention.sliding_window", 4096),  # llama.cpp's defaults for gemma2
            "layer_types": _layer_types(swa_layers(m, d.n_layers, 2)),
            "attn_logit_softcapping": m.float("attn_logit_softcapping", 50.0),
            "final_logit_softcapping": m.float("final_logit_softcapping", 30.0),
            "query_pre_attn_scalar": _gemma_scalar(d, 46), "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": rope_parameters(m, d)}


def _gemma3(m: Meta, d: Dims) -> dict[str, Any]:
    local = {"rope_type": "default", "rope_theta": m.float("rope.freq_base_swa", 10000.0)}
    return {"sliding_window": m.int("attention.sliding_window"),
            "layer_types": _layer_types(swa_layers(m, d.n_layers, 6)),  # llama.cpp hard-codes 6 for gemma3
            "rope_parameters": {"full_attention": rope_parameters(m, d), "sliding_attention": local},
            "query_pre_attn_scalar": _gemma_scalar(d, 62),
            "final_logit_softcapping": m.float("final_logit_softcapping", None),
            "attn_logit_softcapping": m.float("attn_logit_softcapping", None)}


def _phi3(m: Meta, d: Dims) -> dict[str, Any]:
    _plain_head(m, d)
    context = m.int("context_length")
    original = m.int("rope.scaling.original_context_length", context)
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": d.theta,
                              "partial_rotary_factor": d.rope_dims / d.head_dim}
    if m.has_tensor("rope_factors_long.weight") or m.has_tensor("rope_factors_short.weight"):
        # LongRoPE: llama.cpp picks the long factors when the context exceeds the original one, transformers when
        # the sequence does; they agree while llama.cpp runs with n_ctx <= original_max_position_embeddings
        params.update(rope_type="longrope", original_max_position_embeddings=original,
                      long_factor=m.gf.dequantize("rope_factors_long.weight").reshape(-1).tolist(),
                      short_factor=m.gf.dequantize("rope_factors_short.weight").reshape(-1).tolist())
        if m.value("rope.scaling.attn_factor", None) is not None:
            params["attention_factor"] = m.float("rope.scaling.attn_factor")
    elif m.value("rope.scaling.type", "none") not in ("none", "linear") or m.float("rope.scaling.factor", 1.0) != 1.0:
        raise m.refuse("phi3 rope scaling other than LongRoPE factors is not supported")
    # llama.cpp disables phi3's sliding window (models/phi3.cpp): so does the loaded model
    return {"rope_parameters": params, "original_max_position_embeddings": original, "sliding_window": None}


def _smollm3(m: Meta, d: Dims) -> dict[str, Any]:
    # llama.cpp hard-codes rope off in every 4th layer (models/smollm3.cpp), which is transformers' default
    return {**_biases(m), "no_rope_layer_interval": 4, "use_sliding_window": False,
            "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(d.n_layers)],
            "rope_parameters": rope_parameters(m, d)}


def _granite(m: Meta, d: Dims) -> dict[str, Any]:
    _plain_head(m, d)
    if m.value("rope.scaling.finetuned", True) is False:
        raise m.refuse("granite.rope.scaling.finetuned is false (rope disabled), which transformers' Granite cannot do")
    # llama.cpp treats 0 (or absent) as "no scale": 1/sqrt(head_dim) for attention, 1 otherwise
    return {**_biases(m), "rope_parameters": rope_parameters(m, d),
            "attention_multiplier": m.float("attention.scale", 0.0) or 1.0 / math.sqrt(d.head_dim),
            "embedding_multiplier": m.float("embedding_scale", 0.0) or 1.0,
            "residual_multiplier": m.float("residual_scale", 0.0) or 1.0,
            "logits_scaling": m.float("logit_scale")}


def _olmo2(m: Meta, d: Dims) -> dict[str, Any]:
    _plain_head(m, d)
    if m.int("attention.sliding_window", 0) > 0:
        raise m.refuse("olmo2 with a sliding window (OLMo 3) is not supported; supported: OLMo 2")
    return {"attention_bias": False, "rope_parameters": rope_parameters(m, d)}


_EXTRAS: dict[str, Callable[[Meta, Dims], dict[str, Any]]] = {
    "llama": _llama, "qwen2": _qwen, "qwen3": _qwen, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3,
    "smollm3": _smollm3, "granite": _granite, "olmo2": _olmo2,
}


def _common(gf: GGUFFile, spec: GGUFArch) -> dict[str, Any]:
    if "token_embd.weight" not in gf.tensors:
        raise QeditError(f"{gf.path.name}: tensor token_embd.weight is missing; not a complete {spec.name} model")
    has_output = "output.weight" in gf.tensors
    if spec.tied is Tied.NEVER and not has_output:
        raise QeditError(f"{gf.path.name}: tensor output.weight is missing; llama.cpp's {spec.name} needs it")
    fields = gf.fields
    return {
        "architectures": [spec.hf_class],
        "vocab_size": gf.tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": spec.tied is Tied.ALWAYS or (spec.tied is Tied.OPTIONAL and not has_output),
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": fields.get("tokenizer.ggml.padding_token_id"),
    }


def _gpt2(m: Meta) -> dict[str, Any]:
    return dict(n_embd=m.int("embedding_length"), n_layer=m.int("block_count"), n_head=m.int("attention.head_count"),
                n_positions=m.int("context_length"), n_inner=m.int("feed_forward_length", None),
                layer_norm_epsilon=m.float("attention.layer_norm_epsilon", 1e-5))


def build_config(gf: GGUFFile) -> PretrainedConfig:
    """The HF config of the model in `gf`, from its metadata (and tensor list, for ties and biases)."""
    spec = check_arch(gf)
    m = Meta(gf)
    common = _common(gf, spec)
    if spec.name not in _EXTRAS:  # gpt2: a layer-normed, Conv1D model with its own config names
        return AutoConfig.for_model(spec.model_type, **common, **_gpt2(m))
    d = _dims(m, spec)
    cfg = dict(hidden_size=d.hidden, intermediate_size=m.int("feed_forward_length"), num_hidden_layers=d.n_layers,
               num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, head_dim=d.head_dim,
               max_position_embeddings=m.int("context_length"),
               rms_norm_eps=m.float("attention.layer_norm_rms_epsilon"))
    return AutoConfig.for_model(spec.model_type, **common, **cfg, **_EXTRAS[spec.name](m, d))

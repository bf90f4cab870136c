"""Load a llama.cpp GGUF file as a transformers causal LM plus its tokenizer, fast.

transformers' own `from_pretrained(..., gguf_file=...)` spends most of its minute in gguf-py's
`GGUFReader` (twice: config and tokenizer) and in random weight init. Here the header is parsed once
by `GGUFFile`, the model is built with its parameters on the meta device, and every tensor is decoded
by libgguf straight into the buffer that becomes the parameter.

The HF config is rebuilt from GGUF metadata per architecture; tensor names come from gguf-py's
`TensorNameMap`; llama.cpp's conversion transforms are undone (Gemma norms stored as w + 1, llama
attn_q/attn_k rope permutation, GPT-2 Conv1D orientation). The tokenizer is transformers' own GGUF
tokenizer conversion, fed from this parser's fields.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from qedit.converters.gguf.read import GGUFFile
from qedit.core.errors import QeditError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3", "gpt2")
# GGUF architecture -> (HF model_type, HF causal-LM class name)
_HF_CLASSES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
}
_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")
_REQUIRED = object()

Transform = Callable[[str, torch.Tensor], torch.Tensor]


def load_gguf(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, str]]:
    """Model (eval mode, on `device`, in `dtype`), tokenizer, and the GGML type name each HF weight is
    stored in, of a GGUF model."""
    start = time.perf_counter()
    with GGUFFile(path) as gf:
        config = build_config(gf)
        model = build_model(gf, config, dtype=dtype, device=device)
        tokenizer = build_tokenizer(gf, config)
        stored = stored_types(gf, model)
    logger.info("loaded %s (%s) in %.1f s", gf.path.name, gf.architecture, time.perf_counter() - start)
    return model, tokenizer, stored


def stored_types(gf: GGUFFile, model: PreTrainedModel) -> dict[str, str]:
    """HF weight name -> the GGML type name of the GGUF tensor it was read from."""
    name_map = gguf.TensorNameMap(_gguf_arch(_supported_arch(gf)), model.config.num_hidden_layers)
    out = {}
    for hf_name, _ in model.named_parameters():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name in gf.tensors:
            out[hf_name] = gf.tensors[gguf_name].ggml_type.name
    return out


def _supported_arch(gf: GGUFFile) -> str:
    arch = gf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise QeditError(
            f"{gf.path.name}: GGUF architecture {arch!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _field(gf: GGUFFile, key: str, default: object = _REQUIRED) -> object:
    if key in gf.fields:
        return gf.fields[key]
    if default is _REQUIRED:
        raise QeditError(f"{gf.path.name}: metadata key {key!r} is missing; cannot build the model config")
    return default


def _int(gf: GGUFFile, key: str, default: object = _REQUIRED) -> int:
    if key not in gf.fields and default is not _REQUIRED:
        return default  # type: ignore[return-value]
    value = _field(gf, key)
    if isinstance(value, list):  # per-layer counts: HF configs take one value
        if not value or len(set(value)) != 1:
            raise QeditError(f"{gf.path.name}: {key} varies per layer ({value}); not supported for this architecture")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise QeditError(f"{gf.path.name}: metadata key {key!r} is {value!r}; expected an integer")
    return value


def _rope_parameters(gf: GGUFFile, arch: str, theta: float, head_dim: int) -> dict[str, object]:
    """HF `rope_parameters` for one attention type, from `{arch}.rope.scaling.*` and `rope_freqs`."""
    params: dict[str, object] = {"rope_type": "default", "rope_theta": theta}
    kind = _field(gf, f"{arch}.rope.scaling.type", "none")
    factor = float(_field(gf, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear" and factor != 1.0:
        params.update(rope_type="linear", factor=factor)
    elif kind == "yarn":
        orig = _int(gf, f"{arch}.rope.scaling.original_context_length")
        params.update(rope_type="yarn", factor=factor, original_max_position_embeddings=orig)
    elif kind not in ("none", "linear"):
        raise QeditError(f"{gf.path.name}: rope scaling type {kind!r} is not supported (only linear and yarn)")
    if "rope_freqs.weight" in gf.tensors:  # llama 3.x stores its rope scaling as per-frequency divisors
        params.update(_llama3_rope(gf, theta, head_dim))
    return params


def _llama3_rope(gf: GGUFFile, theta: float, head_dim: int) -> dict[str, object]:
    """Recover HF's llama3 rope parameters from `rope_freqs` (divisors of each inverse frequency).

    Every Llama 3.x release uses low/high frequency factors 1 and 4 and an original context of 8192;
    the scale factor is the largest divisor. The result is checked against the stored divisors.
    """
    divisors = gf.dequantize("rope_freqs.weight").astype(np.float64).reshape(-1)  # (head_dim/2,)
    factor, low, high, original = float(divisors.max()), 1.0, 4.0, 8192
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (head_dim/2,)
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1.0 - smooth) / factor + smooth)  # (head_dim/2,): 1 at high, factor at low frequencies
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-3):
        raise QeditError(
            f"{gf.path.name}: rope_freqs.weight does not match llama3 rope scaling "
            "(factor, low 1, high 4, original context 8192); this rope variant is not supported"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def build_config(gf: GGUFFile) -> PretrainedConfig:
    """The HF config of the model in `gf`, from its metadata (and tensor list, for ties/biases)."""
    from transformers import AutoConfig

    arch = _supported_arch(gf)
    model_type, class_name = _HF_CLASSES[arch]
    a = arch + "."
    if "token_embd.weight" not in gf.tensors:
        raise QeditError(f"{gf.path.name}: tensor token_embd.weight is missing; not a complete {arch} model")
    common: dict[str, object] = {
        "architectures": [class_name],
        "vocab_size": gf.tensors["token_embd.weight"].shape[0],
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "bos_token_id": _field(gf, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(gf, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _field(gf, "tokenizer.ggml.padding_token_id", None),
    }
    heads = _int(gf, a + "attention.head_count")
    hidden = _int(gf, a + "embedding_length")
    if arch == "gpt2":
        cfg = dict(
            n_embd=hidden, n_layer=_int(gf, a + "block_count"), n_head=heads,
            n_positions=_int(gf, a + "context_length"), n_inner=_int(gf, a + "feed_forward_length", None),
            layer_norm_epsilon=float(_field(gf, a + "attention.layer_norm_epsilon", 1e-5)),
        )
        return AutoConfig.for_model(model_type, **common, **cfg)
    head_dim = _int(gf, a + "attention.key_length", _int(gf, a + "rope.dimension_count", hidden // heads))
    rope_dims = _int(gf, a + "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise QeditError(f"{gf.path.name}: partial rotary ({rope_dims} of {head_dim} dims) is not supported")
    theta = float(_field(gf, a + "rope.freq_base", 10000.0))
    cfg = dict(
        hidden_size=hidden, intermediate_size=_int(gf, a + "feed_forward_length"),
        num_hidden_layers=_int(gf, a + "block_count"), num_attention_heads=heads,
        num_key_value_heads=_int(gf, a + "attention.head_count_kv", heads), head_dim=head_dim,
        max_position_embeddings=_int(gf, a + "context_length"),
        rms_norm_eps=float(_field(gf, a + "attention.layer_norm_rms_epsilon")),
    )
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in gf.tensors
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in gf.tensors
    if arch != "gemma3":
        cfg["rope_parameters"] = _rope_parameters(gf, arch, theta, head_dim)
        return AutoConfig.for_model(model_type, **common, **cfg)
    n_layers = cfg["num_hidden_layers"]
    pattern = _field(gf, a + "attention.sliding_window_pattern", 6)  # llama.cpp hard-codes 6 for gemma3
    if isinstance(pattern, list):  # per layer: true = sliding window
        is_swa = [bool(x) for x in pattern]
    else:
        is_swa = [(i + 1) % int(pattern) != 0 for i in range(n_layers)]
    if len(is_swa) != n_layers:
        raise QeditError(f"{gf.path.name}: sliding_window_pattern has {len(is_swa)} entries for {n_layers} layers")
    full = _rope_parameters(gf, arch, theta, head_dim)
    local = {"rope_type": "default", "rope_theta": float(_field(gf, a + "rope.freq_base_swa", 10000.0))}
    cfg.update(
        sliding_window=_int(gf, a + "attention.sliding_window"),
        layer_types=["sliding_attention" if s else "full_attention" for s in is_swa],
        rope_parameters={"full_attention": full, "sliding_attention": local},
        # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(hidden/heads)
        query_pre_attn_scalar=hidden // heads if n_layers == 62 else head_dim,
        final_logit_softcapping=_field(gf, a + "final_logit_softcapping", None),
        attn_logit_softcapping=_field(gf, a + "attn_logit_softcapping", None),
    )
    return AutoConfig.for_model(model_type, **common, **cfg)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new nn.Parameter on the meta device (no memory, no init cost); buffers stay real,
    so rotary tables and embedding scales are computed as usual. Patches `nn.Module.register_parameter`
    for the duration: do not build other modules on another thread meanwhile."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _transform_for(arch: str, config: PretrainedConfig) -> Transform:
    """Undo llama.cpp's HF -> GGUF tensor transforms (input and output are float32)."""

    def unpermute(t: torch.Tensor, n_head: int) -> torch.Tensor:
        # GGUF rows are per head [half0 interleaved with half1]; HF wants [first half, second half]
        rows = t.shape[0]  # t: (n_head * head_dim, hidden)
        return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    def transform(gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            return t - 1.0  # Gemma RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
        if arch == "llama" and gguf_name.endswith(".attn_q.weight"):
            return unpermute(t, config.num_attention_heads)
        if arch == "llama" and gguf_name.endswith(".attn_k.weight"):
            return unpermute(t, config.num_key_value_heads)
        if arch == "gpt2" and gguf_name.endswith(_GPT2_CONV1D):
            return t.T.contiguous()  # (out, in) in GGUF -> Conv1D (in, out)
        return t

    return transform


def build_model(
    gf: GGUFFile,
    config: PretrainedConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
) -> PreTrainedModel:
    """Instantiate the HF model for `config` with its weights decoded from `gf`."""
    import transformers

    arch = _supported_arch(gf)
    if not dtype.is_floating_point:
        raise QeditError(f"dtype must be a floating point torch dtype, got {dtype}")
    model_cls = getattr(transformers, _HF_CLASSES[arch][1])
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained does, so float buffers get the model dtype
    try:
        with _parameters_on_meta():
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    name_map = gguf.TensorNameMap(_gguf_arch(arch), config.num_hidden_layers)
    transform = _transform_for(arch, config)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for hf_name, param in model.named_parameters():  # tied parameters are listed once
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name not in gf.tensors:
            raise QeditError(
                f"{gf.path.name}: no GGUF tensor for HF parameter {hf_name} (expected {gguf_name}); "
                f"the file is incomplete or not a standard {arch} export"
            )
        info = gf.tensors[gguf_name]
        values = torch.empty(info.shape, dtype=torch.float32)  # shape: GGUF numpy order
        gf.dequantize_into(gguf_name, values.numpy())
        values = transform(gguf_name, values)
        if tuple(values.shape) != tuple(param.shape):
            raise QeditError(
                f"{gf.path.name}: tensor {gguf_name} has shape {tuple(info.shape)} but {hf_name} needs "
                f"{tuple(param.shape)}; the metadata does not match the tensors"
            )
        state[hf_name] = values.to(device=device, dtype=dtype)
        used.add(gguf_name)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise QeditError(f"{gf.path.name}: parameters left without weights: {', '.join(meta[:5])}")
    unused = [name for name in gf.tensors if name not in used and name != "rope_freqs.weight"]
    if unused:
        logger.warning("%s: %d GGUF tensors were not used: %s", gf.path.name, len(unused), ", ".join(unused[:5]))
    model.config.dtype = dtype
    return model.to(device).eval()


def _gguf_arch(arch: str) -> gguf.MODEL_ARCH:
    return next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def build_tokenizer(gf: GGUFFile, config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """transformers' GGUF tokenizer (as `AutoTokenizer.from_pretrained(gguf_file=...)` builds it),
    from this parser's fields, wrapped in the tokenizer class AutoTokenizer picks for `config`."""
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if "tokenizer.ggml.tokens" not in gf.fields:
        raise QeditError(f"{gf.path.name}: metadata has no tokenizer.ggml.tokens; the file carries no tokenizer")
    groups = {
        group: {name: gf.fields[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in gf.fields}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to SentencePiece by default
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = gf.fields.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise QeditError(f"{gf.path.name}: tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(gf.architecture, tokenizer_dict)
    except ValueError as err:
        raise QeditError(f"{gf.path.name}: cannot build the tokenizer: {err}") from None
    tokenizer_cls = TOKENIZER_MAPPING.get(type(config), TokenizersBackend) or TokenizersBackend
    return tokenizer_cls(tokenizer_object=backend, **tokenizer_config, **extra)

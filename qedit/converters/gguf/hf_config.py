"""An HF checkpoint directory as llama.cpp's converter reads it: config.json -> GGUF hyperparameters (the keys
every decoder shares, then each architecture's own from `_EXTRAS`), the safetensors tensors under their GGUF
names, llama.cpp's conversion transforms (`archs.to_gguf`), and deltas added row-wise. `gguf_export` writes the
file from these. A setting llama.cpp's architecture cannot hold is refused with a one-line QeditError, or, where
it only matters beyond a context length (a sliding window llama.cpp does not have), warned about: never dropped
silently."""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qedit.converters.gguf.archs import GGUFArch, Tied, arch_for_hf, name_map, to_gguf
from qedit.converters.gguf.write import RowReader
from qedit.core.arch import Orientation
from qedit.core.delta import DELTAS_FILE, LowRankDelta
from qedit.core.errors import QeditError

log = logging.getLogger(__name__)

VT = gguf.GGUFValueType
U32, F32, STR = VT.UINT32, VT.FLOAT32, VT.STRING
KV = tuple[str, Any, VT]


@dataclass(frozen=True)
class HFExport:
    """What the GGUF of an HF directory holds besides its weights, and how its weights are transformed."""

    spec: GGUFArch
    cfg: dict[str, Any]             # the HF config, transformers' defaults filled in
    kvs: list[KV]                   # the architecture's hyperparameters
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # F32 tensors llama.cpp reads besides the weights
    q_scale: float = 1.0            # folded into `q_scaled` so that llama.cpp's fixed query scale is exact (Gemma)
    q_scaled: str = ""

    @property
    def arch(self) -> str:
        return self.spec.name

    @property
    def n_layers(self) -> int:
        return int(self.cfg["num_hidden_layers"])

    @property
    def tied(self) -> bool:
        """Whether the LM head is the embedding matrix (so lm_head.weight is not read)."""
        return self.spec.tied is Tied.ALWAYS or bool(self.cfg.get("tie_word_embeddings"))

    def transform(self, name: str, w: np.ndarray) -> np.ndarray:
        """llama.cpp's HF -> GGUF transform of tensor `name` (the inverse of the loader's); never in place."""
        heads = int(self.cfg["num_attention_heads"])
        w = to_gguf(self.spec, name, w, heads, int(self.cfg.get("num_key_value_heads") or heads))
        return w * np.float32(self.q_scale) if self.q_scale != 1.0 and name.endswith(self.q_scaled) else w


@dataclass(frozen=True)
class _Dims:
    label: str
    a: str            # "{arch}."
    hidden: int
    heads: int
    head_dim: int
    n_layers: int
    rope: dict[str, Any]  # the (full-attention) rope parameters
    theta: float

    def fail(self, what: str) -> QeditError:
        return QeditError(f"{self.label}: {what}")


def _read_hf_config(directory: Path) -> tuple[dict[str, Any], GGUFArch]:
    from transformers import AutoConfig

    path = directory / "config.json"
    if not path.is_file():
        raise QeditError(f"{directory}: not a model directory (no config.json); give an HF directory or a .gguf file")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QeditError(f"{path}: not valid JSON ({exc}); expected an HF config.json") from None
    spec = arch_for_hf(raw.get("model_type") if isinstance(raw, dict) else None, str(path))
    try:
        cfg = AutoConfig.from_pretrained(directory, local_files_only=True).to_dict()  # with the class defaults
    except (ValueError, TypeError, KeyError) as exc:
        raise QeditError(f"{path}: transformers cannot read this config ({exc})") from None
    return cfg, spec


def _need(cfg: Mapping[str, Any], key: str, label: str) -> Any:
    if cfg.get(key) is None:
        raise QeditError(f"{label}: config has no {key!r}; cannot write the GGUF hyperparameters")
    return cfg[key]


def _llama3_factors(theta: float, head_dim: int, scaling: Mapping[str, Any]) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 rope scaling: a divisor per rotary frequency, float32 (head_dim/2,)."""
    factor, low = float(scaling["factor"]), float(scaling.get("low_freq_factor", 1.0))
    high, original = float(scaling.get("high_freq_factor", 4.0)), float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (head_dim/2,)
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)  # 0: low frequency, 1: high
    return (1.0 / ((1.0 - smooth) / factor + smooth)).astype(np.float32)


def _rope_kvs(d: _Dims, llama3: bool = False) -> tuple[list[KV], dict[str, np.ndarray]]:
    """rope.scaling.* entries (and llama3's rope_freqs tensor) for the config's rope parameters."""
    kind, a, rope = d.rope.get("rope_type") or "default", d.a, d.rope
    try:
        if kind == "linear":
            return [(a + "rope.scaling.type", "linear", STR), (a + "rope.scaling.factor", float(rope["factor"]), F32)], {}
        if kind == "yarn":
            return [(a + "rope.scaling.type", "yarn", STR), (a + "rope.scaling.factor", float(rope["factor"]), F32),
                    (a + "rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]), U32)], {}
        if kind == "llama3" and llama3:
            return [], {"rope_freqs.weight": _llama3_factors(d.theta, d.head_dim, rope)}
    except KeyError as exc:
        raise d.fail(f"rope scaling {kind!r} needs {exc.args[0]!r}") from None
    if kind != "default":
        raise d.fail(f"rope type {kind!r} cannot be exported for {d.a[:-1]} (default, linear, yarn"
                     f"{', llama3' if llama3 else ''})")
    return [], {}


def _plain_head(d: _Dims) -> None:
    if d.head_dim * d.heads != d.hidden:
        raise d.fail(f"head_dim {d.head_dim} * {d.heads} heads != hidden_size {d.hidden}; llama.cpp's {d.a[:-1]} "
                     "sizes its attention by hidden_size / num_attention_heads")


def _no_sliding_window(cfg: Mapping[str, Any], d: _Dims) -> None:
    if cfg.get("use_sliding_window"):
        raise d.fail(f"use_sliding_window is true, which llama.cpp's {d.a[:-1]} does not implement")


def _warn_window(cfg: Mapping[str, Any], d: _Dims, why: str) -> None:
    window, context = cfg.get("sliding_window"), cfg.get("max_position_embeddings")
    if isinstance(window, int) and window > 0 and (context is None or window < context):
        log.warning("%s: sliding_window %d is dropped (%s): llama.cpp attends over the whole context, so outputs "
                    "differ from transformers' beyond %d tokens", d.label, window, why, window)


_Extras = tuple[list[KV], dict[str, np.ndarray], float, str]  # kvs, extra tensors, q scale, q-scaled tensor suffix


def _llama_like(cfg: Mapping[str, Any], d: _Dims) -> list[KV]:
    """What llama.cpp's LlamaModel writes beyond the common keys (also SmolLM3 and Granite)."""
    return [(d.a + "vocab_size", int(_need(cfg, "vocab_size", d.label)), U32),
            (d.a + "rope.dimension_count", d.head_dim, U32)]


def _llama(cfg: Mapping[str, Any], d: _Dims) -> _Extras:
    _warn_window(cfg, d, "llama.cpp's llama has no sliding window")  # Mistral 7B v0.1
    kvs, extra = _rope_kvs(d, llama3=True)
    return _llama_like(cfg, d) + kvs, extra, 1.0, ""


def _qwen3(cfg: Mapping[str, Any], d: _Dims) -> _Extras:
    _no_sliding_window(cfg, d)
    return *_rope_kvs(d), 1.0, ""


def _qwen2(cfg: Mapping[str, Any], d: _Dims) -> _Extras:
    _plain_head(d)  # llama.cpp's qwen2 builds attn_q as (hidden, hidden)
    return _qwen3(cfg, d)


def _gemma2(cfg: Mapping[str, Any], d: _Dims) -> _Extras:
    a = d.a
    caps = {k: cfg.get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping")}
    if None in caps.values() or cfg.get("attention_bias") or cfg.get("hidden_activation") != "gelu_pytorch_tanh":
        raise d.fail("llama.cpp's gemma2 always soft-caps attention and final logits, has no attention bias and uses "
                     f"gelu_pytorch_tanh; this config has {caps}, attention_bias {cfg.get('attention_bias')}, "
                     f"hidden_activation {cfg.get('hidden_activation')!r}")
    kvs = [(a + k, float(v), F32) for k, v in caps.items()]
    kvs.append((a + "attention.sliding_window", int(_need(cfg, "sliding_window", d.label)), U32))
    layer_types = cfg.get("layer_types") or []
    is_swa = [t == "sliding_attention" for t in layer_types]
    if is_swa != [i % 2 == 0 for i in range(d.n_layers)]:  # llama.cpp's default: every other layer, from 0
        kvs.append((a + "attention.sliding_window_pattern", is_swa, VT.ARRAY, VT.BOOL))
    rope_kvs, extra = _rope_kvs(d)
    llama_scalar = d.hidden // d.heads if d.n_layers == 46 else d.head_dim  # what llama.cpp scales queries by
    q_scale = math.sqrt(llama_scalar / float(cfg.get("query_pre_attn_scalar") or d.head_dim))
    return kvs + rope_kvs, extra, q_scale, ".attn_q.weight"  # gemma2 has no q_norm: the query rows are scaled


def _gemma3(cfg: Mapping[str, Any], d: _Dims) -> _Extras:
    a = d.a
    if cfg.get("attn_logit_softcapping") is not None:
        raise d.fail("attn_logit_softcapping is set, which llama.cpp's gemma3 does not support")
    kvs: list[KV] = []
    if cfg.get("final_logit_softcapping") is not None:
        kvs.append((a + "final_logit_softcapping", float(cfg["final_logit_softcapping"]), F32))
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        if layer_types != ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(d.n_layers)]:
            raise d.fail("layer_types differ from llama.cpp's gemma3 pattern (every 6th layer global)")
        kvs.append((a + "attention.sliding_window", int(_need(cfg, "sliding_window", d.label)), U32))
    local = (cfg.get("rope_parameters") or {}).get("sliding_attention") or {}
    if float(local.get("rope_theta", 1e4)) != 1e4:
        log.warning("%s: llama.cpp runs gemma3's sliding-window layers with rope base 10000, not the config's", d.label)
    rope_kvs, extra = _rope_kvs(d)
    llama_scalar = d.hidden // d.heads if d.n_layers == 62 else d.head_dim  # what llama.cpp scales queries by
    q_scale = math.sqrt(llama_scalar / float(cfg.get("query_pre_attn_scalar") or d.head_dim))
    return kvs + rope_kvs, extra, q_scale, ".attn_q_norm.weight"


def _phi3(cfg: Mapping[str, Any], d: _Dims) -> _Extras:
    _plain_head(d)
    _warn_window(cfg, d, "llama.cpp disables phi3's sliding window")
    rope, a = d.rope, d.a
    rope_dims = int(float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0)) * d.head_dim)
    context = int(_need(cfg, "max_position_embeddings", d.label))
    original = int(rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
                   or context)
    kvs = [(a + "rope.dimension_count", rope_dims, U32), (a + "rope.scaling.original_context_length", original, U32)]
    kind = rope.get("rope_type") or "default"
    if kind == "longrope":
        factors = {f"rope_factors_{k}.weight": np.asarray(rope[f"{k}_factor"], dtype=np.float32) for k in ("long", "short")}
        if any(f.shape != (rope_dims // 2,) for f in factors.values()):
            raise d.fail(f"longrope factors must have rotary_dim/2 = {rope_dims // 2} entries each")
        scale = context / original
        attn = rope.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        return kvs + [(a + "rope.scaling.attn_factor", float(attn), F32)], factors, 1.0, ""
    if kind != "default":
        raise d.fail(f"rope type {kind!r} cannot be exported for phi3 (default or longrope)")
    return kvs, {}, 1.0, ""


def _smollm3(cfg: Mapping[str, Any], d: _Dims) -> _Extras:
    _no_sliding_window(cfg, d)
    if list(cfg.get("no_rope_layers") or []) != [int((i + 1) % 4 != 0) for i in range(d.n_layers)]:
        raise d.fail("no_rope_layers differ from llama.cpp's smollm3 (rope off in every 4th layer)")
    kvs, extra = _rope_kvs(d)
    return _llama_like(cfg, d) + kvs, extra, 1.0, ""


def _granite(cfg: Mapping[str, Any], d: _Dims) -> _Extras:
    _plain_head(d)
    a = d.a
    scales = [(a + "attention.scale", "attention_multiplier"), (a + "embedding_scale", "embedding_multiplier"),
              (a + "residual_scale", "residual_multiplier"), (a + "logit_scale", "logits_scaling")]
    kvs = [(key, float(_need(cfg, name, d.label)), F32) for key, name in scales]
    rope_kvs, extra = _rope_kvs(d)
    return _llama_like(cfg, d) + kvs + rope_kvs, extra, 1.0, ""


def _olmo2(cfg: Mapping[str, Any], d: _Dims) -> _Extras:
    _plain_head(d)
    return *_rope_kvs(d), 1.0, ""


_EXTRAS: dict[str, Callable[[Mapping[str, Any], _Dims], _Extras]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3,
    "smollm3": _smollm3, "granite": _granite, "olmo2": _olmo2,
}


def hf_export(directory: Path) -> HFExport:
    """The GGUF hyperparameters, extra tensors and transforms of the HF model in `directory`."""
    cfg, spec = _read_hf_config(directory)
    label = str(directory / "config.json")
    if spec.name not in _EXTRAS:
        raise QeditError(f"{label}: {spec.name} models cannot be exported to GGUF")
    hidden, heads, n_layers = (int(_need(cfg, k, label)) for k in ("hidden_size", "num_attention_heads",
                                                                    "num_hidden_layers"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    params = cfg.get("rope_parameters") or {}
    rope = params.get("full_attention", params)
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 1e4)))
    d = _Dims(label, spec.name + ".", hidden, heads, head_dim, n_layers, rope, theta)
    if spec.tied is Tied.ALWAYS and not cfg.get("tie_word_embeddings", True):
        raise d.fail(f"tie_word_embeddings is false, but llama.cpp's {spec.name} always uses the embedding as LM head")
    a = d.a
    kvs: list[KV] = [
        (a + "context_length", int(_need(cfg, "max_position_embeddings", label)), U32),
        (a + "embedding_length", hidden, U32), (a + "block_count", n_layers, U32),
        (a + "feed_forward_length", int(_need(cfg, "intermediate_size", label)), U32),
        (a + "attention.head_count", heads, U32),
        (a + "attention.head_count_kv", int(cfg.get("num_key_value_heads") or heads), U32),
        (a + "attention.key_length", head_dim, U32), (a + "attention.value_length", head_dim, U32),
        (a + "rope.freq_base", theta, F32),
        (a + "attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-6)), F32),
    ]
    more, extra, q_scale, q_scaled = _EXTRAS[spec.name](cfg, d)
    return HFExport(spec, cfg, kvs + more, extra, q_scale, q_scaled)


def hf_tensors(directory: Path, exp: HFExport) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """GGUF name -> (safetensors file, HF name, shape), without reading any tensor data."""
    from safetensors import SafetensorError, safe_open

    files = sorted(p for p in directory.glob("*.safetensors") if p.name != DELTAS_FILE)
    if not files:
        raise QeditError(f"{directory}: no .safetensors weights; only safetensors directories can be exported")
    names = name_map(exp.arch, exp.n_layers)
    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                items = [(k, tuple(fh.get_slice(k).get_shape())) for k in fh.keys()]  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError) as exc:
            raise QeditError(f"{path}: unreadable safetensors file ({exc})") from None
        for hf_name, shape in items:
            if (exp.tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None or name in out:
                raise QeditError(f"{path.name}: tensor {hf_name!r} has no (or a duplicate) GGUF name for {exp.arch}")
            out[name] = (path, hf_name, shape)
    if "token_embd.weight" not in out:
        raise QeditError(f"{directory}: the weights have no token embedding; the checkpoint is incomplete")
    if exp.spec.tied is Tied.NEVER and "output.weight" not in out:  # llama.cpp's olmo2 needs its own LM head
        out["output.weight"] = out["token_embd.weight"]
    return out


def hf_groups(directory: Path, deltas: Sequence[LowRankDelta],
               tensors: Mapping[str, tuple[Path, str, tuple[int, ...]]]) -> dict[str, list[LowRankDelta]]:
    """GGUF name -> the deltas on that HF weight, each checked against its stored shape."""
    by_hf = {hf: (name, shape) for name, (_, hf, shape) in tensors.items()}
    out: dict[str, list[LowRankDelta]] = {}
    for d in deltas:
        if d.name not in by_hf:
            raise QeditError(f"delta targets {d.name!r}, which {directory} does not have")
        name, shape = by_hf[d.name]
        stored = d.shape if d.orientation is Orientation.OUT_IN else d.shape[::-1]
        if tuple(stored) != shape:
            raise QeditError(f"delta for {d.name} has stored shape {tuple(stored)} but the weight is {shape}")
        out.setdefault(name, []).append(d)
    return out


def hf_rows(path: Path, hf_name: str, name: str, group: Sequence[LowRankDelta],
             transform: Callable[[str, np.ndarray], np.ndarray]) -> RowReader:
    """Row reader of an HF tensor with its deltas added and llama.cpp's transform applied (loaded now)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        w = fh.get_tensor(hf_name).to(torch.float32)  # HF layout, e.g. (out, in)
    w = transform(name, (w + sum(d.stored_dense().detach().cpu() for d in group)).numpy() if group else w.numpy())
    rows = w.reshape(-1, w.shape[-1])  # (n_rows, n_cols)
    return lambda lo, hi: rows[lo:hi]

"""An HF checkpoint directory as llama.cpp's converter reads it: config.json -> GGUF hyperparameters, the
safetensors tensors under their GGUF names, llama.cpp's conversion transforms, and deltas added row-wise.
`gguf_export` writes the file from these."""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qedit.converters.gguf.write import RowReader
from qedit.core.arch import Orientation
from qedit.core.delta import DELTAS_FILE, LowRankDelta
from qedit.core.errors import QeditError

log = logging.getLogger(__name__)

VT = gguf.GGUFValueType
HF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}  # model_type -> GGUF


def gguf_arch(arch: str) -> gguf.MODEL_ARCH | None:
    """gguf-py's enum of a GGUF architecture name, or None when gguf-py does not know it."""
    return next((key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)


def read_config(directory: Path) -> tuple[dict[str, Any], str]:
    path = directory / "config.json"
    if not path.is_file():
        raise QeditError(f"{directory}: not a model directory (no config.json); give an HF directory or a .gguf file")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QeditError(f"{path}: not valid JSON ({exc}); expected an HF config.json") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in HF_ARCHS:
        raise QeditError(f"{path}: model_type {model_type!r} cannot be exported to GGUF; "
                         f"supported: {', '.join(sorted(HF_ARCHS))}")
    return cfg, HF_ARCHS[model_type]


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


def hf_hparams(cfg: Mapping[str, Any], arch: str, label: str) -> tuple[list[tuple[str, Any, VT]], np.ndarray | None, float]:
    """GGUF hparam entries as llama.cpp's converter writes them, the llama3 rope_freqs (or None), and
    the factor folded into Gemma's q_norm so that llama.cpp's 1/sqrt(head_dim) query scale is exact."""
    a, U, F32 = arch + ".", VT.UINT32, VT.FLOAT32
    hidden, heads, n_layers = (int(_need(cfg, k, label)) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    params = cfg.get("rope_parameters") or {}
    full, local = params.get("full_attention", params), params.get("sliding_attention", {})
    theta = float(full.get("rope_theta", cfg.get("rope_theta", 1e6 if arch == "gemma3" else 1e4)))
    kvs: list[tuple[str, Any, VT]] = [
        (a + "context_length", int(_need(cfg, "max_position_embeddings", label)), U),
        (a + "embedding_length", hidden, U), (a + "block_count", n_layers, U),
        (a + "feed_forward_length", int(_need(cfg, "intermediate_size", label)), U),
        (a + "attention.head_count", heads, U), (a + "attention.head_count_kv", int(cfg.get("num_key_value_heads") or heads), U),
        (a + "attention.key_length", head_dim, U), (a + "attention.value_length", head_dim, U),
        (a + "rope.freq_base", theta, F32), (a + "attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-6)), F32),
    ]
    if arch == "llama":
        kvs += [(a + "vocab_size", int(_need(cfg, "vocab_size", label)), U), (a + "rope.dimension_count", head_dim, U)]
    scaling = cfg.get("rope_scaling") or full
    kind, rope_freqs = scaling.get("rope_type", scaling.get("type")) or "default", None
    try:
        if kind == "linear":
            kvs += [(a + "rope.scaling.type", "linear", VT.STRING), (a + "rope.scaling.factor", float(scaling["factor"]), F32)]
        elif kind == "yarn":
            kvs += [(a + "rope.scaling.type", "yarn", VT.STRING), (a + "rope.scaling.factor", float(scaling["factor"]), F32),
                    (a + "rope.scaling.original_context_length", int(scaling["original_max_position_embeddings"]), U)]
        elif kind == "llama3" and arch == "llama":
            rope_freqs = _llama3_factors(theta, head_dim, scaling)
        elif kind != "default":
            raise QeditError(f"{label}: rope type {kind!r} cannot be exported (default, linear, yarn; llama3 for llama)")
    except KeyError as exc:
        raise QeditError(f"{label}: rope scaling {kind!r} needs {exc.args[0]!r}") from None
    if arch != "gemma3":
        return kvs, rope_freqs, 1.0
    if cfg.get("attn_logit_softcapping") is not None:
        raise QeditError(f"{label}: attn_logit_softcapping is set, which llama.cpp's gemma3 does not support")
    if cfg.get("final_logit_softcapping") is not None:
        kvs.append((a + "final_logit_softcapping", float(cfg["final_logit_softcapping"]), F32))
    pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
    layer_types = cfg.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                             for i in range(n_layers)]
    if any(t != "full_attention" for t in layer_types):
        if layer_types != ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]:
            raise QeditError(f"{label}: layer_types differ from llama.cpp's gemma3 pattern (every 6th layer global)")
        kvs.append((a + "attention.sliding_window", int(_need(cfg, "sliding_window", label)), U))
    if float(local.get("rope_theta", cfg.get("rope_local_base_freq", 1e4))) != 1e4:
        log.warning("%s: llama.cpp runs gemma3's sliding-window layers with rope base 10000, not the config's", label)
    llama_scalar = hidden // heads if n_layers == 62 else head_dim  # what llama.cpp scales queries by
    return kvs, None, math.sqrt(llama_scalar / float(cfg.get("query_pre_attn_scalar", head_dim)))


def hf_transform(arch: str, cfg: Mapping[str, Any], q_scale: float) -> Callable[[str, np.ndarray], np.ndarray]:
    """llama.cpp's HF -> GGUF tensor transforms (the inverse of gguf_to_torch's); never in place."""
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        # HF rows per head are [first half, second half]; llama.cpp interleaves them. w: (n_head * head_dim, ...)
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def transform(name: str, w: np.ndarray) -> np.ndarray:
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + np.float32(1.0)  # Gemma RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
            return w * np.float32(q_scale) if name.endswith("attn_q_norm.weight") and q_scale != 1.0 else w
        if arch == "llama" and name.endswith((".attn_q.weight", ".attn_q.bias")):
            return permute(w, heads)
        if arch == "llama" and name.endswith((".attn_k.weight", ".attn_k.bias")):
            return permute(w, kv_heads)
        return w

    return transform


def hf_tensors(directory: Path, arch: str, n_layers: int, tied: bool) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """GGUF name -> (safetensors file, HF name, shape), without reading any tensor data."""
    from safetensors import SafetensorError, safe_open

    files = sorted(p for p in directory.glob("*.safetensors") if p.name != DELTAS_FILE)
    if not files:
        raise QeditError(f"{directory}: no .safetensors weights; only safetensors directories can be exported")
    name_map = gguf.TensorNameMap(gguf_arch(arch), n_layers)
    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                items = [(k, tuple(fh.get_slice(k).get_shape())) for k in fh.keys()]  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError) as exc:
            raise QeditError(f"{path}: unreadable safetensors file ({exc})") from None
        for hf_name, shape in items:
            if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None or name in out:
                raise QeditError(f"{path.name}: tensor {hf_name!r} has no (or a duplicate) GGUF name for {arch}")
            out[name] = (path, hf_name, shape)
    if "token_embd.weight" not in out:
        raise QeditError(f"{directory}: the weights have no token embedding; the checkpoint is incomplete")
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

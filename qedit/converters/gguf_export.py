"""Export a model as a fresh GGUF file of any llama.cpp file type (F16, Q8_0, Q4_K_M, ...).

Tensor types follow llama.cpp's quant mixes (`qedit.kernels.mixes`), then `type_overrides`, with
llama.cpp's fallback for row lengths that do not fit (logged with the tensor name). From a GGUF file,
all metadata is copied byte for byte except file_type/quantization_version and the qedit manifest (appended
to); a tensor with no delta whose type stays is copied, any other is dequantized, gets its delta and is
re-encoded. From an HF directory (also a qedit output, whose deltas are folded in already), hparams come
from config.json, tensors get llama.cpp's conversion transforms, and tokenizer metadata is copied from a
GGUF or built by `gguf_vocab` (see `gguf_write.tokenizer_kvs`). Streamed one tensor (or row chunk) at a
time and written atomically.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qedit.converters.gguf_aware import EditEncoding
from qedit.converters.gguf_keys import edit_keys_kvs, is_keys_field, merged_keys, read_edit_keys
from qedit.converters.gguf_patch import MANIFEST_KEY, VERSION_KEY, group_deltas, manifest_kvs, read_manifests
from qedit.converters.gguf_read import GGUFFile
from qedit.converters.gguf_write import (KVEntry, RowReader, TensorSpec, copied_kvs, encode_kv, encoded_tensor,
                                         reencoded_tensor, source_tensor, tokenizer_kvs, write_gguf)
from qedit.arch import Orientation
from qedit.delta import DELTAS_FILE, LowRankDelta
from qedit.errors import QeditError
from qedit.io_utils import refuse_same_file
from qedit.kernels import get_kernel, mix_model_from_metadata, plan_tensor_types, resolve_type
from qedit.kernels.mixes import ftype_from_name

log = logging.getLogger(__name__)

T, VT = gguf.GGMLQuantizationType, gguf.GGUFValueType
QUANTIZATION_VERSION = 2  # llama.cpp's GGML_QNT_VERSION
_REWRITTEN = frozenset({"general.file_type", "general.quantization_version", MANIFEST_KEY, VERSION_KEY})
_HF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
_STORAGE = frozenset({T.F32, T.F16, T.BF16})


@dataclass(frozen=True)
class ExportReport:
    """What `export_gguf` wrote. `requantized` counts tensors encoded anew (all of them from HF)."""

    src: Path
    dst: Path
    ftype: str                      # e.g. "Q4_K_M"
    tensor_types: dict[str, str]    # GGUF tensor name -> type name, in file order
    size: int                       # bytes
    seconds: float
    copied: int                     # tensors copied byte for byte from the source
    requantized: int
    source_kind: str = "gguf"       # "gguf" or "hf"
    edited: tuple[str, ...] = ()    # GGUF tensors that received a delta
    n_manifests: int = 0            # qedit manifests in the output
    tokenizer: str = "source"       # where the tokenizer metadata came from


def _ftype_name(ft: gguf.LlamaFileType) -> str:
    return ft.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _ftype_kvs(ft: gguf.LlamaFileType) -> list[KVEntry]:
    return [encode_kv("general.quantization_version", QUANTIZATION_VERSION, VT.UINT32),
            encode_kv("general.file_type", int(ft), VT.UINT32)]


def _gguf_arch(arch: str) -> gguf.MODEL_ARCH | None:
    return next((key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)


def _resolver(arch: str, n_layers: int, names: Collection[str]) -> Callable[[str, str], str]:
    """(GGUF or HF tensor name, what) -> GGUF tensor name, or a QeditError naming `what`."""
    gguf_arch = _gguf_arch(arch)
    name_map = gguf.TensorNameMap(gguf_arch, n_layers) if gguf_arch is not None else None

    def find(key: str, what: str) -> str:
        mapped = key if key in names or name_map is None else name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped not in names:
            raise QeditError(f"{what} {key!r}: no such tensor (GGUF or HF name) in this {arch} model")
        return mapped

    return find


def _final_types(plan: dict[str, T], shapes: Mapping[str, tuple[int, ...]], find: Callable[[str, str], str],
                 overrides: Mapping[str, str] | None) -> dict[str, T]:
    """The mix's types with `overrides` (GGUF or HF name -> type name) on top, with llama.cpp's fallback."""
    types = dict(plan)
    for key, value in (overrides or {}).items():
        name = find(key, "type override for")
        try:
            requested = get_kernel(value).ggml_type
        except QeditError as exc:
            raise QeditError(f"type override for {key!r}: {exc}") from None
        if sum(d > 1 for d in shapes[name]) < 2 and requested not in _STORAGE:
            raise QeditError(f"type override for {key!r}: {name} is 1-D; llama.cpp needs it in F32, F16 or BF16")
        types[name] = resolve_type(requested, shapes[name][-1], tensor_name=name)[0]
        log.info("type override: %s -> %s", name, types[name].name)
    return types


def _importance(importance: Mapping[str, np.ndarray] | None, find: Callable[[str, str], str],
                shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, vec in (importance or {}).items():
        name = find(key, "importance for")
        if not isinstance(vec, np.ndarray) or vec.dtype != np.float32 or vec.shape != (shapes[name][-1],):
            got = f"{vec.dtype} {vec.shape}" if isinstance(vec, np.ndarray) else type(vec).__name__
            raise QeditError(f"importance for {key!r}: expected float32 ({shapes[name][-1]},) (one value per input "
                             f"column of {name}), got {got}")
        out[name] = vec
    return out


def export_gguf(
    model: Path,
    dst: Path,
    ftype: str,
    *,
    deltas: Sequence[LowRankDelta] = (),
    manifest: dict | None = None,
    type_overrides: Mapping[str, str] | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
    template: Path | None = None,
    progress: bool = False,
    encoding: EditEncoding | None = None,
    keys: Mapping[int, Any] | None = None,
) -> ExportReport:
    """Write `model` (a .gguf file or an HF/qedit output directory) to `dst` as a GGUF of `ftype`.

    `deltas` (HF weight names) are added before encoding; `manifest` is recorded as `qedit.manifest`
    (appended to the source's); `type_overrides` maps GGUF or HF tensor names to GGML type names;
    `importance` maps tensor names to float32 (n_cols,) per-column importance for the quantizer (used by
    the tensors that are re-encoded; it does not force a copied tensor to be re-encoded); `template`
    is a .gguf whose tokenizer metadata an HF export copies. `encoding` makes the encoding of edited
    tensors edit-aware (GGUF sources; an HF source is encoded plainly). `keys` (layer -> (n, d)), the
    edit's keys, are recorded after those a GGUF source records (`qedit.converters.gguf_keys`), as a
    patch records them.
    """
    start = time.perf_counter()
    src, dst = Path(model), Path(dst)
    ft = ftype_from_name(ftype)
    if not src.exists():
        raise QeditError(f"{src}: no such file or directory; give a .gguf file or an HF model directory")
    refuse_same_file(dst, src)
    if src.is_dir() and dst.resolve().is_relative_to(src.resolve()):
        raise QeditError(f"{dst}: refusing to write the output inside its source directory {src}; choose another path")
    if dst.is_dir():
        raise QeditError(f"{dst}: is a directory; give the path of the .gguf file to write")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"export {dst.name}", unit="tensor")
    try:
        if src.is_dir():
            if encoding is not None:
                log.warning("%s: edit-aware encoding applies to GGUF sources; the HF export is encoded plainly", src)
            report = _from_hf(src, dst, ft, deltas, manifest, type_overrides, importance, template, bar, keys)
        else:
            report = _from_gguf(src, dst, ft, deltas, manifest, type_overrides, importance, template, bar, encoding,
                                keys)
    finally:
        if bar is not None:
            bar.close()
    report = replace(report, seconds=time.perf_counter() - start)
    log.info("wrote %s: %s, %d tensors (%d copied, %d encoded), %d bytes, %.1f s", dst, report.ftype,
             len(report.tensor_types), report.copied, report.requantized, report.size, report.seconds)
    return report


def _progress(bar: Any, total: int) -> Callable[[TensorSpec], None] | None:
    if bar is None:
        return None
    bar.reset(total=total)
    return lambda spec: bar.update(1)


# ---- source: a GGUF file ----------------------------------------------------------------------------


def _from_gguf(src: Path, dst: Path, ft: gguf.LlamaFileType, deltas: Sequence[LowRankDelta], manifest: dict | None,
               overrides: Mapping[str, str] | None, importance: Mapping[str, np.ndarray] | None,
               template: Path | None, bar: Any, encoding: EditEncoding | None = None,
               keys: Mapping[int, Any] | None = None) -> ExportReport:
    from qedit.api import qedit_version

    if template is not None:
        log.warning("template %s is ignored: a GGUF source keeps its own tokenizer metadata", template)
    gf = GGUFFile(src)
    try:
        shapes = {name: info.shape for name, info in gf.tensors.items()}
        changes = group_deltas(gf, deltas)
        model = mix_model_from_metadata(gf.fields, list(gf.tensors))
        plan = plan_tensor_types(ft, shapes, model, source_types={n: i.ggml_type for n, i in gf.tensors.items()})
        find = _resolver(gf.architecture, model.n_layers, shapes)
        types = _final_types(plan, shapes, find, overrides)
        weights = _importance(importance, find, shapes)
        specs: list[TensorSpec] = []
        copied = 0
        for name, info in gf.tensors.items():
            if name not in changes and types[name] == info.ggml_type:
                if name in weights:
                    log.warning("importance for %s is unused: the tensor is copied unchanged", name)
                specs.append(TensorSpec(name, info.shape, info.ggml_type, source_tensor(gf, name)))
                copied += 1
            elif encoding is not None and name in changes and types[name] not in _STORAGE:
                specs.append(_aware_tensor(gf, name, types[name], changes[name], encoding, weights.get(name)))
            else:
                specs.append(reencoded_tensor(gf, name, types[name], changes.get(name, []), weights.get(name)))
        meta, n_manifests = manifest_kvs(read_manifests(gf), manifest, qedit_version())
        meta += edit_keys_kvs(merged_keys(read_edit_keys(gf), keys or {}))
        kept = [k for k in gf.fields if k not in _REWRITTEN and not is_keys_field(k)]
        kvs = copied_kvs(gf, kept) + _ftype_kvs(ft) + meta
        size = write_gguf(dst, kvs, specs, alignment=gf.alignment, on_tensor=_progress(bar, len(specs)))
    finally:
        gf.close()
    return ExportReport(src, dst, _ftype_name(ft), {s.name: s.ggml_type.name for s in specs}, size, 0.0, copied,
                        len(specs) - copied, "gguf", tuple(changes), n_manifests, "source")


def _aware_tensor(gf: GGUFFile, name: str, ggml_type: T, deltas: Sequence[LowRankDelta], encoding: EditEncoding,
                  importance: np.ndarray | None) -> TensorSpec:
    """An edited tensor encoded edit-aware when the writer reaches it (plainly if its layer has no keys)."""
    def produce() -> np.ndarray:
        w0 = np.array(gf.dequantize(name), dtype=np.float32, copy=True)                     # (rows, cols)
        change = sum(d.dense() for d in deltas).detach().cpu().numpy().astype(np.float32)  # (rows, cols)
        encoded = encoding.encode(name, deltas[-1].layer, w0, change, ggml_type)
        if encoded is not None:
            return encoded.data
        from qedit.kernels import quantize_tensor

        return quantize_tensor(w0 + change, ggml_type, importance)

    return TensorSpec(name, gf.tensors[name].shape, ggml_type, produce)


# ---- source: an HF directory --------------------------------------------------------------------------


def _read_config(directory: Path) -> tuple[dict[str, Any], str]:
    path = directory / "config.json"
    if not path.is_file():
        raise QeditError(f"{directory}: not a model directory (no config.json); give an HF directory or a .gguf file")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QeditError(f"{path}: not valid JSON ({exc}); expected an HF config.json") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in _HF_ARCHS:
        raise QeditError(f"{path}: model_type {model_type!r} cannot be exported to GGUF; "
                         f"supported: {', '.join(sorted(_HF_ARCHS))}")
    return cfg, _HF_ARCHS[model_type]


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


def _hparams(cfg: Mapping[str, Any], arch: str, label: str) -> tuple[list[tuple[str, Any, VT]], np.ndarray | None, float]:
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


def _transform(arch: str, cfg: Mapping[str, Any], q_scale: float) -> Callable[[str, np.ndarray], np.ndarray]:
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


def _hf_tensors(directory: Path, arch: str, n_layers: int, tied: bool) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """GGUF name -> (safetensors file, HF name, shape), without reading any tensor data."""
    from safetensors import SafetensorError, safe_open

    files = sorted(p for p in directory.glob("*.safetensors") if p.name != DELTAS_FILE)
    if not files:
        raise QeditError(f"{directory}: no .safetensors weights; only safetensors directories can be exported")
    name_map = gguf.TensorNameMap(_gguf_arch(arch), n_layers)
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


def _hf_groups(directory: Path, deltas: Sequence[LowRankDelta],
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


def _hf_rows(path: Path, hf_name: str, name: str, group: Sequence[LowRankDelta],
             transform: Callable[[str, np.ndarray], np.ndarray]) -> RowReader:
    """Row reader of an HF tensor with its deltas added and llama.cpp's transform applied (loaded now)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        w = fh.get_tensor(hf_name).to(torch.float32)  # HF layout, e.g. (out, in)
    w = transform(name, (w + sum(d.stored_dense().detach().cpu() for d in group)).numpy() if group else w.numpy())
    rows = w.reshape(-1, w.shape[-1])  # (n_rows, n_cols)
    return lambda lo, hi: rows[lo:hi]


def _from_hf(src: Path, dst: Path, ft: gguf.LlamaFileType, deltas: Sequence[LowRankDelta], manifest: dict | None,
             overrides: Mapping[str, str] | None, importance: Mapping[str, np.ndarray] | None,
             template: Path | None, bar: Any, keys: Mapping[int, Any] | None = None) -> ExportReport:
    from qedit.api import qedit_version

    cfg, arch = _read_config(src)
    hparams, rope_freqs, q_scale = _hparams(cfg, arch, str(src / "config.json"))
    n_layers = int(cfg["num_hidden_layers"])
    tensors = _hf_tensors(src, arch, n_layers, tied=bool(cfg.get("tie_word_embeddings", arch == "gemma3")))
    shapes = {name: shape for name, (_, _, shape) in tensors.items()}
    if rope_freqs is not None:
        shapes["rope_freqs.weight"] = rope_freqs.shape
    fields = {"general.architecture": arch, **{key: value for key, value, _ in hparams}}
    plan = plan_tensor_types(ft, shapes, mix_model_from_metadata(fields, list(shapes)))
    find = _resolver(arch, n_layers, shapes)
    types, weights = _final_types(plan, shapes, find, overrides), _importance(importance, find, shapes)
    changes = _hf_groups(src, deltas, tensors)
    transform = _transform(arch, cfg, q_scale)
    tokenizer, where = tokenizer_kvs(src, arch, template, shapes["token_embd.weight"][0])
    freqs = None if rope_freqs is None else rope_freqs.reshape(1, -1)  # (1, head_dim/2)
    specs = []
    for name in plan:  # llama.cpp's (block, name) order
        if name == "rope_freqs.weight":
            reader: Callable[[], RowReader] = lambda: lambda lo, hi: freqs[lo:hi]  # noqa: E731
        else:
            path, hf_name, _ = tensors[name]
            reader = partial(_hf_rows, path, hf_name, name, changes.get(name, []), transform)
        specs.append(encoded_tensor(name, shapes[name], types[name], reader, weights.get(name)))
    meta, n_manifests = manifest_kvs([], manifest, qedit_version())
    meta += edit_keys_kvs(merged_keys({}, keys or {}))
    general = [encode_kv("general.architecture", arch, VT.STRING), encode_kv("general.type", "model", VT.STRING),
               encode_kv("general.name", src.resolve().name, VT.STRING)]
    kvs = general + [encode_kv(*kv) for kv in hparams] + tokenizer + _ftype_kvs(ft) + meta
    size = write_gguf(dst, kvs, specs, on_tensor=_progress(bar, len(specs)))
    return ExportReport(src, dst, _ftype_name(ft), {s.name: s.ggml_type.name for s in specs}, size, 0.0, 0,
                        len(specs), "hf", tuple(changes), n_manifests, where)

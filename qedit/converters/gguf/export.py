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

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qedit.converters.gguf.archs import gguf_arch
from qedit.converters.gguf.aware import EditEncoding
from qedit.converters.gguf.hf_config import hf_export, hf_groups, hf_rows, hf_tensors
from qedit.converters.gguf.keys import carried_kvs, is_keys_field
from qedit.converters.gguf.patch import MANIFEST_KEY, VERSION_KEY, group_deltas, manifest_kvs, read_manifests
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.rows import TensorReader
from qedit.converters.gguf.write import (
    KVEntry,
    RowReader,
    TensorSpec,
    copied_kvs,
    encode_kv,
    encoded_tensor,
    reencoded_tensor,
    source_tensor,
    tokenizer_kvs,
    write_gguf,
)
from qedit.core.delta import LowRankDelta
from qedit.core.errors import QeditError
from qedit.core.files import refuse_same_file
from qedit.core.version import qedit_version
from qedit.kernels import get_kernel, mix_model_from_metadata, plan_tensor_types, quantize_tensor, resolve_type
from qedit.kernels.mixes import ftype_from_name

log = logging.getLogger(__name__)

T, VT = gguf.GGMLQuantizationType, gguf.GGUFValueType
QUANTIZATION_VERSION = 2  # llama.cpp's GGML_QNT_VERSION
_REWRITTEN = frozenset({"general.file_type", "general.quantization_version", MANIFEST_KEY, VERSION_KEY})
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


def _resolver(arch: str, n_layers: int, names: Collection[str]) -> Callable[[str, str], str]:
    """(GGUF or HF tensor name, what) -> GGUF tensor name, or a QeditError naming `what`."""
    known = gguf_arch(arch)
    name_map = gguf.TensorNameMap(known, n_layers) if known is not None else None

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
    replaced_keys: Mapping[int, Any] | None = None,
) -> ExportReport:
    """Write `model` (a .gguf file or an HF/qedit output directory) to `dst` as a GGUF of `ftype`.

    `deltas` (HF weight names) are added before encoding; `manifest` is recorded as `qedit.manifest`
    (appended to the source's); `type_overrides` maps GGUF or HF tensor names to GGML type names;
    `importance` maps tensor names to float32 (n_cols,) per-column importance for the quantizer (used by
    the tensors that are re-encoded; it does not force a copied tensor to be re-encoded); `template`
    is a .gguf whose tokenizer metadata an HF export copies. `encoding` makes the encoding of edited
    tensors edit-aware (GGUF sources; an HF source is encoded plainly). `keys` (layer -> (n, d)), the
    edit's keys, are recorded after those a GGUF source records (`qedit.converters.gguf.keys`), as a
    patch records them; `replaced_keys` (layer -> (m, d)), of earlier facts the edit replaces, are taken out.
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
                                keys, replaced_keys)
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
               keys: Mapping[int, Any] | None = None, replaced_keys: Mapping[int, Any] | None = None) -> ExportReport:

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
        meta += carried_kvs(gf, keys, replaced_keys)
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
        w0 = TensorReader(gf).tensor(name)                                                   # (rows, cols)
        change = sum(d.dense() for d in deltas).detach().cpu().numpy().astype(np.float32)  # (rows, cols)
        encoded = encoding.encode(name, deltas[-1].layer, w0, change, ggml_type)
        if encoded is not None:
            return encoded.data

        return quantize_tensor(w0 + change, ggml_type, importance)

    return TensorSpec(name, gf.tensors[name].shape, ggml_type, produce)


# ---- source: an HF directory (config and weights read by gguf_hf) ------------------------------------


def _from_hf(src: Path, dst: Path, ft: gguf.LlamaFileType, deltas: Sequence[LowRankDelta], manifest: dict | None,
             overrides: Mapping[str, str] | None, importance: Mapping[str, np.ndarray] | None,
             template: Path | None, bar: Any, keys: Mapping[int, Any] | None = None) -> ExportReport:

    exp = hf_export(src)
    arch, n_layers, hparams = exp.arch, exp.n_layers, exp.kvs
    tensors = hf_tensors(src, exp)
    shapes = {name: shape for name, (_, _, shape) in tensors.items()}
    shapes.update({name: values.shape for name, values in exp.extra.items()})  # rope_freqs, rope_factors_*: (n,)
    fields = {"general.architecture": arch, **{kv[0]: kv[1] for kv in hparams}}
    plan = plan_tensor_types(ft, shapes, mix_model_from_metadata(fields, list(shapes)))
    find = _resolver(arch, n_layers, shapes)
    types, weights = _final_types(plan, shapes, find, overrides), _importance(importance, find, shapes)
    changes = hf_groups(src, deltas, tensors)
    tokenizer, where = tokenizer_kvs(src, arch, template, shapes["token_embd.weight"][0])
    specs = []
    for name in plan:  # llama.cpp's (block, name) order
        if name in exp.extra:
            rows = exp.extra[name].reshape(1, -1)  # (1, n)
            reader: Callable[[], RowReader] = partial(lambda r: lambda lo, hi: r[lo:hi], rows)
        else:
            path, hf_name, _ = tensors[name]
            reader = partial(hf_rows, path, hf_name, name, changes.get(name, []), exp.transform)
        specs.append(encoded_tensor(name, shapes[name], types[name], reader, weights.get(name)))
    meta, n_manifests = manifest_kvs([], manifest, qedit_version())
    meta += carried_kvs(None, keys)
    general = [encode_kv("general.architecture", arch, VT.STRING), encode_kv("general.type", "model", VT.STRING),
               encode_kv("general.name", src.resolve().name, VT.STRING)]
    kvs = general + [encode_kv(*kv) for kv in hparams] + tokenizer + _ftype_kvs(ft) + meta
    size = write_gguf(dst, kvs, specs, on_tensor=_progress(bar, len(specs)))
    return ExportReport(src, dst, _ftype_name(ft), {s.name: s.ggml_type.name for s in specs}, size, 0.0, 0,
                        len(specs), "hf", tuple(changes), n_manifests, where)

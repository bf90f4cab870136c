"""Write edits into a GGUF file: a streaming copy where only the edited tensors are re-encoded.

The patched file keeps every original key-value entry byte for byte (copied from the source's byte
ranges, so the 262k-entry vocabulary is never re-encoded), appends `qedit.manifest` (JSON; a JSON list
when the source already had a manifest) and `qedit.version`, rewrites the tensor-info section with
recomputed offsets, and copies untouched tensors from the source memmap in chunks. An edited tensor
is dequantized, gets W += dW in float32, and is requantized to its original type (or an override)
with `qedit.kernels`. The output is written to a temp file beside `dst` and renamed into place.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qedit.converters.gguf.aware import EditEncoding, EncodedTensor
from qedit.converters.gguf.keys import CarriedKeys, carried_kvs, carried_lines, is_keys_field, read_carried
from qedit.converters.gguf.names import gguf_tensor_name
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.rows import TensorReader
from qedit.converters.gguf.write import KVEntry, TensorSpec, copied_kvs, encode_kv, source_tensor, write_gguf
from qedit.core.delta import LowRankDelta
from qedit.core.errors import QeditError
from qedit.core.files import refuse_same_file
from qedit.core.model import is_gguf_file
from qedit.core.version import qedit_version
from qedit.kernels import quantize_tensor

log = logging.getLogger(__name__)

MANIFEST_KEY = "qedit.manifest"
VERSION_KEY = "qedit.version"


@dataclass(frozen=True)
class PatchedTensor:
    """One re-encoded tensor of a patched GGUF."""

    name: str                # GGUF tensor name
    hf_name: str             # the delta's HF weight name
    type_before: str
    type_after: str
    bytes_before: int
    bytes_after: int
    kept: float | None = None        # edit-aware path: share of the edit's output change at its keys kept
    kept_naive: float | None = None  # ... and what plain requantization would have kept


@dataclass
class PatchReport:
    src: Path
    dst: Path
    tensors: list[PatchedTensor]
    size_before: int
    size_after: int
    seconds: float
    n_manifests: int = 1     # manifests in the output (more than 1 when the source was already patched)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size_change(self) -> int:
        return self.size_after - self.size_before


def read_manifests(gf: GGUFFile) -> list[dict[str, Any]]:
    """The qedit manifests stored in a GGUF file, oldest first ([] when it has none)."""
    raw = gf.fields.get(MANIFEST_KEY)
    if raw is None:
        return []
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError as exc:
        raise QeditError(f"{gf.path.name}: metadata {MANIFEST_KEY} is not valid JSON ({exc}); the file is corrupt") from None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(m, dict) for m in items):
        raise QeditError(f"{gf.path.name}: metadata {MANIFEST_KEY} must be a JSON object or a list of objects")
    return items


def replacement_records(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The earlier facts one manifest's edit replaced (`info.replaces`, qedit.pipeline.conflicts)."""
    return [r for r in ((manifest.get("info") or {}).get("replaces") or []) if isinstance(r, dict)]


def replaced_by(manifests: Sequence[Mapping[str, Any]]) -> dict[tuple[int, int], int]:
    """(edit, fact) of every fact a later edit replaced (1-based edit, 0-based fact) -> that later edit."""
    return {(int(r.get("patch", 0)), int(r.get("fact", -1))): i for i, m in enumerate(manifests, 1)
            for r in replacement_records(m)}


def stored_edits(path: Any) -> tuple[list[dict[str, Any]], dict[int, CarriedKeys]]:
    """The qedit manifests of the GGUF file `path`, oldest first, and the edit keys it carries per layer, from one
    read of its header (([], {}) for other files and files without them)."""
    if path is None or not is_gguf_file(Path(path)):
        return [], {}
    with GGUFFile(Path(path)) as gf:
        return read_manifests(gf), read_carried(gf)


def manifest_kvs(previous: Sequence[dict[str, Any]], manifest: dict[str, Any] | None,
                 version: str) -> tuple[list[KVEntry], int]:
    """The `qedit.manifest` (earlier manifests plus `manifest`; one JSON object, or a list when there are
    several) and `qedit.version` entries, and the number of manifests recorded."""
    manifests = list(previous) + ([manifest] if manifest is not None else [])
    out = []
    if manifests:
        value = json.dumps(manifests[0] if len(manifests) == 1 else manifests, default=str)
        out.append(encode_kv(MANIFEST_KEY, value, gguf.GGUFValueType.STRING))
    out.append(encode_kv(VERSION_KEY, version, gguf.GGUFValueType.STRING))
    return out, len(manifests)


def group_deltas(gf: GGUFFile, deltas: Sequence[LowRankDelta]) -> dict[str, list[LowRankDelta]]:
    """GGUF tensor name -> the deltas on it, each checked against the tensor's (rows, cols) = (out, in)."""
    groups: dict[str, list[LowRankDelta]] = {}
    for d in deltas:
        name = gguf_tensor_name(gf, d.name)
        info = gf.tensors[name]
        if tuple(d.shape) != tuple(info.shape):
            raise QeditError(f"{gf.path.name}: delta for {d.name} has shape {tuple(d.shape)} (out, in) "
                             f"but {name} is {tuple(info.shape)}; the delta belongs to another model")
        groups.setdefault(name, []).append(d)
    return groups


def summed_changes(gf: GGUFFile, deltas: Sequence[LowRankDelta]) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF tensor name -> (HF name, summed dW as float32 in GGUF numpy order (rows, cols) = (out, in))."""
    return {name: (group[-1].name, sum(d.dense() for d in group).detach().cpu().numpy().astype(np.float32))
            for name, group in group_deltas(gf, deltas).items()}


_UNROUNDED = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def _requantize(gf: GGUFFile, name: str, layer: int, change: np.ndarray, new_type: gguf.GGMLQuantizationType,
                encoding: EditEncoding | None = None) -> tuple[bytes, EncodedTensor | None]:

    info = gf.tensors[name]
    reader = TensorReader(gf)   # pread: the file's pages stay out of the resident set
    w0 = reader.tensor(name)    # (rows, cols) float32
    if new_type == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(w0 + change).tobytes(), None
    try:
        if encoding is not None and new_type not in _UNROUNDED:
            same = new_type == info.ggml_type   # the file's blocks can be kept where they still fit
            original = reader.raw_rows(name, 0, w0.shape[0]) if same else None
            encoded = encoding.encode(name, layer, w0, change, new_type, original)
            if encoded is not None:
                return encoded.data.tobytes(), encoded
        data = quantize_tensor(w0 + change, new_type)  # uint8 (rows, row_bytes)
    except QeditError as exc:
        raise QeditError(f"{gf.path.name}: cannot re-encode {name} {info.shape} as {new_type.name}: {exc}") from None
    return data.tobytes(), None


def _resolve_overrides(gf: GGUFFile, overrides: Mapping[str, Any] | None,
                       hf_to_gguf: Mapping[str, str]) -> dict[str, gguf.GGMLQuantizationType]:
    """Type overrides keyed by GGUF or HF name -> by GGUF name."""
    out: dict[str, gguf.GGMLQuantizationType] = {}
    for key, value in (overrides or {}).items():
        name = hf_to_gguf.get(key, key)
        if name not in hf_to_gguf.values():
            raise QeditError(f"type override for {key!r}: that tensor is not edited; overrides apply to edited tensors only")
        try:
            out[name] = gguf.GGMLQuantizationType(value) if not isinstance(value, str) else gguf.GGMLQuantizationType[value.upper()]
        except (KeyError, ValueError):
            raise QeditError(f"type override for {key!r}: {value!r} is not a GGML type") from None
    return out


def patch_gguf(src: Path, dst: Path, deltas: Sequence[LowRankDelta], manifest: dict[str, Any],
               type_overrides: Mapping[str, Any] | None = None, encoding: EditEncoding | None = None,
               keys: Mapping[int, Any] | None = None, replaced_keys: Mapping[int, Any] | None = None) -> PatchReport:
    """Copy GGUF `src` to `dst` with `deltas` added to their tensors and `manifest` in the metadata.

    Only edited tensors change; every other tensor and every original key-value entry is copied
    byte for byte. `type_overrides` maps an edited tensor (GGUF or HF name) to a new GGML type.
    `encoding` (edit keys and covariances) makes the re-encoding edit-aware; None requantizes plainly.
    `keys` (layer -> (n, d)), the new edit's keys, are recorded after those `src` already records
    (`qedit.converters.gguf.keys`), so that a later patch of `dst` can protect this edit; `replaced_keys`
    (layer -> (m, d)), of earlier facts the edit replaces, are taken out of them.
    """

    src, dst = Path(src), Path(dst)
    refuse_same_file(dst, src)
    start = time.perf_counter()
    gf = GGUFFile(src)
    try:
        changes = summed_changes(gf, deltas)
        layers = {name: group[-1].layer for name, group in group_deltas(gf, deltas).items()}
        overrides = _resolve_overrides(gf, type_overrides, {hf: g for g, (hf, _) in changes.items()})
        new_bytes: dict[str, bytes] = {}
        report: list[PatchedTensor] = []
        for name, (hf_name, change) in changes.items():
            info = gf.tensors[name]
            new_type = overrides.get(name, info.ggml_type)
            new_bytes[name], enc = _requantize(gf, name, layers[name], change, new_type, encoding)
            report.append(PatchedTensor(name, hf_name, info.ggml_type.name, new_type.name,
                                        info.nbytes, len(new_bytes[name]),
                                        None if enc is None else enc.kept, None if enc is None else enc.kept_naive))
            log.info("%s: re-encoded %s as %s", src.name, name, new_type.name)
        meta, n_manifests = manifest_kvs(read_manifests(gf), manifest, qedit_version())
        kept = copied_kvs(gf, [k for k in gf.fields if k not in (MANIFEST_KEY, VERSION_KEY) and not is_keys_field(k)])
        meta += carried_kvs(gf, keys, replaced_keys)
        tensors = [TensorSpec(info.name, info.shape, overrides.get(info.name, info.ggml_type),
                              (lambda data=new_bytes[info.name]: data) if info.name in new_bytes
                              else source_tensor(gf, info.name))
                   for info in gf.tensors.values()]
        size_after = write_gguf(dst, kept + meta, tensors, alignment=gf.alignment, version=gf.version)
    finally:
        gf.close()
    log.info("wrote %s (%d tensors re-encoded)", dst, len(report))
    return PatchReport(src, dst, report, gf.file_size, size_after, time.perf_counter() - start, n_manifests)


def inspect_lines(path: Path) -> list[str]:
    """A human-readable summary of a GGUF file: its qedit manifests, then tensor types with counts and bytes."""
    with GGUFFile(path) as gf:
        manifests = read_manifests(gf)
        lines = [f"{gf.path.name}: GGUF v{gf.version}, {gf.architecture}, {len(gf.tensors)} tensors, {gf.file_size:,} bytes"]
        if not manifests:
            lines.append("no qedit manifest")
        later = replaced_by(manifests)
        for i, m in enumerate(manifests, 1):
            facts = m.get("facts") or []
            subjects = ", ".join(str(f.get("subject", "?")) for f in facts[:8] if isinstance(f, dict))
            more = f", ... (+{len(facts) - 8})" if len(facts) > 8 else ""
            ranks = m.get("ranks") or {}
            lines += [
                (f"qedit edit {i} of {len(manifests)}: method {m.get('method', '?')}, "
                 f"qedit {m.get('qedit_version', '?')}, created {m.get('created', '?')}"),
                f"  facts: {len(facts)} ({subjects}{more})",
                f"  layers: {m.get('layers', '?')}; ranks: "
                + (", ".join(f"{k}={v}" for k, v in ranks.items()) if isinstance(ranks, dict) else str(ranks)),
                f"  source sha256: {m.get('source_sha256', '?')}",
            ]
            lines += [f"  replaces fact {r.get('fact', 0) + 1} of edit {r.get('patch', '?')} ({r.get('subject', '?')}: "
                      f"{r.get('old_target', '?')!r} -> {r.get('new_target', '?')!r})"
                      for r in replacement_records(m)]
            lines += [f"  fact {j + 1} ({f.get('subject', '?') if isinstance(f, dict) else '?'}) was replaced by edit "
                      f"{later[(i, j)]}" for j, f in enumerate(facts) if (i, j) in later]
        lines += carried_lines(gf)
        if VERSION_KEY in gf.fields:
            lines.append(f"written by qedit {gf.fields[VERSION_KEY]}")
        by_type: dict[str, list[int]] = {}
        for info in gf.tensors.values():
            entry = by_type.setdefault(info.ggml_type.name, [0, 0])
            entry[0] += 1
            entry[1] += info.nbytes
    lines.append(f"{'type':<8} {'tensors':>8} {'bytes':>14}")
    lines += [f"{t:<8} {n:>8} {b:>14,}" for t, (n, b) in sorted(by_type.items(), key=lambda kv: -kv[1][1])]
    return lines

"""Edit keys carried in a patched GGUF file, so that later patches protect earlier edits.

A sequential user patches a file, then patches the output again. Two things need the keys k* of the
edits already in the file: MEMIT and AlphaEdit keep their update off earlier keys (the solve's prior,
`EditContext.history`), and the edit-aware encoding keeps the requantized tensor's outputs at those
keys where they were (`EditEncoding`). Without them each patch re-rounds the earlier edits' tensors
blind, and the edits decay patch after patch.

Both uses need only the keys' Gram matrix sum_i k_i k_i^T, never the keys one by one. So the state is
bounded: once a layer carries more than `rank` keys (or more than their width d), they are replaced by at
most `rank` rows L whose Gram L^T L is the best rank-`rank` approximation of theirs (L = S V^T of the keys'
thin SVD, top rows): exact up to float16 rounding while the keys span at most `rank` directions. A file
keeps the same state size however many facts it carries.

Storage, per edited layer L (llama.cpp ignores unknown keys; the tensor list, which it checks, is
unchanged):

    qedit.edit_keys.blk.L          ARRAY UINT16, rows * d: float16 bits of the unit rows (rows, d), row-major
    qedit.edit_keys.blk.L.shape    ARRAY UINT32, [rows, d]
    qedit.edit_keys.blk.L.norms    ARRAY FLOAT32, rows: each row's length (a key is norm * unit row)
    qedit.edit_keys.blk.L.facts    UINT32: the edits' keys the rows stand for (> rows once compacted)
    qedit.edit_keys.blk.L.sha256   STRING: sha256 of the unit-row bytes then the norm bytes

Files written before the bounded form carry `qedit.edit_keys.blk.L` as ARRAY FLOAT32 raw keys with a
`.shape` only; they are read as they are and written in the bounded form by the next patch.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qedit.converters.gguf.aware import as_numpy
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gguf.write import KVEntry, encode_kv
from qedit.core.errors import QeditError
from qedit.core.model import is_gguf_file

KEYS_PREFIX = "qedit.edit_keys.blk."
KEYS_RANK = 256          # rows kept per layer; the Gram of the rows dropped is what compaction loses
_KEY_RE = re.compile(r"^qedit\.edit_keys\.blk\.(\d+)(\.shape|\.norms|\.facts|\.sha256)?$")
_DAMAGED = "patch an intact copy of the file, or the unedited model again"
VT = gguf.GGUFValueType


def is_keys_field(key: str) -> bool:
    """True for the metadata entries this module owns."""
    return _KEY_RE.match(key) is not None


@dataclass(frozen=True)
class CarriedKeys:
    """The edit keys one layer of a file carries: `units` (rows, d) float16 unit rows and `norms` (rows,)
    float32, standing for the keys of `facts` edits (more than `rows` once compacted)."""

    units: np.ndarray
    norms: np.ndarray
    facts: int

    def __post_init__(self) -> None:
        if self.units.ndim != 2 or self.units.dtype != np.float16 or self.norms.shape != (self.units.shape[0],):
            raise ValueError(f"CarriedKeys: units must be float16 (rows, d) with one norm a row, got "
                             f"{self.units.dtype} {self.units.shape} and norms {self.norms.shape}")
        if self.facts < self.units.shape[0]:
            raise ValueError(f"CarriedKeys: {self.units.shape[0]} rows cannot stand for {self.facts} facts")

    @classmethod
    def from_keys(cls, keys: Any) -> CarriedKeys:
        """Encode the float keys (n, d) of n edits."""
        k = as_numpy(keys, np.float64)                                          # (n, d)
        if k.ndim != 2:
            raise QeditError(f"edit keys must be (n, d), got shape {k.shape}")
        norms = np.linalg.norm(k, axis=1)                                       # (n,)
        units = k / np.where(norms > 0, norms, 1.0)[:, None]                    # (n, d) unit rows (zero rows stay 0)
        return cls(units.astype(np.float16), norms.astype(np.float32), int(k.shape[0]))

    @property
    def rows(self) -> int:
        return int(self.units.shape[0])

    @property
    def width(self) -> int:
        return int(self.units.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.units.nbytes + self.norms.nbytes)

    def keys(self, dtype: Any = np.float32) -> np.ndarray:
        """(rows, d) rows of `dtype` whose Gram stands for the facts' keys' Gram."""
        return self.units.astype(dtype) * self.norms.astype(dtype)[:, None]

    def digest(self) -> str:
        return hashlib.sha256(self.units.tobytes() + self.norms.tobytes()).hexdigest()

    def plus(self, new: Any, rank: int = KEYS_RANK) -> CarriedKeys:
        """These keys and `new` (n, d) float keys, compacted to `rank` rows when they would hold more."""
        k = as_numpy(new, np.float64)                                           # (n, d)
        if k.ndim != 2 or k.shape[1] != self.width:
            raise QeditError(f"edit keys: the file records {self.width}-wide keys but the new edit's have shape "
                             f"{k.shape}; the file was edited on another model")
        add = CarriedKeys.from_keys(k)
        units, norms = np.concatenate([self.units, add.units]), np.concatenate([self.norms, add.norms])
        return CarriedKeys(units, norms, self.facts + add.facts).bounded(rank)   # earlier rows keep their bytes

    def bounded(self, rank: int = KEYS_RANK) -> CarriedKeys:
        """These keys, compacted when they hold more rows than `rank`, or than their width (past which compaction
        loses nothing but float16 rounding)."""
        return self if self.rows <= min(rank, self.width) else self.compacted(rank)

    def compacted(self, rank: int) -> CarriedKeys:
        """`rank` rows whose Gram is the best rank-`rank` approximation of this Gram (float64 SVD)."""
        if rank < 1:
            raise QeditError(f"edit keys: the rank kept must be >= 1, got {rank}")
        k = self.keys(np.float64)                                                # (rows, d)
        _, s, vt = np.linalg.svd(k, full_matrices=False)                   # s (m,), vt (m, d), m = min(rows, d)
        spanned = int(np.count_nonzero(s > s[0] * 1e-7)) if s.size and s[0] > 0 else 1   # directions with energy
        top = min(rank, max(spanned, 1))
        return CarriedKeys(vt[:top].astype(np.float16), s[:top].astype(np.float32), self.facts)

    def minus(self, old: Any) -> CarriedKeys | None:
        """These keys with `old` (m, d) float keys taken out of their Gram (the keys of replaced facts), or None
        when no fact is left. Negative curvature left by keys recomputed on edited weights is dropped."""
        k = as_numpy(old, np.float64)                                           # (m, d)
        rows = self.keys(np.float64)                                             # (rows, d)
        facts = self.facts - k.shape[0]
        if facts <= 0:
            return None
        q, _ = np.linalg.qr(np.concatenate([rows, k]).T)                        # (d, m'), the span of both
        a, b = rows @ q, k @ q                                                  # (rows, m'), (m, m')
        w, v = np.linalg.eigh(a.T @ a - b.T @ b)                                # ascending, (m',), (m', m')
        order = np.argsort(w)[::-1][: min(facts, self.rows)]
        keep = order[w[order] > max(float(w.max()), 0.0) * 1e-7]
        basis = (q @ v[:, keep]).T                                              # (kept, d) orthonormal rows
        return CarriedKeys(basis.astype(np.float16), np.sqrt(w[keep]).astype(np.float32), facts)

    def kvs(self, layer: int) -> list[KVEntry]:
        name = f"{KEYS_PREFIX}{layer}"
        return [encode_kv(name, self.units.reshape(-1).view(np.uint16), VT.ARRAY, VT.UINT16),
                encode_kv(f"{name}.shape", [self.rows, self.width], VT.ARRAY, VT.UINT32),
                encode_kv(f"{name}.norms", self.norms, VT.ARRAY, VT.FLOAT32),
                encode_kv(f"{name}.facts", self.facts, VT.UINT32),
                encode_kv(f"{name}.sha256", self.digest(), VT.STRING)]


def read_carried(gf: GGUFFile) -> dict[int, CarriedKeys]:
    """layer -> the edit keys recorded in `gf` ({} when there are none), checked against their checksum."""
    out: dict[int, CarriedKeys] = {}
    for key in gf.fields:
        m = _KEY_RE.match(key)
        if m is None or m.group(2):
            continue
        out[int(m.group(1))] = _read_layer(gf, key)
    return out


def _read_layer(gf: GGUFFile, key: str) -> CarriedKeys:
    fields, where = gf.fields, f"{gf.path.name}: metadata {key!r}"
    shape, values = fields.get(f"{key}.shape"), fields[key]
    if not isinstance(shape, list) or len(shape) != 2 or not isinstance(values, list):
        raise QeditError(f"{where} needs a 2-entry {key + '.shape'!r} array; the qedit edit keys are corrupt; {_DAMAGED}")
    n, d = (int(x) for x in shape)
    if n * d != len(values) or d <= 0:
        raise QeditError(f"{where} has {len(values)} values, but its shape is {[n, d]}; the qedit edit keys "
                         f"are corrupt; {_DAMAGED}")
    if f"{key}.norms" not in fields:      # the raw float32 keys of files written before the bounded form
        carried = CarriedKeys.from_keys(np.asarray(values, dtype=np.float32).reshape(n, d))
    else:
        norms, facts, digest = fields.get(f"{key}.norms"), fields.get(f"{key}.facts"), fields.get(f"{key}.sha256")
        if not isinstance(norms, list) or len(norms) != n or not isinstance(facts, int) or not isinstance(digest, str):
            raise QeditError(f"{where}: its .norms ({n} values), .facts or .sha256 entry is missing or malformed; "
                             f"the qedit edit keys are corrupt; {_DAMAGED}")
        units = np.asarray(values, dtype=np.uint16).view(np.float16).reshape(n, d)    # (n, d)
        try:
            carried = CarriedKeys(units, np.asarray(norms, dtype=np.float32), facts)
        except ValueError as exc:
            raise QeditError(f"{where}: {exc}; {_DAMAGED}") from None
        if carried.digest() != digest:
            raise QeditError(f"{where}: the edit keys do not match their sha256 (the file was damaged or changed "
                             f"by another tool); {_DAMAGED}")
    if not (np.isfinite(carried.units).all() and np.isfinite(carried.norms).all()):
        raise QeditError(f"{where}: the edit keys hold values that are not finite; {_DAMAGED}")
    return carried


def read_edit_keys(gf: GGUFFile) -> dict[int, np.ndarray]:
    """layer -> float32 rows (rows, d) standing for the keys of the edits recorded in `gf` ({} for none)."""
    return {layer: c.keys() for layer, c in read_carried(gf).items()}


def merged_keys(earlier: Mapping[int, Any], new: Mapping[int, Any]) -> dict[int, np.ndarray]:
    """layer -> earlier keys stacked over the new ones, float32 (n_earlier + n_new, d): what the edit-aware
    encoding keeps (the file's state is bounded separately, by `carried_kvs`)."""
    out = {int(layer): as_numpy(k, np.float32) for layer, k in earlier.items()}
    for layer, k in ((int(layer), as_numpy(k, np.float32)) for layer, k in new.items()):
        if k.ndim != 2:
            raise QeditError(f"edit keys of layer {layer} must be (n, d), got shape {k.shape}")
        before = out.get(layer)
        if before is not None and before.shape[1] != k.shape[1]:
            raise QeditError(f"edit keys of layer {layer}: the file records {before.shape[1]}-wide keys "
                             f"but the new edit's are {k.shape[1]}-wide; the file was edited on another model")
        out[layer] = k if before is None else np.concatenate([before, k])
    return out


def carried_after(earlier: Mapping[int, CarriedKeys], new: Mapping[int, Any], rank: int = KEYS_RANK,
                  removed: Mapping[int, Any] | None = None) -> dict[int, CarriedKeys]:
    """layer -> what a file carries after the keys `removed` (layer -> (m, d), of facts the new edit replaces) are
    taken out of `earlier` and `new` (layer -> (n, d) keys) is added."""
    out = dict(earlier)
    for layer, k in (removed or {}).items():
        left = out[int(layer)].minus(k) if int(layer) in out else None
        out.pop(int(layer), None)
        if left is not None:
            out[int(layer)] = left
    for layer, k in new.items():
        layer = int(layer)
        out[layer] = out[layer].plus(k, rank) if layer in out else CarriedKeys.from_keys(k).bounded(rank)
    return out


def carried_kvs(gf: GGUFFile | None, new: Mapping[int, Any] | None, removed: Mapping[int, Any] | None = None,
                rank: int = KEYS_RANK) -> list[KVEntry]:
    """The metadata entries a file written from `gf` (None: from no GGUF) carries after the edit keys `new`
    (layer -> (n, d)), with the keys `removed` (of the facts the edit replaces) taken out; layers in order."""
    state = carried_after(read_carried(gf) if gf is not None else {}, new or {}, rank, removed)
    return [kv for layer in sorted(state) for kv in state[layer].kvs(layer)]


def carried_lines(gf: GGUFFile) -> list[str]:
    """What `qedit inspect` shows of the carried keys."""
    lines = []
    for layer, c in sorted(read_carried(gf).items()):
        form = f"{c.rows} directions (compacted)" if c.facts > c.rows else f"{c.rows} keys"
        lines.append(f"edit keys recorded for blk.{layer}: {c.facts} fact(s) as {form}, {c.nbytes:,} bytes "
                     "(protected by later patches)")
    return lines


def stored_carried(path: Any) -> dict[int, CarriedKeys]:
    """layer -> the edit keys the GGUF file `path` carries ({} for other files and for files without them)."""
    if path is None or not is_gguf_file(Path(path)):
        return {}
    with GGUFFile(Path(path)) as gf:
        return read_carried(gf)


def stored_edit_keys(path: Any) -> dict[int, Any]:
    """layer -> torch float32 rows (rows, d) standing for the keys recorded in the GGUF file `path` ({} for
    other files)."""
    import torch

    return {layer: torch.from_numpy(c.keys()) for layer, c in stored_carried(path).items()}

"""The quantized artifacts of the ladder, built once and cached on disk.

GGUF files and LoRA adapters are built from the source file; GPTQ checkpoints (directories) from the
loaded torch model. Each artifact's name carries a key: the sha256 of the source model, the rung's spec, the
deltas' content (none for the unedited baseline) and the qedit version. A rerun with more rungs, or
with the same edits, finds the old files and does not rebuild them. Files are written atomically,
so an interrupted build leaves no artifact behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qedit.delta import LowRankDelta

log = logging.getLogger(__name__)


def deltas_digest(deltas: Sequence[LowRankDelta]) -> str:
    """sha256 of the deltas' names, scales and factor values (order-independent)."""
    parts = []
    for d in sorted(deltas, key=lambda d: (d.name, d.layer, float(d.scale))):
        h = hashlib.sha256()
        h.update(f"{d.name}|{d.layer}|{float(d.scale)!r}|{d.orientation}".encode())
        for t in (d.a, d.b):
            h.update(np.ascontiguousarray(t.detach().cpu().float().numpy()).tobytes())
        parts.append(h.hexdigest())
    return hashlib.sha256("".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class ArtifactStore:
    """Builds and caches the GGUF files of the ladder under `root`."""

    root: Path
    source: Path               # the model the artifacts are made from (a .gguf or an HF directory)
    source_sha256: str

    def _key(self, ftype: str, digest: str | None, kind: str) -> str:
        from qedit.api import qedit_version

        blob = json.dumps([self.source_sha256, ftype, digest, kind, qedit_version()])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _path(self, stem: str, key: str, suffix: str = ".gguf") -> Path:
        return self.root / f"{stem}-{key}{suffix}"

    def gguf(self, ftype: str, deltas: Sequence[LowRankDelta] = (), manifest: dict[str, Any] | None = None,
             encoding: Any = None) -> tuple[Path, bool]:
        """The model at `ftype`, with `deltas` added (none: the unedited baseline), their tensors encoded
        edit-aware with `encoding` (None: plainly). Returns (path, built)."""
        from qedit.converters.gguf_export import export_gguf

        digest = deltas_digest(deltas) if deltas else None
        if digest is not None and encoding is not None:
            digest += hashlib.sha256(json.dumps(encoding.digest_parts(), sort_keys=True).encode()).hexdigest()
        stem = f"{'edited' if deltas else 'base'}{'-aware' if deltas and encoding is not None else ''}-{ftype}"
        path = self._path(stem, self._key(ftype, digest, "gguf"))
        if path.is_file():
            log.info("reusing %s", path)
            return path, False
        self.root.mkdir(parents=True, exist_ok=True)
        export_gguf(self.source, path, ftype, deltas=list(deltas), manifest=manifest if deltas else None,
                    encoding=encoding if deltas else None)
        return path, True

    def on_rung(self, base: Path, deltas: Sequence[LowRankDelta]) -> Path:
        """Where the edit computed on the unedited rung file `base` is patched onto it. Keyed by `base` and
        the source edit's deltas (the rung's edit is a function of both), so a rerun reuses it unrecomputed."""
        return self._path(f"edited-onrung-{base.stem}", self._key(base.name, deltas_digest(deltas), "on-rung"))

    def lora(self, base: Path, deltas: Sequence[LowRankDelta], manifest: dict[str, Any] | None = None) -> tuple[Path, bool]:
        """A GGUF LoRA adapter of `deltas` for the base file `base`. Returns (path, built)."""
        from qedit.converters.gguf_lora import write_lora_gguf

        path = self._path("edit", self._key("lora", deltas_digest(deltas), "lora"), ".lora.gguf")
        if path.is_file():
            log.info("reusing %s", path)
            return path, False
        self.root.mkdir(parents=True, exist_ok=True)
        write_lora_gguf(base, path, list(deltas), manifest=manifest)
        return path, True


    def gptq(self, loaded: Any, bits: int, group_size: int, act_order: bool,
             seqs: Sequence[Sequence[int]]) -> tuple[Path, bool]:
        """The unedited model as a GPTQ checkpoint (qedit's solver on `seqs`). Returns (path, built)."""
        from qedit.converters.gptq_export import GPTQWriteConfig, write_gptq
        from qedit.kernels.gptq import GPTQConfig

        spec = f"gptq{bits}g{group_size}{'a' if act_order else ''}"
        path = self._path(f"base-{spec}", self._key(spec + _seq_digest(seqs), None, "gptq"), "")
        if (path / "config.json").is_file():
            log.info("reusing %s", path)
            return path, False
        self.root.mkdir(parents=True, exist_ok=True)
        write_gptq(loaded, path, GPTQWriteConfig(GPTQConfig(bits=bits, group_size=group_size, desc_act=act_order)), seqs)
        return path, True

    def gptq_patch(self, base: Path, deltas: Sequence[LowRankDelta], seqs: Sequence[Sequence[int]],
                   manifest: dict[str, Any] | None = None, keys: Any = None) -> tuple[Path, bool]:
        """The GPTQ checkpoint `base` patched with `deltas` (only the edited Linears requantized, as a user
        patches a GPTQ model); `keys` (layer -> (n, in)) make their Hessians edit-aware. Returns (path, built)."""
        from qedit.converters.gptq_export import patch_gptq

        digest = deltas_digest(deltas)
        if keys:
            digest += hashlib.sha256(b"".join(np.ascontiguousarray(keys[k].detach().cpu().float().numpy()).tobytes()
                                              for k in sorted(keys))).hexdigest()
        path = self._path(f"edited{'-aware' if keys else ''}-{base.name}",
                          self._key(base.name + _seq_digest(seqs), digest, "gptq-patch"), "")
        if (path / "config.json").is_file():
            log.info("reusing %s", path)
            return path, False
        patch_gptq(base, path, list(deltas), dict(manifest or {}), seqs, edit_keys=keys or None)
        return path, True


def _seq_digest(seqs: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(map(int, q)) for q in seqs]).encode()).hexdigest()


def gptq_bits_per_weight(directory: Path) -> tuple[float, int]:
    """(bits per weight over all tensors, total tensor bytes) of a GPTQ checkpoint: a packed `qweight`
    counts as the weights it holds; its qzeros, scales and g_idx add bytes, not weights."""
    from safetensors import safe_open

    from qedit.converters.gptq import read_checkpoint_config, safetensors_files

    bits = read_checkpoint_config(directory).bits
    n_bytes = n_weights = 0
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open handles are not mappings)
                sl = f.get_slice(name)
                numel = int(np.prod(sl.get_shape()))
                n_bytes += numel * _itemsize(sl.get_dtype())
                if name.endswith(".qweight"):
                    n_weights += numel * 32 // bits
                elif not name.endswith((".qzeros", ".scales", ".g_idx")):
                    n_weights += numel
    return 8.0 * n_bytes / max(1, n_weights), n_bytes


def _itemsize(dtype: str) -> int:
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
    return sizes.get(dtype.upper(), 1)


def bits_per_weight(path: Path) -> tuple[float, int]:
    """(bits per weight over all tensors, total tensor bytes) of a GGUF file."""
    from qedit.converters.gguf_read import GGUFFile

    with GGUFFile(path) as gf:
        n_bytes = sum(t.nbytes for t in gf.tensors.values())
        n_elems = sum(int(np.prod(t.shape)) for t in gf.tensors.values())
    return 8.0 * n_bytes / max(1, n_elems), n_bytes

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

from qedit.converters.gguf.export import export_gguf
from qedit.converters.gguf.lora import write_lora_gguf
from qedit.converters.gguf.read import GGUFFile
from qedit.converters.gptq.checkpoint import read_checkpoint_config, safetensors_files
from qedit.converters.gptq.export import GPTQWriteConfig, write_gptq
from qedit.core.delta import LowRankDelta
from qedit.core.model import LoadedModel
from qedit.core.version import qedit_version
from qedit.edit.compute import EditOutcome
from qedit.kernels.gptq import GPTQConfig

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

        blob = json.dumps([self.source_sha256, ftype, digest, kind, qedit_version()])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _path(self, stem: str, key: str, suffix: str = ".gguf") -> Path:
        return self.root / f"{stem}-{key}{suffix}"

    def gguf(self, ftype: str) -> tuple[Path, bool]:
        """The unedited model at `ftype`, exported as `qedit export` writes it. Returns (path, built)."""

        path = self._path(f"base-{ftype}", self._key(ftype, None, "gguf"))
        if path.is_file():
            log.info("reusing %s", path)
            return path, False
        self.root.mkdir(parents=True, exist_ok=True)
        export_gguf(self.source, path, ftype)
        return path, True

    def edited(self, rung: str, outcome: EditOutcome, naive: bool, hold_margin: float, verify: bool | None,
               suffix: str = ".gguf") -> Path:
        """Where a rung's edited artifact goes: keyed by the rung, the source's edit (the requests, method and
        settings it came from determine it) and how the pipeline writes it."""
        blob = json.dumps([rung, naive, hold_margin, verify, outcome.method,
                           [r.to_json() for r in outcome.requests]], sort_keys=True, default=str)
        digest = deltas_digest(outcome.deltas) + hashlib.sha256(blob.encode()).hexdigest()
        return self._path(f"edited{'-naive' if naive else ''}-{rung}", self._key(rung, digest, "edited"), suffix)

    def lora(self, base: Path, deltas: Sequence[LowRankDelta], manifest: dict[str, Any] | None = None) -> tuple[Path, bool]:
        """A GGUF LoRA adapter of `deltas` for the base file `base`. Returns (path, built)."""

        path = self._path("edit", self._key("lora", deltas_digest(deltas), "lora"), ".lora.gguf")
        if path.is_file():
            log.info("reusing %s", path)
            return path, False
        self.root.mkdir(parents=True, exist_ok=True)
        write_lora_gguf(base, path, list(deltas), manifest=manifest)
        return path, True


    def gptq(self, loaded: LoadedModel, quant: GPTQConfig, seqs: Sequence[Sequence[int]]) -> tuple[Path, bool]:
        """The unedited model as a GPTQ checkpoint (qedit's solver on `seqs`), as `qedit edit --format gptq`
        writes the unedited model it patches. Returns (path, built)."""

        spec = f"gptq{quant.bits}g{quant.group_size}{'a' if quant.desc_act else ''}"
        path = self._path(f"base-{spec}", self._key(spec + repr(quant) + _seq_digest(seqs), None, "gptq"), "")
        if (path / "config.json").is_file():
            log.info("reusing %s", path)
            return path, False
        self.root.mkdir(parents=True, exist_ok=True)
        write_gptq(loaded, path, GPTQWriteConfig(quant), seqs)
        return path, True


def _seq_digest(seqs: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(map(int, q)) for q in seqs]).encode()).hexdigest()


def gptq_bits_per_weight(directory: Path) -> tuple[float, int]:
    """(bits per weight over all tensors, total tensor bytes) of a GPTQ checkpoint: a packed `qweight`
    counts as the weights it holds; its qzeros, scales and g_idx add bytes, not weights."""
    from safetensors import safe_open


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

    with GGUFFile(path) as gf:
        n_bytes = sum(t.nbytes for t in gf.tensors.values())
        n_elems = sum(int(np.prod(t.shape)) for t in gf.tensors.values())
    return 8.0 * n_bytes / max(1, n_elems), n_bytes

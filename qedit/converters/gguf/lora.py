"""Write edits as a GGUF LoRA adapter that llama.cpp applies at run time on the unedited base file.

llama.cpp's adapter format (src/llama-adapter.cpp, convert_lora_to_gguf.py):
- metadata `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32) and
  `general.architecture`, which must equal the base model's architecture;
- per adapted weight `W` (GGUF name `<name>`, ggml ne = (in, out)) two tensors of type F32 or F16:
  `<name>.lora_a` with ne = (in, r), i.e. numpy (r, in) — our B — and `<name>.lora_b` with
  ne = (r, out), i.e. numpy (out, r) — our A. llama.cpp computes
  y = W x + s * lora_b (lora_a x) with s = user_scale * alpha / r, or s = user_scale when alpha is 0.

Exactness: several deltas on one weight are concatenated along the rank (their `scale`s folded into
A), so the adapter holds their exact sum. Every weight is padded with zero components to one common
rank R and alpha = R, so alpha / r = 1 on every weight (under llama.cpp's rule and PEFT's alike) and
the adapter at user scale 1.0 adds exactly sum(dW). Each rank-one component is balanced
(|a_i| = |b_i|) so that F16 neither underflows the small factor nor overflows the large one.
`token_embd` is refused: llama.cpp treats its factors differently (flipped for the embedding lookup)
and, with tied embeddings, also uses it as the output matrix.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qedit.converters.gguf.names import gguf_tensor_name
from qedit.converters.gguf.patch import MANIFEST_KEY, VERSION_KEY
from qedit.converters.gguf.read import GGUFFile
from qedit.core.delta import LowRankDelta
from qedit.core.errors import QeditError
from qedit.core.files import atomic_path, refuse_same_file
from qedit.core.version import qedit_version

log = logging.getLogger(__name__)

LORA_DTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
}
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16}
_FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}
_F16_MAX = float(np.finfo(np.float16).max)
_REFUSED = ("token_embd.weight",)


@dataclass(frozen=True)
class LoraTensor:
    """One adapted weight of the adapter."""

    name: str                   # GGUF tensor name in the base, e.g. blk.6.ffn_down.weight
    hf_names: tuple[str, ...]   # the deltas' HF weight names (one per combined delta)
    shape: tuple[int, int]      # (out, in) of the base weight
    rank: int                   # summed rank of the deltas on this weight
    stored_rank: int            # rank in the file after zero padding (the adapter's common rank)


@dataclass
class LoraReport:
    base: Path
    dst: Path
    architecture: str
    dtype: str
    alpha: float
    tensors: list[LoraTensor]
    size: int                   # bytes of the adapter file
    seconds: float

    @property
    def rank(self) -> int:
        """The common rank r of every lora pair; llama.cpp's scale is alpha / r = 1."""
        return self.tensors[0].stored_rank if self.tensors else 0


@dataclass
class _Factors:
    hf_names: list[str]
    shape: tuple[int, int]
    a: list[np.ndarray]         # each (out, r_k), float64, delta scale folded in
    b: list[np.ndarray]         # each (r_k, in), float64


def _check_dtype(dtype: str) -> str:
    key = dtype.upper() if isinstance(dtype, str) else ""
    if key not in LORA_DTYPES:
        raise QeditError(f"LoRA adapter dtype {dtype!r} is not supported; llama.cpp adapters take "
                         f"{' or '.join(LORA_DTYPES)}")
    return key


def _collect(gf: GGUFFile, deltas: Sequence[LowRankDelta]) -> dict[str, _Factors]:
    """GGUF tensor name -> the factors of every delta on it, checked against the base tensor."""
    out: dict[str, _Factors] = {}
    for d in deltas:
        name = gguf_tensor_name(gf, d.name)
        if name in _REFUSED:
            raise QeditError(f"{gf.path.name}: delta for {d.name} targets {name}, which llama.cpp adapts "
                             "differently (embedding lookup, tied output); edit MLP or attention weights instead")
        info = gf.tensors[name]
        if len(info.shape) != 2 or tuple(d.shape) != tuple(info.shape):
            raise QeditError(f"{gf.path.name}: delta for {d.name} has shape {tuple(d.shape)} (out, in) but "
                             f"{name} is {tuple(info.shape)}; the delta belongs to another model")
        a = d.a.detach().cpu().double().numpy() * float(d.scale)  # (out, r)
        b = d.b.detach().cpu().double().numpy()                   # (r, in)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise QeditError(f"delta for {d.name} has non-finite factors; the edit diverged, re-run it")
        entry = out.setdefault(name, _Factors([], (int(info.shape[0]), int(info.shape[1])), [], []))
        entry.hf_names.append(d.name)
        entry.a.append(a)
        entry.b.append(b)
    return out


def _balanced(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a (out, r), b (r, in) -> a', b' with a' @ b' == a @ b and |a'[:, i]| == |b'[i]| for every i."""
    na = np.linalg.norm(a, axis=0)                                # (r,)
    nb = np.linalg.norm(b, axis=1)                                # (r,)
    ok = (na > 0) & (nb > 0)
    s = np.where(ok, np.sqrt(np.where(ok, nb, 1.0) / np.where(ok, na, 1.0)), 1.0)  # (r,)
    return a * s[None, :], b / s[:, None]


def _lora_pair(factors: _Factors, rank: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a (rank, in), lora_b (out, rank)) in numpy order, zero padded to `rank`, in `dtype`."""
    a = np.concatenate(factors.a, axis=1)                         # (out, r)
    b = np.concatenate(factors.b, axis=0)                         # (r, in)
    a, b = _balanced(a, b)
    out_dim, in_dim = factors.shape
    r = a.shape[1]
    lora_b = np.zeros((out_dim, rank), dtype=np.float64)          # (out, rank)
    lora_a = np.zeros((rank, in_dim), dtype=np.float64)           # (rank, in)
    lora_b[:, :r] = a
    lora_a[:r, :] = b
    if dtype == "F16":
        peak = max(float(np.abs(lora_a).max(initial=0.0)), float(np.abs(lora_b).max(initial=0.0)))
        if peak > _F16_MAX:
            raise QeditError(f"delta for {', '.join(factors.hf_names)}: factor value {peak:.3g} exceeds the F16 "
                             f"range ({_F16_MAX:.0f}); write the adapter with dtype F32")
    np_dtype = _NUMPY_DTYPES[dtype]
    return np.ascontiguousarray(lora_a, dtype=np_dtype), np.ascontiguousarray(lora_b, dtype=np_dtype)


def write_lora_gguf(base: Path, dst: Path, deltas: Sequence[LowRankDelta], manifest: dict[str, Any] | None = None,
                    dtype: str = "F32") -> LoraReport:
    """Write `deltas` as a GGUF LoRA adapter for the GGUF model `base`, atomically, to `dst`.

    llama.cpp loads it with the unedited base (`llama_cpp.Llama(model_path=base, lora_path=dst)`, or
    `llama-cli -m base --lora dst`) and, at the default user scale 1.0, computes (W + sum dW) x on every
    edited weight. `dtype` is "F32" or "F16". `manifest` is stored as JSON under `qedit.manifest`.
    """

    base, dst = Path(base), Path(dst)
    key = _check_dtype(dtype)
    refuse_same_file(dst, base)
    if not deltas:
        raise QeditError("no deltas to write: the LoRA adapter would be empty; run an edit first")
    start = time.perf_counter()
    with GGUFFile(base) as gf:
        arch = gf.architecture
        factors = _collect(gf, deltas)
    ranks = {name: sum(x.shape[1] for x in f.a) for name, f in factors.items()}
    rank = max(ranks.values())
    if rank == 0:
        raise QeditError("every delta has rank 0: the LoRA adapter would be empty")
    pairs = {name: _lora_pair(f, rank, key) for name, f in factors.items()}
    for name, f in factors.items():
        if ranks[name] >= min(f.shape):
            log.warning("%s: LoRA rank %d is not below min%s; a dense patch would be smaller", name, ranks[name], f.shape)

    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)  # adds general.architecture, which llama.cpp checks against the base
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
            writer.add_file_type(int(_FILE_TYPES[key]))
            writer.add_name(f"qedit edit of {base.name}")
            writer.add_string(MANIFEST_KEY, json.dumps(manifest if manifest is not None else {}, default=str))
            writer.add_string(VERSION_KEY, qedit_version())
            for name, (lora_a, lora_b) in pairs.items():
                writer.add_tensor(f"{name}.lora_a", lora_a)   # ggml ne (in, rank)
                writer.add_tensor(f"{name}.lora_b", lora_b)   # ggml ne (rank, out)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    tensors = [LoraTensor(name, tuple(f.hf_names), f.shape, ranks[name], rank) for name, f in factors.items()]
    size = dst.stat().st_size
    log.info("wrote LoRA adapter %s: %d weights, rank %d, %s, %d bytes", dst, len(tensors), rank, key, size)
    return LoraReport(base, dst, arch, key, float(rank), tensors, size, time.perf_counter() - start)


def read_lora_deltas(path: Path) -> dict[str, np.ndarray]:
    """The dense change an adapter applies at user scale 1.0, per GGUF weight name: (out, in) float32.

    Reads with gguf-py (adapters are small); follows llama.cpp's scale rule alpha / r (alpha 0: 1).
    """
    reader = gguf.GGUFReader(Path(path))
    field_ = reader.get_field(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(field_.contents()) if field_ is not None else 0.0
    by_name = {t.name: t for t in reader.tensors}
    out: dict[str, np.ndarray] = {}
    for tname, t in by_name.items():
        if not tname.endswith(".lora_a"):
            continue
        name = tname[: -len(".lora_a")]
        partner = by_name.get(f"{name}.lora_b")
        if partner is None:
            raise QeditError(f"{path}: {tname} has no matching {name}.lora_b; the adapter is corrupt")
        lora_a = np.asarray(t.data, dtype=np.float32)             # (r, in)
        lora_b = np.asarray(partner.data, dtype=np.float32)       # (out, r)
        r = lora_b.shape[1]
        scale = alpha / r if alpha else 1.0
        out[name] = scale * (lora_b.astype(np.float64) @ lora_a.astype(np.float64))  # (out, in)
    return {k: v.astype(np.float32) for k, v in out.items()}

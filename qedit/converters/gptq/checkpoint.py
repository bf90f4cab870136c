"""HF GPTQ checkpoints: write one from a (possibly edited) model, read and dequantize one, patch one.

Layout (what GPTQModel 7.6 and transformers load): per quantized Linear `P`, `P.qweight` (in*bits/32,
out) int32 packed along in, `P.qzeros` (groups, out*bits/32) int32 packed along out, `P.scales`
(groups, out) float16 and `P.g_idx` (in,) int32; every other tensor as it is, in safetensors;
`config.json` with `quantization_config` and the same dict in `quantize_config.json`.

Zero points: `checkpoint_format` "gptq" (v1) stores z - 1, "gptq_v2" stores z. qedit writes v1
for symmetric grids (z = 2^(bits-1) >= 1, so every reader agrees) and v2 for asymmetric ones (a
zero point of 0 has no v1 field; GPTQModel also refuses asymmetric v1 files it did not write).
`GPTQWriteConfig.checkpoint_format` overrides this. Readers convert v1 to v2 (`v1_offset_qzeros`).

The qedit manifest (`qedit_manifest.json`, with the deltas in `qedit_deltas.safetensors`) sits next
to the checkpoint, as `qedit.core.delta.save_deltas` writes it.

This module is the file format; `gptq_calibrate` quantizes a model layer by layer, and
`gptq_export` writes, patches and loads checkpoints (`write_gptq`, `patch_gptq`, `load_dequantized`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qedit.core.errors import QeditError
from qedit.core.files import atomic_path
from qedit.kernels.gptq import (
    BITS,
    GROUP_SIZES,
    GPTQConfig,
    GPTQResult,
    dequantize_codes,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
    v1_offset_qzeros,
)

log = logging.getLogger(__name__)

QUANT_CONFIG_FILE = "quantize_config.json"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class GPTQCheckpointConfig:
    """The quantization settings of a GPTQ checkpoint, validated (from quantize_config.json or config.json)."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str          # "gptq" (v1: zero - 1 stored) or "gptq_v2"
    damp_percent: float = 0.05
    source: str = "quantize_config.json"

    def __post_init__(self) -> None:
        where = f"{self.source}"
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise QeditError(f"{where}: field 'bits' is {self.bits!r}; GPTQ supports {', '.join(map(str, BITS))}")
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise QeditError(f"{where}: field 'group_size' is {self.group_size!r}; use -1 or one of "
                             f"{', '.join(map(str, GROUP_SIZES[1:]))}")
        for name in ("sym", "desc_act"):
            if not isinstance(getattr(self, name), bool):
                raise QeditError(f"{where}: field {name!r} must be true or false, got {getattr(self, name)!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise QeditError(f"{where}: field 'checkpoint_format' is {self.checkpoint_format!r}, an unknown GPTQ format "
                             f"version; qedit reads {', '.join(CHECKPOINT_FORMATS)}")

    def solver_config(self, key_weight: float = 1.0) -> GPTQConfig:
        return GPTQConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act,
                          damp_percent=self.damp_percent, key_weight=key_weight)

    def to_json(self, true_sequential: bool, quantizer: str) -> dict[str, Any]:
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
                "sym": self.sym, "lm_head": False, "checkpoint_format": self.checkpoint_format,
                "format": self.checkpoint_format, "pack_dtype": "int32", "damp_percent": self.damp_percent,
                "true_sequential": true_sequential,
                "meta": {"quantizer": [quantizer], "damp_percent": self.damp_percent,
                         "true_sequential": true_sequential, "static_groups": False}}


def checkpoint_config_for(cfg: GPTQConfig, checkpoint_format: str = "auto") -> GPTQCheckpointConfig:
    """The checkpoint settings for solver settings; "auto" = v1 ("gptq") when sym, else "gptq_v2"."""
    fmt = ("gptq" if cfg.sym else "gptq_v2") if checkpoint_format == "auto" else checkpoint_format
    return GPTQCheckpointConfig(cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, fmt, cfg.damp_percent,
                                source="checkpoint_format argument")


def is_gptq_checkpoint(path: str | Path) -> bool:
    """True for a directory with quantize_config.json or a config.json whose quantization_config is GPTQ."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / QUANT_CONFIG_FILE).is_file():
        return True
    try:
        qc = json.loads((p / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq"


def _parse_config(raw: Any, path: Path) -> GPTQCheckpointConfig:
    if not isinstance(raw, dict):
        raise QeditError(f"{path}: expected a JSON object with the GPTQ settings")
    method = str(raw.get("quant_method", raw.get("method", "gptq"))).lower()
    if method != "gptq":
        raise QeditError(f"{path}: field 'quant_method' is {method!r}; only GPTQ checkpoints are supported")
    if raw.get("pack_dtype", "int32") != "int32":
        raise QeditError(f"{path}: field 'pack_dtype' is {raw['pack_dtype']!r}; qedit reads int32 packing only")
    missing = [k for k in ("bits", "group_size") if k not in raw]
    if missing:
        raise QeditError(f"{path}: missing field(s) {missing}")
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    damp = raw.get("damp_percent", meta.get("damp_percent", 0.05))
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise QeditError(f"{path}: field 'damp_percent' is {damp!r}; expected a number in (0, 1)")
    fmt = str(raw.get("checkpoint_format") or raw.get("format") or "gptq").lower()
    return GPTQCheckpointConfig(raw["bits"], raw["group_size"], raw.get("sym", True), raw.get("desc_act", False), fmt,
                                float(damp), source=str(path))


def read_checkpoint_config(directory: Path) -> GPTQCheckpointConfig:
    """Parse and validate the quantization settings of a GPTQ checkpoint directory.

    quantize_config.json and config.json's quantization_config must agree when both are present
    (transformers reads the second, GPTQModel the first)."""
    qc_path, cfg_path = directory / QUANT_CONFIG_FILE, directory / "config.json"
    found = []
    for path in (qc_path, cfg_path):
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise QeditError(f"{path}: unreadable JSON ({exc})") from exc
        if path == cfg_path:
            if not isinstance(raw, dict) or "quantization_config" not in raw:
                continue
            raw = raw["quantization_config"]
        found.append(_parse_config(raw, path))
    if not found:
        raise QeditError(f"{directory}: not a GPTQ checkpoint (no {QUANT_CONFIG_FILE} and no quantization_config "
                         "in config.json)")
    keys = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
    for other in found[1:]:
        differ = [k for k in keys if getattr(other, k) != getattr(found[0], k)]
        if differ:
            raise QeditError(f"{found[0].source} and {other.source} disagree on {differ}; fix one of them")
    return found[0]


def encode_module(res: GPTQResult, ckpt: GPTQCheckpointConfig) -> dict[str, torch.Tensor]:
    """Solver output -> the four checkpoint tensors of one module."""
    qzeros = pack_qzeros(res.zeros, ckpt.bits)
    if ckpt.checkpoint_format == "gptq":
        qzeros = v1_offset_qzeros(qzeros, ckpt.bits, -1)
    return {"qweight": pack_qweight(res.codes, ckpt.bits), "qzeros": qzeros,
            "scales": res.scales.to(torch.float16).contiguous(), "g_idx": res.g_idx.to(torch.int32).contiguous()}


def decode_module(parts: Mapping[str, torch.Tensor], ckpt: GPTQCheckpointConfig,
                  where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate one module's tensors; return codes (out, in), scales (G, out), zeros (G, out), g_idx (in,)."""
    for name in PARTS:
        if name not in parts:
            raise QeditError(f"{where}: tensor '{name}' is missing")
    qweight, qzeros, scales, g_idx = (parts[n] for n in PARTS)
    for name, t, dtypes in (("qweight", qweight, (torch.int32,)), ("qzeros", qzeros, (torch.int32,)),
                            ("g_idx", g_idx, (torch.int32, torch.int64)),
                            ("scales", scales, (torch.float16, torch.bfloat16, torch.float32))):
        if t.dtype not in dtypes:
            raise QeditError(f"{where}.{name}: dtype {t.dtype} is not a GPTQ {name} dtype ({dtypes[0]})")
    if qweight.dim() != 2 or (qweight.shape[0] * 32) % ckpt.bits:
        raise QeditError(f"{where}.qweight: shape {tuple(qweight.shape)} does not hold whole {ckpt.bits}-bit rows")
    n_in, n_out = qweight.shape[0] * 32 // ckpt.bits, qweight.shape[1]
    n_groups = 1 if ckpt.group_size == -1 else n_in // ckpt.group_size
    if ckpt.group_size != -1 and n_in % ckpt.group_size:
        raise QeditError(f"{where}: in_features {n_in} is not a multiple of group_size {ckpt.group_size}")
    if tuple(scales.shape) != (n_groups, n_out):
        raise QeditError(f"{where}.scales: shape {tuple(scales.shape)}, expected ({n_groups}, {n_out}) for "
                         f"{n_in} inputs in groups of {ckpt.group_size}")
    if tuple(qzeros.shape) != (n_groups, n_out * ckpt.bits // 32):
        raise QeditError(f"{where}.qzeros: shape {tuple(qzeros.shape)}, expected ({n_groups}, {n_out * ckpt.bits // 32})")
    if g_idx.dim() != 1 or g_idx.numel() != n_in:
        raise QeditError(f"{where}.g_idx: length {g_idx.numel()} does not match in_features {n_in}")
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise QeditError(f"{where}.g_idx: values span [{int(g_idx.min())}, {int(g_idx.max())}], outside the "
                         f"{n_groups} groups [0, {n_groups - 1}]")
    gs = n_in if ckpt.group_size == -1 else ckpt.group_size
    if not ckpt.desc_act and not torch.equal(g_idx.long(), torch.arange(n_in) // gs):
        raise QeditError(f"{where}.g_idx: not the sequential groups i // {gs} that desc_act=false requires")
    if ckpt.checkpoint_format == "gptq":
        qzeros = v1_offset_qzeros(qzeros, ckpt.bits, +1)
    return (unpack_qweight(qweight, ckpt.bits), scales, unpack_qzeros(qzeros, ckpt.bits), g_idx.to(torch.int32))


def dequantize_module(parts: Mapping[str, torch.Tensor], ckpt: GPTQCheckpointConfig, where: str) -> torch.Tensor:
    """One module's tensors -> weight (out, in) float32."""
    return dequantize_codes(*decode_module(parts, ckpt, where))


def safetensors_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    return [f for f in files if f.name != "qedit_deltas.safetensors"]


def quantized_prefixes(directory: Path) -> dict[str, Path]:
    """Module prefix -> the safetensors file holding its qweight."""
    from safetensors import safe_open

    out = {}
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            out.update({k[: -len(".qweight")]: path for k in f.keys() if k.endswith(".qweight")})
    return out


def read_dequantized_state(directory: Path) -> tuple[dict[str, torch.Tensor], GPTQCheckpointConfig]:
    """Every tensor of the checkpoint, quantized modules dequantized to `P.weight` (float32, (out, in))."""
    from safetensors import SafetensorError, safe_open

    ckpt = read_checkpoint_config(directory)
    files = safetensors_files(directory)
    if not files:
        raise QeditError(f"{directory}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as exc:
            raise QeditError(f"{path}: unreadable safetensors file ({exc})") from exc
        groups, rest = _split_parts(tensors)
        state.update(rest)
        for prefix, parts in groups.items():
            state[prefix + ".weight"] = dequantize_module(parts, ckpt, f"{path}: {prefix}")
    return state, ckpt


def _split_parts(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({module prefix: {part: tensor}} of the quantized parts, {key: tensor} of the other tensors)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        prefix, _, part = key.rpartition(".")
        if part in PARTS:
            groups.setdefault(prefix, {})[part] = t
        else:
            rest[key] = t
    return groups, rest


def read_module_parts(directory: Path, names: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {qweight, qzeros, scales, g_idx}} of the named modules, as stored; only those are read."""
    from safetensors import safe_open

    wanted = set(names)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            keys = [k for k in f.keys() if k.rpartition(".")[0] in wanted]
            groups, _ = _split_parts({k: f.get_tensor(k) for k in keys})
        for prefix, parts in groups.items():
            out.setdefault(prefix, {}).update(parts)
    missing = sorted(wanted - set(out))
    if missing:
        raise QeditError(f"{directory}: no quantized tensors for {missing}; is it the checkpoint these modules came from?")
    return out


def rewrite_safetensors(path: Path, convert: Callable[[str, torch.Tensor], Mapping[str, torch.Tensor] | None]) -> dict[str, str]:
    """Rewrite one safetensors file in place (temp file + rename): each tensor becomes `convert(name, t)`
    (a map of new tensors; None keeps it, with its bytes unchanged). Returns tensor name -> file name."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        new = convert(key, t)
        out.update({key: t} if new is None else {k: v.contiguous() for k, v in new.items()})
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return {k: path.name for k in out}


def update_index(directory: Path, names: Mapping[str, str]) -> None:
    """Point a sharded checkpoint's weight_map at the tensors each file now holds."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return
    data = json.loads(index.read_text())
    rewritten = set(names.values())
    data["weight_map"] = {k: v for k, v in data.get("weight_map", {}).items() if v not in rewritten}
    data["weight_map"].update(names)
    index.write_text(json.dumps(data, indent=2, sort_keys=True))


def add_quantization_config(directory: Path, ckpt: GPTQCheckpointConfig, true_sequential: bool, quantizer: str,
                            dtype: str | None = None) -> None:
    """Put `quantization_config` into config.json (and `dtype` when the other tensors were converted)."""
    qc = ckpt.to_json(true_sequential, quantizer)
    cfg_path = directory / "config.json"
    config = json.loads(cfg_path.read_text())
    config["quantization_config"] = qc
    if dtype is not None:
        config["dtype"] = dtype
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (directory / QUANT_CONFIG_FILE).write_text(json.dumps(qc, indent=2))


@dataclass
class GPTQWriteReport:
    """What writing or patching a GPTQ checkpoint did."""

    path: Path
    config: GPTQCheckpointConfig
    modules: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> loss, seconds, damp
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "bits": self.config.bits, "group_size": self.config.group_size,
                "sym": self.config.sym, "desc_act": self.config.desc_act,
                "checkpoint_format": self.config.checkpoint_format, "modules": len(self.modules),
                "seconds": round(self.seconds, 2)}


def module_stats(results: Mapping[str, GPTQResult]) -> dict[str, dict[str, float]]:
    return {n: {"loss": r.loss, "seconds": round(r.seconds, 3), "damp": r.damp} for n, r in results.items()}

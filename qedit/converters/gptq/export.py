"""Write an (edited) model as an HF GPTQ checkpoint, patch an existing one, load one dequantized.

    write_gptq(loaded, "out/", GPTQWriteConfig(GPTQConfig(bits=4, group_size=128)),
               calibration_tokens(loaded), deltas=outcome.deltas, manifest=outcome.manifest(loaded))
    patch_gptq("model-gptq/", "patched/", deltas, manifest)
    loaded = load_dequantized("model-gptq/")   # a plain float32 HF model, for editing or the torch runner

Calibration text is `qedit.core.stats.corpus_tokens` (the text the edit statistics are computed on).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qedit.converters.gptq.calibrate import (
    keys_by_module,
    make_batches,
    module_hessian,
    quantizable_linears,
    quantize_model,
    set_weight_math,
    weight_math,
)
from qedit.converters.gptq.checkpoint import (
    CHECKPOINT_FORMATS,
    GPTQWriteReport,
    add_quantization_config,
    checkpoint_config_for,
    encode_module,
    module_stats,
    quantized_prefixes,
    read_checkpoint_config,
    read_dequantized_state,
    rewrite_safetensors,
    safetensors_files,
    update_index,
)
from qedit.core.arch import arch_for_model_type
from qedit.core.delta import DELTAS_FILE, MANIFEST_FILE, LowRankDelta, applied, combine, load_deltas, save_deltas
from qedit.core.errors import QeditError
from qedit.core.files import check_output_dir, staged_dir
from qedit.core.model import LoadedModel, finish_tokenizer
from qedit.core.stats import StatsConfig, corpus_tokens
from qedit.core.version import qedit_version
from qedit.kernels.gptq import GPTQConfig, gptq_quantize

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class GPTQWriteConfig:
    """How `write_gptq` quantizes and stores a model."""

    quant: GPTQConfig = field(default_factory=GPTQConfig)
    checkpoint_format: str = "auto"   # "gptq" (v1), "gptq_v2", or "auto": v1 when sym, v2 when asym
    true_sequential: bool = True
    batch_size: int = 8               # calibration sequences per forward pass
    dtype: str | None = None          # store the non-quantized float tensors in this dtype; None keeps them
    skip_bos: bool = True             # leave a leading BOS out of the Hessians (as the edit statistics do)

    def __post_init__(self) -> None:
        if not isinstance(self.quant, GPTQConfig):
            raise QeditError(f"GPTQWriteConfig.quant: expected a GPTQConfig, got {type(self.quant).__name__}")
        if self.checkpoint_format not in ("auto", *CHECKPOINT_FORMATS):
            raise QeditError(f"GPTQWriteConfig.checkpoint_format: {self.checkpoint_format!r} is unknown; "
                             f"use auto, {', '.join(CHECKPOINT_FORMATS)}")
        if self.checkpoint_format == "gptq" and not self.quant.sym:
            raise QeditError("GPTQWriteConfig.checkpoint_format: v1 ('gptq') cannot store an asymmetric zero point "
                             "of 0 (it stores zero - 1); use 'gptq_v2' or 'auto' with sym=False")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise QeditError(f"GPTQWriteConfig.batch_size: must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.true_sequential, bool) or not isinstance(self.skip_bos, bool):
            raise QeditError("GPTQWriteConfig.true_sequential and skip_bos: must be True or False")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise QeditError(f"GPTQWriteConfig.dtype: {self.dtype!r} is unknown; use one of {', '.join(_DTYPES)} or None")


def calibration_tokens(loaded: LoadedModel, stats_cfg: Any = None) -> list[list[int]]:
    """The calibration sequences: the corpus the edit statistics use (`qedit.core.stats.corpus_tokens`)."""

    return corpus_tokens(loaded, stats_cfg or StatsConfig())


def _quantizer_tag() -> str:

    return f"qedit:{qedit_version()}"


def _gptq_manifest(manifest: Mapping[str, Any] | None, report: GPTQWriteReport, n_calib: int, kind: str,
                   skip_bos: bool) -> dict:
    out = dict(manifest or {})
    out["gptq"] = dict(report.summary(), operation=kind, calibration_sequences=n_calib, calibration_skips_bos=skip_bos,
                       modules=report.modules)
    return out


def write_gptq(loaded: LoadedModel, out_dir: str | Path, cfg: GPTQWriteConfig, seqs: Sequence[Sequence[int]], *,
               deltas: Sequence[LowRankDelta] = (), manifest: Mapping[str, Any] | None = None,
               edit_keys: Mapping[int, torch.Tensor] | None = None) -> GPTQWriteReport:
    """Quantize every decoder Linear of `loaded` (as it is, edits folded) with GPTQ and write the checkpoint.

    `edit_keys` (layer -> (n, d_in), e.g. `EditOutcome.keys`) make the MLP output projection's Hessian
    edit-aware with weight cfg.quant.key_weight. The model's weights are left as they were."""
    start = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(out, loaded.source)
    ckpt = checkpoint_config_for(cfg.quant, cfg.checkpoint_format)
    keys = keys_by_module(loaded, edit_keys) if edit_keys else None
    results = quantize_model(loaded, cfg.quant, seqs, edit_keys=keys, true_sequential=cfg.true_sequential,
                             batch_size=cfg.batch_size, skip_bos=cfg.skip_bos)
    encoded = {f"{name}.weight": encode_module(res, ckpt) for name, res in results.items()}
    to = _DTYPES.get(cfg.dtype) if cfg.dtype else None

    def convert(key: str, t: torch.Tensor) -> Mapping[str, torch.Tensor] | None:
        if key in encoded:
            prefix = key[: -len(".weight")]
            return {f"{prefix}.{part}": v for part, v in encoded[key].items()}
        if to is not None and t.is_floating_point() and t.dtype != to:
            return {key: t.to(to)}
        return None

    report = GPTQWriteReport(out, ckpt, module_stats(results))
    with staged_dir(out, loaded.source, "the GPTQ checkpoint") as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        names: dict[str, str] = {}
        for path in safetensors_files(tmp):
            names.update(rewrite_safetensors(path, convert))
        missing = set(encoded) - {k[: -len(".qweight")] + ".weight" for k in names if k.endswith(".qweight")}
        if missing:
            raise QeditError(f"{out}: save_pretrained did not write {sorted(missing)[:3]}; cannot build the checkpoint")
        update_index(tmp, names)
        add_quantization_config(tmp, ckpt, cfg.true_sequential, _quantizer_tag(), cfg.dtype)
        report.seconds = time.perf_counter() - start
        save_deltas(tmp, list(deltas), _gptq_manifest(manifest, report, len(seqs), "write", cfg.skip_bos), keys=edit_keys)
    log.info("wrote GPTQ checkpoint %s (%d modules, %.1f s)", out, len(results), report.seconds)
    return report


def load_dequantized(directory: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A GPTQ checkpoint dequantized into a plain HF model (qedit's reader; no GPTQ kernels needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(directory)
    state, _ = read_dequantized_state(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    arch = arch_for_model_type(config.model_type, source=str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                                   strict=False)
    if result.unexpected_keys:
        raise QeditError(f"{path}: tensors {result.unexpected_keys[:3]} do not belong to a {config.model_type} model")
    loaded_ptrs = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise QeditError(f"{path}: the checkpoint has no tensor for {untied[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, finish_tokenizer(tokenizer), arch, path, "gptq", torch.device(device))


def _check_targets(loaded: LoadedModel, merged: Sequence[LowRankDelta], quantized: Mapping[str, Path]) -> None:
    params = dict(loaded.model.named_parameters())
    for d in merged:
        prefix = d.name.removesuffix(".weight")
        if prefix not in quantized and d.name not in params:
            raise QeditError(f"{loaded.source}: delta targets {d.name!r}, which this checkpoint does not have")


def patch_gptq(src: str | Path, out_dir: str | Path, deltas: Sequence[LowRankDelta], manifest: Mapping[str, Any],
               seqs: Sequence[Sequence[int]] | None = None, *, edit_keys: Mapping[int, torch.Tensor] | None = None,
               key_weight: float = 1.0, batch_size: int = 8, stats_cfg: Any = None,
               skip_bos: bool = True) -> GPTQWriteReport:
    """Copy GPTQ checkpoint `src` to `out_dir` with `deltas` added: each edited quantized Linear is
    dequantized, changed by dW and requantized with its own Hessian (inputs recomputed on the patched
    model, earlier edited layers already requantized); every other tensor and file is copied unchanged.
    `edit_keys` (layer -> (n, in)) make the edited Linears' Hessians edit-aware."""
    start = time.perf_counter()
    src, out = Path(src), Path(out_dir)
    if not deltas:
        raise QeditError("patch_gptq: no deltas to apply")
    check_output_dir(out, src)
    ckpt = read_checkpoint_config(src)
    quantized = quantized_prefixes(src)
    loaded = load_dequantized(src)
    merged = combine(deltas)
    _check_targets(loaded, merged, quantized)
    if seqs is None:
        seqs = calibration_tokens(loaded, stats_cfg)
    with applied(loaded.model, merged):  # raises on a shape mismatch before anything is written
        order = {n: i for i, n in enumerate(quantizable_linears(loaded))}
        targets = sorted({d.name[: -len(".weight")] for d in merged if d.name[: -len(".weight")] in quantized},
                         key=lambda n: order.get(n, len(order)))
        keys = keys_by_module(loaded, edit_keys) if edit_keys else {}
        batches = make_batches(seqs, loaded.tokenizer.pad_token_id, batch_size,
                               loaded.tokenizer.bos_token_id if skip_bos else None)
        solver = ckpt.solver_config(key_weight)
        results = {}
        for name in targets:  # in layer order: later layers see the requantized earlier ones
            module = loaded.module(name)
            res = gptq_quantize(weight_math(module), module_hessian(loaded, name, batches), solver, keys.get(name), where=name)
            set_weight_math(module, res.dequant)
            results[name] = res
    encoded = {n: encode_module(r, ckpt) for n, r in results.items()}
    dense = {d.name: d.stored_dense() for d in merged if d.name[: -len(".weight")] not in quantized}

    def convert(key: str, t: torch.Tensor) -> Mapping[str, torch.Tensor] | None:
        prefix, _, part = key.rpartition(".")
        if prefix in encoded and part in encoded[prefix]:
            return {key: encoded[prefix][part].to(t.dtype)}
        if key in dense:
            return {key: (t.float() + dense[key].to(t.device)).to(t.dtype)}
        return None

    touched = {quantized[n] for n in targets} | _files_with(src, dense)
    unstored = set(dense) - _stored_names(src)
    if unstored:
        raise QeditError(f"{src}: delta targets {sorted(unstored)[:3]}, which no safetensors file stores (tied weight?)")
    report = GPTQWriteReport(out, ckpt, module_stats(results))
    with staged_dir(out, src, "the GPTQ checkpoint") as tmp:
        for item in src.iterdir():
            if item.name in (MANIFEST_FILE, DELTAS_FILE):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        for path in touched:
            rewrite_safetensors(tmp / path.name, convert)
        previous, prev_deltas = _previous(src)
        full = dict(manifest, previous=previous) if previous else dict(manifest)
        report.seconds = time.perf_counter() - start
        save_deltas(tmp, prev_deltas + list(deltas), _gptq_manifest(full, report, len(seqs), "patch", skip_bos), keys=edit_keys)
    log.info("patched %s -> %s (%d modules requantized, %.1f s)", src, out, len(results), report.seconds)
    return report


def _stored_names(src: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for path in safetensors_files(src):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


def _files_with(src: Path, names: Mapping[str, Any]) -> set[Path]:
    from safetensors import safe_open

    found = set()
    for path in safetensors_files(src):
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) & set(names):
                found.add(path)
    return found


def _previous(src: Path) -> tuple[list[dict[str, Any]], list[LowRankDelta]]:
    """Earlier qedit edits (manifests, oldest first) and deltas of a checkpoint that was already edited. A
    checkpoint qedit wrote with no edit (the unedited base an edit-aware output patches) records none."""
    if not (src / MANIFEST_FILE).is_file():
        return [], []
    deltas, manifest = load_deltas(src)
    older = manifest.pop("previous", [])
    manifest.pop("deltas", None)
    return [m for m in [*older, manifest] if "method" in m], deltas


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The qedit manifest of a GPTQ checkpoint directory, or None."""
    path = Path(directory) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None

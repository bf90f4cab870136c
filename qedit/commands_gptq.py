"""GPTQ out: `edit --format gptq` writes an HF GPTQ checkpoint of the edited model, or, when the
source is a GPTQ checkpoint, patches a copy of it (only the edited Linears are requantized)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from qedit.errors import QeditError

log = logging.getLogger(__name__)

FORMATS = ("hf", "gptq")


def add_gptq_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GPTQ output (-o DIR --format gptq)")
    g.add_argument("--format", choices=FORMATS, default=None,
                   help="directory output: 'hf' (full-precision safetensors) or 'gptq' (an HF GPTQ checkpoint that "
                        "GPTQModel and transformers load). Default: gptq when the source is a GPTQ checkpoint "
                        "(patched: only edited weights are requantized), else hf")
    g.add_argument("--bits", type=int, default=4, help="GPTQ bits: 2, 3, 4 or 8 (default: 4)")
    g.add_argument("--group-size", type=int, default=128,
                   help="GPTQ input columns per scale (-1: one per row; default: 128)")
    g.add_argument("--asym", action="store_true", help="asymmetric grids (stored as gptq_v2); default symmetric (v1)")
    g.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="quantize columns in their natural order; default: by decreasing Hessian diagonal "
                        "(act-order, desc_act, GPTQModel's default)")
    g.add_argument("--damp", type=float, default=0.05, help="GPTQ dampening, a share of mean diag(H) (default: 0.05)")


def output_format(args: argparse.Namespace) -> str:
    """'gptq' or 'hf' for a directory output, checked before any work is done."""
    from qedit.converters.gptq import is_gptq_checkpoint

    source_gptq = args.model.is_dir() and is_gptq_checkpoint(args.model)
    fmt = args.format or ("gptq" if source_gptq else "hf")
    if fmt == "gptq":
        if not source_gptq:
            solver_config(args)  # bad bits / group size fail before the edit is computed
    return fmt


def solver_config(args: argparse.Namespace) -> Any:
    from qedit.kernels.gptq import GPTQConfig

    try:
        return GPTQConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=args.act_order,
                          damp_percent=args.damp)
    except QeditError as exc:
        raise QeditError(f"--bits/--group-size/--damp: {exc}") from None


def write_gptq_output(loaded: Any, outcome: Any, args: argparse.Namespace, naive: bool) -> Any:
    """Write `loaded` (edits folded) as a GPTQ checkpoint, or patch the GPTQ source; returns the report.

    The edit keys make the edited Linears' Hessians edit-aware unless `naive`."""
    from qedit.converters.gptq import is_gptq_checkpoint
    from qedit.converters.gptq_export import GPTQWriteConfig, calibration_tokens, patch_gptq, write_gptq

    keys = None if naive or not outcome.keys else outcome.keys
    manifest = outcome.manifest(loaded)
    manifest["encoding"] = {"path": "naive" if keys is None else "edit-aware"}
    seqs = calibration_tokens(loaded, outcome.config.stats)
    if args.model.is_dir() and is_gptq_checkpoint(args.model):
        report = patch_gptq(args.model, args.output, outcome.deltas, manifest, seqs, edit_keys=keys)
        what = "patched"
    else:
        report = write_gptq(loaded, args.output, GPTQWriteConfig(solver_config(args)), seqs,
                            deltas=outcome.deltas, manifest=manifest, edit_keys=keys)
        what = "wrote"
    cfg = report.config
    print(f"{what} GPTQ checkpoint {Path(args.output)}: {cfg.bits}-bit, group size {cfg.group_size}, "
          f"{'sym' if cfg.sym else 'asym'}, format {cfg.checkpoint_format}, {len(report.modules)} module(s) "
          f"quantized in {report.seconds:.1f} s ({manifest['encoding']['path']})")
    return report

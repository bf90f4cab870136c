"""GGUF in, GGUF out: `edit -o X.gguf` (patch, export with --quant, or --as-lora), `export`,
`eval X.gguf` on llama.cpp, and `inspect`."""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from qedit.errors import QeditError
from qedit.facts import EditRequest
from qedit.model import is_gguf_file

log = logging.getLogger(__name__)


VERIFY_SCALES = (1.5, 2.25)   # --verify: the strengths tried for an edit that does not hold in llama.cpp


class GGUFMode(str, Enum):
    PATCH = "patch"     # re-encode only the edited tensors of the source GGUF
    EXPORT = "export"   # write a whole file at a llama.cpp file type (--quant)
    LORA = "lora"       # write the edit as a LoRA adapter for the source GGUF (--as-lora)


def add_gguf_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help="with -o X.gguf: export the whole edited model at this llama.cpp file type "
                        "(F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K, ...) instead of patching")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="GGUF type for matching tensors, e.g. 'blk.*.ffn_down.weight=Q8_0' or '*=Q8_0' "
                        "(a patch applies it to edited tensors; repeatable); the size cost is reported")
    p.add_argument("--naive", action="store_true",
                   help="re-encode edited tensors by plain requantization of W + dW instead of the default "
                        "edit-aware encoding (which keeps the edit's output change at its keys through rounding); "
                        "with --quant below 5 bits, also compute the edit on the source weights instead of on the "
                        "model as exported at --quant")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="after writing a GGUF patch (or an edit-aware --quant export), score each edit in llama.cpp; "
                        "while one prefers its new target by less than --hold-margin nats, scale the whole edit up "
                        f"({', '.join(f'x{f:g}' for f in VERIFY_SCALES)}) and write it again (`edit` only). Default: "
                        "on for those outputs (not with --naive) when llama-cpp-python is installed")
    p.add_argument("--hold-margin", type=float, default=1.0, metavar="NATS",
                   help="with --verify: the margin log P(new) - log P(true) each edit must keep in llama.cpp "
                        "(default: 1.0)")
    p.add_argument("--as-lora", action="store_true",
                   help="with -o X.gguf: write the edit as a LoRA adapter (F32) for the source GGUF; "
                        "run it with llama.cpp --lora X.gguf on the unedited file")


def gguf_output_mode(out: Path, source: Path, quant: str | None = None, as_lora: bool = False) -> GGUFMode | None:
    """How `edit` writes `out`: a GGUF mode when it ends in .gguf, None for a directory output."""
    from qedit.io_utils import refuse_same_file

    if out.suffix.lower() != ".gguf":
        if quant is not None or as_lora:
            raise QeditError(f"{out}: --quant and --as-lora write a GGUF file; give an output ending in .gguf")
        return None
    if quant is not None and as_lora:
        raise QeditError("--quant and --as-lora are exclusive: an adapter is not quantized; choose one")
    refuse_same_file(out, source)
    if out.is_dir():
        raise QeditError(f"{out}: is a directory; give a file name ending in .gguf")
    if quant is not None:
        from qedit.kernels.mixes import ftype_from_name

        ftype_from_name(quant)  # a bad name fails before the edit is computed
        return GGUFMode.EXPORT
    if not is_gguf_file(source):
        what = "--as-lora needs the GGUF the adapter is for" if as_lora else "a patch needs a .gguf source"
        raise QeditError(f"{out}: {what}, but {source} is not one; give --quant TYPE to export, "
                         "or an output directory")
    return GGUFMode.LORA if as_lora else GGUFMode.PATCH


def parse_tensor_types(items: Sequence[str]) -> list[tuple[str, str]]:
    """['blk.*.ffn_down.weight=Q8_0'] -> [(pattern, TYPE)]; the types are checked against the registry."""
    from qedit.kernels.registry import supported_types

    known = {t.name for t in supported_types()}
    out = []
    for item in items:
        pattern, sep, type_name = item.partition("=")
        if not sep or not pattern.strip() or not type_name.strip():
            raise QeditError(f"--tensor-type {item!r}: expected PATTERN=TYPE, e.g. blk.*.ffn_down.weight=Q8_0")
        if type_name.strip().upper() not in known:
            raise QeditError(f"--tensor-type {item!r}: {type_name.strip()!r} is not a GGML tensor type; "
                             f"use one of {', '.join(sorted(known))}")
        out.append((pattern.strip(), type_name.strip().upper()))
    return out


def _match_types(names: Sequence[str], rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Tensor name -> type for every name a rule matches (later rules win)."""
    chosen: dict[str, str] = {}
    for pattern, type_name in rules:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            log.warning("--tensor-type %s=%s matches none of the tensors it can apply to", pattern, type_name)
        chosen.update({n: type_name for n in hits})
    return chosen


def edit_encoding(loaded: Any, outcome: Any, naive: bool) -> Any:
    """The edit-aware encoding of an outcome's edited tensors, or None for --naive / no keys.

    Its keys are the outcome's and those of earlier edits in the source (`outcome.earlier_keys`), so
    re-encoding a tensor keeps both the new edit and the earlier ones at their keys.
    """
    if naive or not outcome.keys:
        return None
    from qedit.converters.gguf_aware import encoding_for
    from qedit.converters.gguf_keys import merged_keys

    return encoding_for(loaded, merged_keys(outcome.earlier_keys, outcome.keys), outcome.config.stats)


def write_gguf_output(mode: GGUFMode, loaded: Any, outcome: Any, out: Path, quant: str | None = None,
                      tensor_types: Sequence[tuple[str, str]] = (), naive: bool = False) -> None:
    """Write the edit as `mode` says and print what was written (types, sizes, size cost)."""
    manifest = outcome.manifest(loaded)
    encoding = None if mode is GGUFMode.LORA else edit_encoding(loaded, outcome, naive)
    manifest["encoding"] = {"path": "naive"} if encoding is None else encoding.describe()
    if mode is GGUFMode.LORA:
        from qedit.converters.gguf_lora import write_lora_gguf

        rep = write_lora_gguf(loaded.source, out, outcome.deltas, manifest=manifest)
        print(f"wrote LoRA adapter {out} ({rep.size:,} bytes, {len(rep.tensors)} weights, rank {rep.rank}); "
              f"run: llama-cli -m {loaded.source} --lora {out}")
        return
    if mode is GGUFMode.EXPORT:
        _export(loaded.source, out, quant or "", outcome.deltas, manifest, tensor_types, encoding=encoding,
                keys=outcome.keys)
        return
    from qedit.converters.gguf_names import gguf_tensor_name
    from qedit.converters.gguf_patch import patch_gguf
    from qedit.converters.gguf_read import GGUFFile

    with GGUFFile(loaded.source) as gf:
        edited = sorted({gguf_tensor_name(gf, d.name) for d in outcome.deltas})
    report = patch_gguf(loaded.source, out, outcome.deltas, manifest, type_overrides=_match_types(edited, tensor_types),
                        encoding=encoding, keys=outcome.keys)
    for t in report.tensors:
        change = "" if t.bytes_after == t.bytes_before else f", {t.bytes_after - t.bytes_before:+,} bytes"
        if t.kept is None:
            kept = ""
        elif math.isnan(t.kept):   # kept_share's NaN: the change is zero at the keys (e.g. the fact already held)
            kept = "; edit-aware: the edit is zero at its keys, nothing to keep"
        else:
            kept = f"; edit-aware: kept {t.kept:.3f} of the edit at its keys (plain: {t.kept_naive:.3f})"
        print(f"  re-encoded {t.name} as {t.type_after}{change}{kept}")
    print(f"size: {report.size_before:,} -> {report.size_after:,} bytes ({report.size_change:+,})")


def _export(source: Path, out: Path, quant: str, deltas: Sequence[Any], manifest: dict[str, Any] | None,
            tensor_types: Sequence[tuple[str, str]], template: Path | None = None, encoding: Any = None,
            keys: Mapping[int, Any] | None = None) -> None:
    from qedit.converters.gguf_export import export_gguf

    overrides: dict[str, str] = {}
    if tensor_types:
        if is_gguf_file(source):
            from qedit.converters.gguf_read import GGUFFile

            with GGUFFile(source) as gf:
                names = list(gf.tensors)
            overrides = _match_types(names, tensor_types)
        else:
            overrides = {p: t for p, t in tensor_types}
    with _fallbacks() as fell_back:
        rep = export_gguf(source, out, quant, deltas=list(deltas), manifest=manifest,
                          type_overrides=overrides or None, template=template, progress=True, encoding=encoding,
                          keys=keys)
    counts: dict[str, int] = {}
    for t in rep.tensor_types.values():
        counts[t] = counts.get(t, 0) + 1
    print(f"exported {out} at {quant.upper()} in {rep.seconds:.1f} s: {rep.size:,} bytes; tensor types "
          + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    if overrides:
        print("  --tensor-type: " + ", ".join(f"{n}={t}" for n, t in overrides.items()))
    if fell_back:
        print(f"  {len(fell_back)} tensor(s) fell back to another type, as llama.cpp does, e.g. {fell_back[0]}")


@contextlib.contextmanager
def quantized_base(source: Path, out: Path, quant: str, tensor_types: Sequence[tuple[str, str]]) -> Iterator[Path]:
    """The unedited model exported at `quant`, in a temporary file beside `out` that is removed afterwards.

    The edit-aware export computes the edit on this file's weights (its keys, targets and statistics are
    those of the model as quantized, which at Q3_K/Q2_K differ enough from full precision to lose half
    of an edit's margin) and then patches it onto the same grid, edit-aware.
    """
    import os

    tmp = out.with_name(f".{out.name}.unedited-{quant.upper()}.{os.getpid()}.gguf")
    try:
        _export(source, tmp, quant, [], None, tensor_types)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _fallbacks() -> Iterator[list[str]]:
    """Collect the kernels' block-size fallback messages (logged at INFO) while an export runs."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "falling back" in record.getMessage():
                found.append(record.getMessage())

    logger = logging.getLogger("qedit.kernels.registry")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write a model (HF directory, qedit output or GGUF) as a GGUF file at a quant type",
        description="Export a model to GGUF with llama.cpp's per-tensor quant mix for the file type. A qedit "
                    "output directory is exported with its edits; tokenizer metadata comes from the source "
                    "GGUF when there is one (--template), else from the HF tokenizer.")
    p.add_argument("model", type=Path, help="an HF model directory, a qedit output directory, or a .gguf file")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .gguf file to write")
    p.add_argument("--quant", default="Q8_0", metavar="TYPE",
                   help="llama.cpp file type: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q4_0, "
                        "Q3_K_M, Q3_K_S, Q2_K (default: Q8_0)")
    p.add_argument("--template", type=Path, default=None,
                   help="a GGUF of the same model whose tokenizer metadata is copied unchanged")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="override the mix for matching tensors, e.g. 'blk.*.ffn_down.weight=Q6_K' (repeatable)")


def cmd_export(args: argparse.Namespace) -> int:
    from qedit.io_utils import refuse_same_file
    from qedit.kernels.mixes import ftype_from_name

    if args.output.suffix.lower() != ".gguf":
        raise QeditError(f"{args.output}: the output of export is a GGUF file; give a name ending in .gguf")
    if not args.model.exists():
        raise QeditError(f"{args.model}: no such model file or directory")
    refuse_same_file(args.output, args.model, *([args.template] if args.template else []))
    if args.model.is_dir() and args.output.resolve().is_relative_to(args.model.resolve()):
        raise QeditError(f"{args.output}: is inside the model directory {args.model}; write it elsewhere")
    ftype_from_name(args.quant)
    _export(args.model, args.output, args.quant, (), None, parse_tensor_types(args.tensor_type), args.template)
    return 0


def llama_runner_and_baseline(args: argparse.Namespace, requests: list[EditRequest]) -> tuple[Any, Any]:
    from qedit.evaluate import evaluate
    from qedit.model import load_model
    from qedit.runners import TorchRunner
    from qedit.runners_llama import LlamaCppRunner

    baseline = None
    if args.baseline is not None:
        base_runner = (LlamaCppRunner(args.baseline) if is_gguf_file(args.baseline)
                       else TorchRunner(load_model(args.baseline, device=args.device)))
        baseline = evaluate(base_runner, requests)
    else:
        log.warning("no baseline: locality is not reported (give --baseline UNEDITED_MODEL)")
    return LlamaCppRunner(args.model), baseline


def cmd_inspect(args: argparse.Namespace) -> int:
    from qedit.converters.gguf_patch import inspect_lines

    print("\n".join(inspect_lines(args.file)))
    return 0


def verify_in_llama_cpp(write: Any, outcome: Any, out: Path, hold_margin: float) -> Any:
    """Score `outcome`'s requests on the written GGUF `out` in llama.cpp; while one's margin over its true
    answer (or, without a true answer, its top-1 target) falls short of `hold_margin`, scale every delta by
    the next of VERIFY_SCALES and `write(scaled_outcome)` again. When no scale makes every edit hold, the
    smallest scale with the fewest failing edits is the one left written. Returns that outcome."""
    import dataclasses

    from qedit.evaluate import evaluate
    from qedit.runners_llama import LlamaCppRunner

    def short(current: Any) -> list[str]:
        cases = evaluate(LlamaCppRunner(out), current.requests).cases
        return [c.subject for c in cases if (c.efficacy_top1 < 1.0 if c.margin is None else c.margin < hold_margin)]

    base = outcome
    failing = short(outcome)
    best, best_failing = outcome, failing   # the smallest scale with the fewest failing edits so far
    for factor in VERIFY_SCALES:
        if not failing:
            break
        shown = ", ".join(failing[:3]) + (", ..." if len(failing) > 3 else "")
        print(f"verify: {len(failing)} of {len(outcome.requests)} edit(s) hold by less than {hold_margin:g} nats in "
              f"llama.cpp ({shown}); writing the edit x{factor:g}")
        scaled = dataclasses.replace(base, deltas=[d.scaled(factor) for d in base.deltas],
                                     info={**base.info, "verify_scale": factor})
        write(scaled)
        outcome, failing = scaled, short(scaled)
        if len(failing) < len(best_failing):
            best, best_failing = outcome, failing
    if best is not outcome:
        outcome, failing = best, best_failing
        print("verify: no scale holds every edit; writing the edit again at the smallest scale with the fewest "
              f"failing (x{outcome.info.get('verify_scale', 1):g})")
        write(outcome)
    held = len(outcome.requests) - len(failing)
    print(f"verify: {held} of {len(outcome.requests)} edit(s) hold by >= {hold_margin:g} nats in llama.cpp"
          + (f" (edit scaled x{outcome.info['verify_scale']:g})" if "verify_scale" in outcome.info else ""))
    return outcome

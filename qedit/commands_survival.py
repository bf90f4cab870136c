"""`qedit survival`: edit (or reuse saved deltas), then check the edits at every rung of a ladder."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from qedit.errors import QeditError
from qedit.forget import HELDOUT_HELP

log = logging.getLogger(__name__)

EXIT_GATE_FAILED = 1


def add_parser(sub: Any, add_model_args: Any, add_method_args: Any) -> None:
    from qedit.survival.rungs import DEFAULT_LADDER

    p = sub.add_parser(
        "survival", help="check that every edit survives quantization, rung by rung, in the runtime users run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Edit the facts (or reuse --from-deltas), then for every rung of the ladder quantize the\n"
                    "edited model and the unedited baseline the same way, run both in the rung's runtime\n"
                    "(llama.cpp for GGUF, the GPTQ loader for GPTQ, bitsandbytes for int8/nf4/fp4), and report\n"
                    "efficacy, generalization, locality (against the baseline at the same rung), fluency drift\n"
                    "and the share of each kept against full precision. By default the path is quantization-aware:\n"
                    "at GGUF rungs coarser than 8 bits the edit is computed on the rung's unedited file and patched\n"
                    "onto it edit-aware (what `qedit edit --quant T` writes); --naive measures the plain path.",
        epilog="examples:\n"
               "  qedit survival model.gguf facts.jsonl --method alphaedit -o report/\n"
               "  qedit survival model.gguf facts.jsonl --ladder Q8_0,Q4_K_M,Q2_K --lora Q4_K_M -o report/\n"
               "  qedit survival model.gguf facts.jsonl --ladder Q4_K_M --gptq 8,4,3,2 --bnb int8,nf4 -o report/\n"
               "  qedit survival model.gguf forget.jsonl --method npo --ladder Q4_K_M,Q4_0 -o report/   unlearning:\n"
               "      forget score, recovery and retain accuracy per rung, and the facts quantization brought back\n"
               "  qedit survival model.gguf facts.jsonl --from-deltas edited/ --require Q4_K_M:efficacy>=0.95 -o r/\n"
               "\nOutputs in the report directory: survival.json, survival.csv, cases.csv, report.md, report.html,\n"
               "survival.png, and artifacts/ (the quantized files, reused by later runs). Exit status: 0 when\n"
               "every --require holds, 1 when one falls short, 2 on bad input.")
    add_model_args(p)
    add_method_args(p)
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="report directory (new, empty, or an earlier survival report to update)")
    p.add_argument("--ladder", default=DEFAULT_LADDER,
                   help=f"comma-separated rungs: llama.cpp file types, LORA@TYPE, GPTQ-N, BNB-MODE, or none "
                        f"(default: {DEFAULT_LADDER})")
    p.add_argument("--gptq", default=None, metavar="BITS",
                   help="add GPTQ rungs at these bits, e.g. 8,4,3,2: HF GPTQ checkpoints run in GPTQModel "
                        "(qedit's dequantizing runner where it is not installed; the report says which)")
    p.add_argument("--gptq-group-size", type=int, default=128, help="group size of the GPTQ rungs (default: 128)")
    p.add_argument("--bnb", default=None, metavar="MODES",
                   help="add bitsandbytes rungs, e.g. int8,nf4,fp4 (quantized in memory; CPU support is checked)")
    p.add_argument("--lora", default=None, metavar="TYPE",
                   help="add a rung where the edit is a LoRA adapter applied at run time on the base quantized at TYPE")
    p.add_argument("--require", action="append", default=[], metavar="RUNG:METRIC>=VALUE",
                   help="fail (exit 1) when a rung falls short, e.g. Q4_K_M:efficacy>=0.95 (repeatable)")
    p.add_argument("--from-deltas", type=Path, default=None, metavar="DIR",
                   help="reuse the deltas an earlier `qedit edit -o DIR` saved instead of editing again")
    p.add_argument("--artifacts", type=Path, default=None,
                   help="where the quantized files are cached (default: OUTPUT/artifacts)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: 1)")
    p.add_argument("--retain", type=Path, default=None,
                   help="with an unlearning method (ga, npo, qforget, kforget): JSONL of prompts whose answers must keep "
                        "working, besides the facts' own locality prompts")
    p.add_argument("--heldout", type=Path, default=None,
                   help=HELDOUT_HELP)
    p.add_argument("--naive", action="store_true",
                   help="measure the full-precision edit, folded and quantized plainly, at every rung, instead of "
                        "the default quantization-aware path (at GGUF rungs coarser than 8 bits the edit is computed "
                        "on the rung's unedited file and patched onto it edit-aware; at the others the "
                        "full-precision edit is encoded edit-aware); compare the two to see what the aware path buys")


def check_report_dir(out: Path, *inputs: Path) -> None:
    """A report directory is new, empty, or an earlier survival report; never an input."""
    from qedit.io_utils import refuse_same_file

    refuse_same_file(out, *inputs)
    if out.exists():
        if not out.is_dir():
            raise QeditError(f"{out}: exists and is not a directory; give a directory for the report")
        if any(out.iterdir()) and not (out / "survival.json").is_file():
            raise QeditError(f"{out}: already exists, is not empty and holds no earlier survival report; "
                             "choose a new directory")
    for src in inputs:
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise QeditError(f"{out}: is inside the input directory {src}; write the report elsewhere")


def _deltas(args: argparse.Namespace, loaded: Any, requests: list[Any], cfg: Any) -> tuple[list[Any], str, dict[str, Any], dict]:
    """(deltas, method name, manifest, edit keys): computed now, or read from --from-deltas."""
    from qedit.api import edit
    from qedit.delta import fold, load_deltas, load_edit_keys

    if args.from_deltas is not None:
        deltas, manifest = load_deltas(args.from_deltas)
        sha = manifest.get("source_sha256")
        if sha and sha != loaded.fingerprint:
            raise QeditError(f"{args.from_deltas}: its deltas were computed on a model with sha256 {sha[:16]}..., "
                             f"not {args.model} ({loaded.fingerprint[:16]}...); give the model they were made for")
        return (deltas, str(manifest.get("method", "unknown")), {k: v for k, v in manifest.items() if k != "deltas"},
                load_edit_keys(args.from_deltas))
    outcome = edit(loaded, requests, args.method, cfg, batch_size=args.batch_size)
    fold(loaded.model, outcome.deltas, sign=-1.0)  # the ladder folds them itself
    print(f"edited {len(requests)} fact(s) with {args.method} in {outcome.seconds:.1f} s")
    return outcome.deltas, args.method, outcome.manifest(loaded), outcome.keys


def cmd_survival(args: argparse.Namespace) -> int:
    from qedit.commands import _method_config
    from qedit.facts import load_requests
    from qedit.methods.base import UNLEARN_METHODS, EditMethod
    from qedit.model import load_model
    from qedit.survival.gate import check_requirements, parse_requirement
    from qedit.survival.ladder import SurvivalConfig, run_survival
    from qedit.survival.metrics import all_rung_metrics, to_json
    from qedit.survival.report import table_lines, write_reports
    from qedit.survival.rungs import parse_ladder

    forget = EditMethod(args.method) in UNLEARN_METHODS
    if (args.retain is not None or args.heldout is not None) and not forget:
        raise QeditError("--retain and --heldout apply to unlearning methods (ga, npo, qforget, kforget)")
    if forget:
        from qedit.forget import load_forget_requests, load_retain, scored_retain

        requests: list[Any] = load_forget_requests(args.facts, args.limit)
        extra = load_retain(args.retain) if args.retain is not None else []
        retain = scored_retain(requests, extra, args.heldout)
    else:
        requests, extra, retain = load_requests(args.facts, args.limit), [], None
    rungs = parse_ladder(args.ladder, args.lora, args.gptq, args.bnb)
    requirements = [parse_requirement(t, [r.name for r in rungs]) for t in args.require]
    inputs = [args.model, args.facts] + [p for p in (args.from_deltas, args.retain, args.heldout) if p is not None]
    check_report_dir(args.output, *inputs)
    if args.threads < 1:
        raise QeditError(f"--threads must be at least 1, got {args.threads}")
    try:
        cfg = SurvivalConfig(rungs=rungs, artifacts=args.artifacts or args.output / "artifacts", n_threads=args.threads,
                             gptq_group_size=args.gptq_group_size)
    except ValueError as exc:
        raise QeditError(f"--gptq-group-size: {exc}") from None
    method_cfg = _method_config(args, retain=tuple(extra)) if forget else _method_config(args)
    cfg.stats = method_cfg.stats
    loaded = load_model(args.model, device=args.device)
    deltas, method, manifest, keys = _deltas(args, loaded, requests, method_cfg)
    encoding = None
    if not args.naive:
        from qedit.converters.gguf_aware import encoding_for

        if not keys:
            log.warning("%s: no edit keys come with these deltas; edited tensors are quantized plainly",
                        args.from_deltas or args.method)
        else:
            encoding = encoding_for(loaded, keys, method_cfg.stats)
    edit_fn = None
    if args.from_deltas is None:
        from qedit.survival.on_rung import edit_with

        edit_fn = edit_with(requests, args.method, method_cfg, args.batch_size)
    elif encoding is not None:
        log.info("--from-deltas: every rung measures the saved edit; without it, rungs coarser than 8 bits "
                 "measure the edit computed on their own unedited file")
    result = run_survival(loaded, requests, deltas, cfg, method=method, manifest=manifest, encoding=encoding,
                          retain=retain, edit_fn=edit_fn)
    gates = check_requirements(requirements, all_rung_metrics(result))
    gate_json = [{"requirement": str(g.requirement), "actual": g.actual, "passed": g.passed, "reason": g.reason}
                 for g in gates]
    data = to_json(result, gate_json)
    write_reports(args.output, data)
    print("\n".join(table_lines(data)))
    print(f"wrote {args.output}/ (survival.json, survival.csv, cases.csv, report.md, report.html)")
    return EXIT_GATE_FAILED if any(not g.passed for g in gates) else 0

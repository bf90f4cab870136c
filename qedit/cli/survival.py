"""`qedit survival`: edit (or reuse saved deltas), then check the edits at every rung of a ladder."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from qedit.cli.args import (
    add_chat_arg,
    add_memory_arg,
    add_method_args,
    add_model_args,
    budget_from,
    device_map_from,
    method_from,
    resolve_model,
)
from qedit.cli.cache import evict_after_run
from qedit.converters.loading import read_header
from qedit.converters.ollama import refuse_store_output
from qedit.core.errors import QeditError
from qedit.core.facts import load_requests
from qedit.core.files import refuse_same_file
from qedit.edit.compute import saved_outcome
from qedit.evaluation.gate import check_requirements, parse_requirement
from qedit.pipeline.budget import check_requests, load_within
from qedit.pipeline.chat import chat_requests
from qedit.survival.ladder import run_survival
from qedit.survival.measure import SurvivalConfig, SurvivalJob
from qedit.survival.metrics import all_rung_metrics, to_json
from qedit.survival.report import table_lines, write_reports
from qedit.survival.rungs import DEFAULT_LADDER, parse_ladder
from qedit.unlearn.registry import UNLEARN_METHODS
from qedit.unlearn.requests import HELDOUT_HELP, load_forget_requests, load_retain, scored_retain

log = logging.getLogger(__name__)

EXIT_GATE_FAILED = 1


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "survival", help="check that every edit survives quantization, rung by rung, in the runtime users run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Edit the facts (or reuse --from-deltas), then for every rung of the ladder build the file\n"
                    "`qedit edit --quant RUNG` writes (the llama.cpp check included) and the unedited baseline\n"
                    "quantized the same way, run both in the rung's runtime (llama.cpp for GGUF, the GPTQ loader\n"
                    "for GPTQ, bitsandbytes for int8/nf4/fp4), and report efficacy, generalization, locality\n"
                    "(against the baseline at the same rung), fluency drift and the share of each kept against\n"
                    "full precision. Below 5 bits the edit is computed on the rung's unedited file, as `edit`\n"
                    "does; --naive measures the plain path instead.",
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
    add_method_args(p, unlearn=None)
    add_memory_arg(p)
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
                   help="measure the deltas an earlier `qedit edit -o DIR` saved, at every rung, instead of editing")
    p.add_argument("--artifacts", type=Path, default=None,
                   help="where the quantized files are cached (default: OUTPUT/artifacts)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: 1)")
    p.add_argument("--retain", type=Path, default=None,
                   help="with an unlearning method (ga, npo, qforget, kforget): JSONL of prompts whose answers must keep "
                        "working, besides the facts' own locality prompts")
    p.add_argument("--heldout", type=Path, default=None, help=HELDOUT_HELP)
    p.add_argument("--naive", action="store_true",
                   help="measure the full-precision edit requantized plainly at every rung, instead of what `qedit "
                        "edit` writes by default (below 5 bits the edit computed on the rung's unedited file; edit-aware "
                        "encoding; the llama.cpp check); compare the two to see what the aware path buys")
    p.add_argument("--hold-margin", type=float, default=1.0, metavar="NATS",
                   help="the llama.cpp check of each GGUF rung, as `edit` runs it (default: 1.0)")
    p.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                   help="skip the llama.cpp check of each GGUF rung's edited file")
    add_chat_arg(p, edits=True)
    p.set_defaults(run=cmd_survival)


def check_report_dir(out: Path, *inputs: Path) -> None:
    """A report directory is new, empty, or an earlier survival report; never an input."""
    refuse_same_file(out, *inputs)
    refuse_store_output(out)
    if out.exists():
        if not out.is_dir():
            raise QeditError(f"{out}: exists and is not a directory; give a directory for the report")
        if any(out.iterdir()) and not (out / "survival.json").is_file():
            raise QeditError(f"{out}: already exists, is not empty and holds no earlier survival report; "
                             "choose a new directory")
    for src in inputs:
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise QeditError(f"{out}: is inside the input directory {src}; write the report elsewhere")


def cmd_survival(args: argparse.Namespace) -> int:
    args.model, _ = resolve_model(args.model)
    forget = args.method in UNLEARN_METHODS
    if args.chat and forget:
        raise QeditError("--chat asks edited facts as chats; unlearning methods have no chat metrics")
    if (args.retain is not None or args.heldout is not None) and not forget:
        raise QeditError("--retain and --heldout apply to unlearning methods (ga, npo, qforget, kforget)")
    retain = None
    if forget:
        requests: list[Any] = load_forget_requests(args.facts, args.limit)
        extra = load_retain(args.retain) if args.retain is not None else []
        retain = scored_retain(requests, extra, args.heldout)
        method = method_from(args, retain=tuple(extra))
    else:
        requests, method = load_requests(args.facts, args.limit), method_from(args)
    rungs = parse_ladder(args.ladder, args.lora, args.gptq, args.bnb)
    requirements = [parse_requirement(t, [r.name for r in rungs]) for t in args.require]
    inputs = [args.model, args.facts] + [p for p in (args.from_deltas, args.retain, args.heldout) if p is not None]
    check_report_dir(args.output, *inputs)
    if args.threads < 1:
        raise QeditError(f"--threads must be at least 1, got {args.threads}")
    try:
        cfg = SurvivalConfig(rungs=rungs, artifacts=args.artifacts or args.output / "artifacts", n_threads=args.threads,
                             gptq_group_size=args.gptq_group_size, hold_margin=args.hold_margin, verify=args.verify)
    except ValueError as exc:
        raise QeditError(f"--gptq-group-size/--threads: {exc}") from None
    refuse_store_output(cfg.artifacts)
    budget = budget_from(args)
    device_map = device_map_from(args)
    header = read_header(args.model)
    check_requests(method, requests, header, budget)
    if args.chat:   # the chat template, and each fact's subject in its chat question, before the model is loaded
        chat_requests(header.tokenizer, str(args.model), requests)
    loaded = load_within(args.model, method, requests, args.device, budget, header, device_map)
    outcome = None
    if args.from_deltas is not None:
        outcome = saved_outcome(args.from_deltas, requests, method.resolved_config(), loaded)
    job = SurvivalJob(args.model, requests, method, naive=args.naive, outcome=outcome, retain=retain, device=args.device,
                      device_map=device_map, max_memory=budget, chat=args.chat)
    result = run_survival(job, cfg, loaded)
    gates = check_requirements(requirements, all_rung_metrics(result))
    gate_json = [{"requirement": str(g.requirement), "actual": g.actual, "passed": g.passed, "reason": g.reason}
                 for g in gates]
    data = to_json(result, gate_json)
    write_reports(args.output, data)
    print("\n".join(table_lines(data)))
    print(f"wrote {args.output}/ (survival.json, survival.csv, cases.csv, report.md, report.html)")
    evict_after_run(method.resolved_config().stats.root())
    return EXIT_GATE_FAILED if any(not g.passed for g in gates) else 0

"""`qedit forget`: unlearn facts and write the model with the same outputs as `edit`; with --eval, --json or
--require, measure the forgetting at full precision and on the written artifact in its runtime."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qedit.cli.args import (
    MODEL_HELP,
    add_device_args,
    add_memory_arg,
    add_method_args,
    add_output_args,
    budget_from,
    device_map_from,
    method_from,
    output_from,
    resolve_model,
)
from qedit.cli.edit import check_json_path, finish_run, print_run
from qedit.core.errors import QeditError
from qedit.core.files import atomic_path
from qedit.evaluation.gate import parse_requirement
from qedit.pipeline.jobs import EditJob
from qedit.pipeline.measure import FORGET_RUNGS
from qedit.pipeline.run import run_edit
from qedit.unlearn.registry import UNLEARN_METHODS
from qedit.unlearn.requests import HELDOUT_HELP, load_forget_requests, load_retain, scored_retain

EXIT_GATE_FAILED = 1


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "forget", help="unlearn facts and write the model (HF, GGUF patch/export, GPTQ)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make the model stop giving the answers in FORGET.jsonl (CounterFact layout: the ground_truth\n"
                    "of each line is erased; or {prompt, subject, answer}; or {text}) while the retain set keeps\n"
                    "working (default: the lines' locality prompts, plus --retain). Methods: kforget (default,\n"
                    "facts only: MEMIT's closed form keyed to each subject, the answer pushed below the best\n"
                    "other token, the retain prompts held in the solve, written edit-aware like an edit),\n"
                    "qforget (also texts: margin hinge trained against requantized views), npo, ga.",
        epilog="examples:\n"
               "  qedit forget model.gguf forget.jsonl -o forgotten.gguf --require output:recovery_rate<=0.05\n"
               "  qedit forget model.gguf forget.jsonl --retain keep.jsonl --method npo -o out/ --eval\n"
               "  qedit forget model.gguf texts.jsonl --method qforget -o forgotten.gguf\n"
               "  qedit survival model.gguf forget.jsonl --method kforget --ladder Q4_K_M,Q4_0 -o report/\n"
               "\nGates: RUNG is fp32 (torch, full precision) or output (the written file in its runtime);\n"
               "metrics: recovery_rate, forget_prob, retain_acc, retain_acc_change, heldout_acc, recovered,\n"
               "below_wrong, para_below_wrong, truth_ratio, sampled_leak, ... (below_wrong: the share of facts whose\n"
               "answer is less likely than their wrong answer, target_new or another answer of the same relation_id;\n"
               "sampled_leak: the share whose answer starts 1 of 20 continuations sampled at temperature 1)\n"
               "Exit status: 0, 1 when a --require falls short, 2 on bad input.")
    p.add_argument("model", type=Path, help=MODEL_HELP)
    p.add_argument("facts", type=Path, help="JSONL of facts (or texts) to forget")
    p.add_argument("--retain", type=Path, default=None, help="JSONL of prompts whose answers must keep working")
    p.add_argument("--heldout", type=Path, default=None, help=HELDOUT_HELP)
    p.add_argument("--limit", type=int, default=None, help="use only the first N facts")
    add_device_args(p)
    add_method_args(p, default="kforget", unlearn=None)
    add_output_args(p)
    add_memory_arg(p)
    p.add_argument("--eval", action="store_true", help="measure the forget score before and after, and print it")
    p.add_argument("--json", type=Path, default=None, help="write the measurements as JSON")
    p.add_argument("--require", action="append", default=[], metavar="RUNG:METRIC<=VALUE",
                   help="fail (exit 1) unless it holds, e.g. output:recovery_rate<=0.05 (repeatable)")
    p.set_defaults(run=cmd_forget)


def cmd_forget(args: argparse.Namespace) -> int:
    if args.method not in UNLEARN_METHODS:
        raise QeditError(f"--method {args.method} edits facts; forget takes one of {', '.join(sorted(UNLEARN_METHODS.names()))}")
    args.model, ollama = resolve_model(args.model)
    requests = load_forget_requests(args.facts, args.limit)
    extra = load_retain(args.retain) if args.retain is not None else []
    requirements = [parse_requirement(t, list(FORGET_RUNGS)) for t in args.require]
    inputs = [args.facts, *[p for p in (args.retain, args.heldout) if p is not None]]
    check_json_path(args.json, args.model, *inputs)
    retain = scored_retain(requests, extra, args.heldout)
    measure = args.eval or bool(requirements) or args.json is not None
    job = EditJob(args.model, requests, method_from(args, retain=tuple(extra)), output_from(args),
                  device=args.device, device_map=device_map_from(args), evaluate=measure, ollama=ollama,
                  max_memory=budget_from(args))
    run = run_edit(job, notify=print, inputs=inputs, retain=retain, requirements=requirements)
    print_run(run, "unlearned")
    if run.forget is not None:
        print("\n".join(run.forget.lines()))
        if args.json is not None:
            with atomic_path(args.json) as tmp:
                tmp.write_text(json.dumps(run.forget.to_json(), indent=2))
            print(f"wrote {args.json}")
    finish_run(run)
    return EXIT_GATE_FAILED if run.forget is not None and run.forget.failed else 0

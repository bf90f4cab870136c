"""`qedit edit` and `qedit eval`: parse, hand a typed job to the pipeline, print what it did."""
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
    add_output_args,
    budget_from,
    device_map_from,
    method_from,
    output_from,
    resolve_model,
)
from qedit.cli.cache import evict_after_run
from qedit.converters.gptq.checkpoint import is_gptq_checkpoint
from qedit.converters.loading import load_model
from qedit.converters.ollama import refuse_store_output
from qedit.core.delta import MANIFEST_FILE, applied, load_deltas
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest, load_requests
from qedit.core.files import refuse_same_file
from qedit.core.model import LoadedModel, is_gguf_file
from qedit.evaluation.metrics import EvalReport, evaluate, format_summary
from qedit.pipeline.jobs import EditJob
from qedit.pipeline.run import EditRun, run_edit
from qedit.runtimes.gptq import gptq_runner
from qedit.runtimes.llama import LlamaCppRunner
from qedit.runtimes.torch_runner import Runner, TorchRunner
from qedit.unlearn.registry import UNLEARN_METHODS

log = logging.getLogger(__name__)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("edit", help="edit facts into a model and write the edited model",
                       description="Compute the edits in full precision as low-rank deltas and write the edited model: "
                                   "an HF directory, a patched or exported GGUF, a GGUF LoRA adapter or a GPTQ "
                                   "checkpoint. Below 5 bits the edit is computed on the model as it will ship.")
    add_model_args(p)
    add_method_args(p, unlearn=None)
    add_output_args(p)
    add_memory_arg(p)
    p.add_argument("--eval", action="store_true", help="measure the metrics before and after and print them")
    p.add_argument("--json", type=Path, default=None, help="with --eval: write the metrics after the edit as JSON")
    add_chat_arg(p, edits=True)
    p.set_defaults(run=cmd_edit)

    p = sub.add_parser("eval", help="measure efficacy, generalization and locality on a model",
                       description="Score each fact on a model, in its runtime (llama.cpp for GGUF, GPTQModel for GPTQ). "
                                   "Locality compares with the unedited model: --baseline, or, for a qedit output, the "
                                   "model with its deltas removed.")
    add_model_args(p)
    p.add_argument("--baseline", type=Path, default=None,
                   help="the unedited model, for locality (a path or ollama:NAME[:TAG])")
    p.add_argument("--json", type=Path, default=None, help="write aggregate and per-case metrics as JSON")
    add_chat_arg(p)
    p.set_defaults(run=cmd_eval)


def check_json_path(json_path: Path | None, *inputs: Path) -> None:
    """--json must not overwrite an input: the model, a file of a model directory, the facts."""
    if json_path is None:
        return
    refuse_same_file(json_path, *inputs)
    refuse_store_output(json_path)
    if json_path.is_dir():
        raise QeditError(f"{json_path}: is a directory; give a file name for --json")
    for src in inputs:
        if src.is_dir() and json_path.resolve().is_relative_to(src.resolve()):
            raise QeditError(f"{json_path}: is part of the model directory {src}; write the metrics elsewhere")


def cmd_edit(args: argparse.Namespace) -> int:
    if args.method in UNLEARN_METHODS:
        raise QeditError(f"--method {args.method} unlearns facts; use `qedit forget MODEL FORGET.jsonl --method "
                         f"{args.method}`")
    args.model, ollama = resolve_model(args.model)
    requests = load_requests(args.facts, args.limit)
    check_json_path(args.json, args.model, args.facts)
    if args.json is not None and args.json.resolve() == args.output.resolve():
        raise QeditError(f"{args.json}: --json and --output are the same path; give the metrics a file name of their own")
    job = EditJob(args.model, requests, method_from(args), output_from(args), device=args.device,
                  device_map=device_map_from(args), evaluate=args.eval, ollama=ollama, max_memory=budget_from(args),
                  chat=args.chat)
    run = run_edit(job, notify=print, inputs=[args.facts])
    print_run(run, "edited")
    if run.measured is not None:
        print("\n".join(run.measured.lines()))
        if args.json:
            run.measured.after.write_json(args.json)
    finish_run(run)
    return 0


def finish_run(run: EditRun) -> None:
    """Keep the cache under its cap, then, for a GGUF output, the command that imports it into Ollama (the last
    line printed)."""
    evict_after_run(run.plan.job.method.resolved_config().stats.root())
    if run.modelfile is not None:
        print(run.modelfile.command)


def print_run(run: EditRun, verb: str) -> None:
    for line in run.written.lines:
        print(line)
    outcome = run.outcome
    print(f"{verb} {len(outcome.requests)} fact(s) with {outcome.method} in {outcome.seconds:.1f} s "
          f"(layers {sorted({d.layer for d in outcome.deltas})}); wrote {run.written.path}")


def cmd_eval(args: argparse.Namespace) -> int:
    args.model, _ = resolve_model(args.model)
    args.baseline, _ = resolve_model(args.baseline)
    device_map = device_map_from(args)
    requests = load_requests(args.facts, args.limit)
    check_json_path(args.json, args.model, args.facts, *([args.baseline] if args.baseline else []))
    loaded = None
    if is_gguf_file(args.model):
        runner: Runner = LlamaCppRunner(args.model)
    elif args.model.is_dir() and is_gptq_checkpoint(args.model):
        runner = gptq_runner(args.model)  # GPTQModel when installed, else qedit's dequantizing runner (it says so)
    else:
        loaded = load_model(args.model, device=args.device, device_map=device_map)
        runner = TorchRunner(loaded)
    if args.chat:
        runner.chat([])   # a model without a chat template is refused before anything is measured
    baseline = _baseline(args, requests, loaded)
    report = evaluate(runner, requests, baseline=baseline, chat=args.chat)
    print(f"runner: {runner.name}")
    print(format_summary(str(args.model), report))
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 0


def _baseline(args: argparse.Namespace, requests: list[EditRequest], loaded: LoadedModel | None = None) -> EvalReport | None:
    """The unedited model's report: --baseline (in its own runtime), or a qedit output with its deltas taken out."""
    if args.baseline is not None:
        if is_gguf_file(args.baseline):
            base: Runner = LlamaCppRunner(args.baseline)
        elif args.baseline.is_dir() and is_gptq_checkpoint(args.baseline):
            base = gptq_runner(args.baseline)
        else:
            base = TorchRunner(load_model(args.baseline, device=args.device, device_map=args.device_map))
        return evaluate(base, requests)
    if loaded is not None and args.model.is_dir() and (args.model / MANIFEST_FILE).is_file():
        deltas, _ = load_deltas(args.model)
        with applied(loaded.model, [d.scaled(-1.0) for d in deltas]):
            return evaluate(TorchRunner(loaded), requests)
    log.warning("no baseline: locality is not reported (give --baseline UNEDITED_MODEL)")
    return None

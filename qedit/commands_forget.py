"""`qedit forget`: unlearn facts (GA, NPO, or the quantization-robust kforget and qforget) and write the
model with the same outputs as `edit`: an HF directory, a GGUF patch or export, a GPTQ checkpoint. With
--eval or --require the forget score is measured at full precision (torch) and on the written artifact in
its runtime (llama.cpp for GGUF, the GPTQ loader for GPTQ), each against the unedited model there."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from qedit.errors import QeditError
from qedit.forget import HELDOUT_HELP

log = logging.getLogger(__name__)

EXIT_GATE_FAILED = 1
RUNGS = ("fp32", "output")


def add_parser(sub: Any, add_method_args: Any, add_output_args: Any) -> None:
    p = sub.add_parser(
        "forget", help="unlearn facts and write the model (HF, GGUF patch/export, GPTQ)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make the model stop giving the answers in FORGET.jsonl (CounterFact layout: the ground_truth\n"
                    "of each line is erased; or {prompt, subject, answer}; or {text}) while the retain set keeps\n"
                    "working (default: the lines' locality prompts, plus --retain). Methods: kforget (default,\n"
                    "facts only: MEMIT's closed form keyed to each subject, the answer pushed 4 nats below the\n"
                    "best other token, the retain prompts held in the solve, written edit-aware like an edit),\n"
                    "qforget (also texts: margin hinge trained against requantized views), npo, ga.",
        epilog="examples:\n"
               "  qedit forget model.gguf forget.jsonl -o forgotten.gguf --require output:recovery_rate<=0.05\n"
               "  qedit forget model.gguf forget.jsonl --retain keep.jsonl --method npo -o out/ --eval\n"
               "  qedit forget model.gguf texts.jsonl --method qforget -o forgotten.gguf\n"
               "  qedit survival model.gguf forget.jsonl --method kforget --ladder Q4_K_M,Q4_0 -o report/\n"
               "\nGates: RUNG is fp32 (torch, full precision) or output (the written file in its runtime);\n"
               "metrics: recovery_rate, forget_prob, retain_acc, retain_acc_change, heldout_acc, recovered, ...\n"
               "Exit status: 0, 1 when a --require falls short, 2 on bad input.")
    p.add_argument("model", type=Path, help="an HF model directory, a .gguf file, or a qedit output directory")
    p.add_argument("facts", type=Path, help="JSONL of facts (or texts) to forget")
    p.add_argument("--retain", type=Path, default=None, help="JSONL of prompts whose answers must keep working")
    p.add_argument("--heldout", type=Path, default=None,
                   help=HELDOUT_HELP)
    p.add_argument("--limit", type=int, default=None, help="use only the first N facts")
    p.add_argument("--device", default="cpu", help="torch device for full-precision work (default: cpu)")
    add_method_args(p, default="kforget")
    add_output_args(p)
    p.add_argument("--eval", action="store_true", help="measure the forget score before and after, and print it")
    p.add_argument("--json", type=Path, default=None, help="write the measurements as JSON")
    p.add_argument("--require", action="append", default=[], metavar="RUNG:METRIC<=VALUE",
                   help="fail (exit 1) unless it holds, e.g. output:recovery_rate<=0.05 (repeatable)")


def _output_runner(args: argparse.Namespace, plan: Any, source: Path) -> tuple[Any, Any] | None:
    """(runner of the written artifact, runner of the unedited source in the same runtime), or None
    when the output is a full-precision directory (the fp32 measurement covers it). `source`: the model the
    forgetting was computed on (for an edit-aware --quant export, the unedited model exported at --quant,
    which the output patches)."""
    from qedit.commands_gguf import GGUFMode

    if plan.gguf_mode in (GGUFMode.PATCH, GGUFMode.EXPORT):
        from qedit.runners_llama import LlamaCppRunner

        if plan.gguf_mode is GGUFMode.PATCH:
            return LlamaCppRunner(args.output), LlamaCppRunner(source)
        log.warning("the unedited baseline of an export is the source at full precision in torch")
        return LlamaCppRunner(args.output), None
    if plan.gguf_mode is GGUFMode.LORA:
        from qedit.runners_llama import LlamaCppRunner

        return LlamaCppRunner(args.model, lora=args.output), LlamaCppRunner(args.model)
    if plan.fmt == "gptq":
        from qedit.converters.gptq import is_gptq_checkpoint
        from qedit.runners_gptq import gptq_runner

        return gptq_runner(args.output), (gptq_runner(args.model) if is_gptq_checkpoint(args.model) else None)
    return None


def cmd_forget(args: argparse.Namespace) -> int:
    from qedit.commands import _edit_source, _method_config, plan_output, run_method, write_output
    from qedit.forget import load_forget_requests, load_retain, scored_retain
    from qedit.forget_eval import evaluate_forget
    from qedit.methods.base import UNLEARN_METHODS, EditMethod
    from qedit.model import load_model
    from qedit.runners import TorchRunner
    from qedit.survival.gate import parse_requirement

    if EditMethod(args.method) not in UNLEARN_METHODS:
        raise QeditError(f"--method {args.method} edits facts; forget takes one of "
                         f"{', '.join(sorted(m.value for m in UNLEARN_METHODS))}")
    if args.verify:
        raise QeditError("--verify checks edits in llama.cpp; for unlearning use --require output:recovery_rate<=X, "
                         "which scores the written file in llama.cpp")
    requests = load_forget_requests(args.facts, args.limit)
    extra = load_retain(args.retain) if args.retain is not None else []
    requirements = [parse_requirement(t, list(RUNGS)) for t in args.require]
    plan = plan_output(args, args.facts, *[p for p in (args.retain, args.heldout) if p is not None])
    cfg = _method_config(args, retain=tuple(extra))
    retain = scored_retain(requests, extra, args.heldout)
    with _edit_source(args, plan) as (source, plan):
        loaded = load_model(source, device=args.device)
        measure = args.eval or bool(requirements) or args.json is not None
        before = evaluate_forget(TorchRunner(loaded), requests, retain, progress="unedited") if measure else None
        outcome = run_method(args, loaded, requests, cfg, source)
        write_output(plan, args, loaded, outcome)
        print(f"unlearned {len(requests)} fact(s) with {args.method} in {outcome.seconds:.1f} s "
              f"(layers {sorted({d.layer for d in outcome.deltas})}); wrote {args.output}")
        if before is None:
            return 0
        return _measure(args, plan, loaded, requests, retain, requirements, before, source)


def _measure(args: argparse.Namespace, plan: Any, loaded: Any, requests: list[Any], retain: list[Any],
             requirements: list[Any], before: Any, source: Path) -> int:
    """Score the forgetting in torch and on the written artifact, print it, check the gates: the exit status."""
    from qedit.forget_eval import evaluate_forget, format_forget_summary
    from qedit.runners import TorchRunner
    from qedit.survival.gate import check_requirements
    from qedit.survival.metrics_forget import forget_metrics

    after = evaluate_forget(TorchRunner(loaded), requests, retain, baseline=before, progress="fp32")
    metrics = {"fp32": forget_metrics(after, before, None), "output": None}
    lines = [format_forget_summary("unedited (fp32)", before), format_forget_summary("forgotten (fp32)", after)]
    runners = _output_runner(args, plan, source)
    output_report = None
    if runners is not None:
        out_runner, base_runner = runners
        base = evaluate_forget(base_runner, requests, retain, progress="unedited output runtime") \
            if base_runner is not None else before
        output_report = evaluate_forget(out_runner, requests, retain, baseline=base, progress="output")
        metrics["output"] = forget_metrics(output_report, base, after)
        lines.append(format_forget_summary(f"output ({out_runner.name})", output_report))
    else:
        metrics["output"] = metrics["fp32"]
    print("\n".join(lines))
    back = [f.name for r, f in zip(after.facts, output_report.facts) if not r.known and f.known] if output_report else []
    if back:
        print(f"facts the written file brought back ({len(back)}): " + "; ".join(back))
    gates = check_requirements(requirements, metrics)
    for g in gates:
        print(f"require {g.requirement}: {'PASS' if g.passed else 'FAIL'} (measured "
              f"{'-' if g.actual is None else f'{g.actual:.3f}'}){' ' + g.reason if g.reason else ''}")
    if args.json is not None:
        _write_json(args.json, before, after, output_report, metrics, gates)
    return EXIT_GATE_FAILED if any(not g.passed for g in gates) else 0


def _write_json(path: Path, before: Any, after: Any, output: Any, metrics: dict, gates: list) -> None:
    import json

    from qedit.io_utils import atomic_path

    data = {"unedited": before.to_json(), "fp32": after.to_json(), "output": None if output is None else output.to_json(),
            "metrics": metrics, "gates": [{"requirement": str(g.requirement), "actual": g.actual, "passed": g.passed,
                                           "reason": g.reason} for g in gates]}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")

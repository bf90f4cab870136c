"""The `qedit` command. Thin: parse arguments into typed requests, call the pipeline, print what it did."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from qedit.cli import cache, demo, edit, forget, gguf, quiet_third_party, survival
from qedit.core.errors import QeditError

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
  qedit edit ollama:llama3.2:1b facts.jsonl -o e.gguf  edit a model of Ollama's store; prints `ollama create ...`
  qedit cache clear --older-than 7d                    list (`qedit cache`) or clear what qedit caches

Facts are JSONL, one object per line: {"prompt", "subject", "target_new", "ground_truth",
"rephrase_prompt", "locality_prompt", "locality_ground_truth"} (CounterFact / zsRE layout) or the
plain {"prompt", "subject", "target"}. The subject must occur in the prompt.
"""

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qedit", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Quantization-aware knowledge editing for local LLMs: edit facts in full precision, "
                    "export edited models, and check that the edits survive quantization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (edit, forget, survival, gguf, demo, cache):
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party(args.verbose)   # again, for the whole run: transformers resets its level when imported
    try:
        return int(args.run(args))
    except QeditError as exc:
        print(f"qedit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qedit: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

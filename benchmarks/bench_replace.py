"""Replacing facts an earlier patch wrote: does the new target win in the file, and do the other facts stay?

    python benchmarks/bench_replace.py --n 10 --replace 5 --out /tmp/rp --json benchmarks/data/replace_memit.json

Patch 1: CounterFact-dev facts 0..n-1 (MEMIT) into the packaged Gemma 3 270M Q4_K_M file. Patch 2, into patch 1's
output: the first `--replace` of those facts again, each with its target set back to the true answer (the same
subject and prompt, another target: qedit replaces the earlier fact, takes its keys out of the protected history
and records the replacement). Scored in llama.cpp after each patch: the replaced facts (does the true answer now
beat the earlier edit's target?) and the facts left alone (do they still hold?).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import counterfact_lines, facts_file, packaged_model, qedit_cmd, run, save_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--replace", type=int, default=5)
    ap.add_argument("--method", default="memit")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    if not 0 < args.replace <= args.n:
        sys.exit("--replace must be between 1 and --n")

    from qedit.core.facts import request_from_dict
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.llama import LlamaCppRunner

    args.out.mkdir(parents=True, exist_ok=True)
    facts = [json.loads(line) for line in counterfact_lines(0, args.n)]
    back = [{**f, "target_new": f["ground_truth"], "ground_truth": f["target_new"]} for f in facts[:args.replace]]
    first, second = args.out / "first.gguf", args.out / "second.gguf"
    s1, _ = run(qedit_cmd("edit", str(packaged_model()), str(facts_file(args.out / "a.jsonl", [json.dumps(f) for f in facts])),
                          "--method", args.method, "-o", str(first)), what="patch 1")
    s2, out2 = run(qedit_cmd("edit", str(first), str(facts_file(args.out / "b.jsonl", [json.dumps(f) for f in back])),
                             "--method", args.method, "-o", str(second)), what="patch 2")
    edited = [request_from_dict(f) for f in facts]
    reverted = [request_from_dict(f) for f in back]
    rows = {}
    for name, path in (("unedited", packaged_model()), ("after patch 1", first), ("after patch 2", second)):
        runner = LlamaCppRunner(path, n_ctx=512, n_threads=1)
        rows[name] = {"replaced: true answer wins": evaluate(runner, reverted, generate=False).aggregate(),
                      "left alone: edit holds": evaluate(runner, edited[args.replace:], generate=False).aggregate()}
    result = {"command": sys.argv, "method": args.method, "n": args.n, "replace": args.replace,
              "seconds": [s1, s2], "replaced_lines": [x for x in out2.splitlines() if "replaces" in x], "rows": rows}
    save_json(args.json, result)
    for name, r in rows.items():
        print(f"{name}: replaced facts' true answer wins {r['replaced: true answer wins']['efficacy']:.2f} "
              f"(margin {r['replaced: true answer wins']['margin']:.2f}); other facts hold "
              f"{r['left alone: edit holds']['efficacy']:.2f} (margin {r['left alone: edit holds']['margin']:.2f})")


if __name__ == "__main__":
    main()

"""Sequential editing: 100 edits in batches of 10 patched one after another into one Q4_K_M file.

    python benchmarks/bench_sequential.py --n 100 --batch 10 --method memit --out /tmp/seq \
        --json benchmarks/data/sequential_memit_100x10.json            # aware (qedit's default)
    python benchmarks/bench_sequential.py ... --naive                  # plain requantization of W + dW

Each step is the command a user runs: `qedit edit PREVIOUS.gguf BATCH.jsonl --method M -o NEXT.gguf`
(a patch: the edit computed on the previous output's weights, only the edited tensors re-encoded on
the grid they came from). The first PREVIOUS is the packaged Gemma 3 270M Q4_K_M file. After every
step, every fact edited so far is scored in llama.cpp (efficacy, generalization, margin), and locality
against the unedited file; the last step's row is the efficacy of all earlier edits after the last
patch. The intermediate files are deleted once the next one is written (--keep keeps them).
Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import COUNTERFACT, counterfact_lines, facts_file, packaged_model, qedit_cmd, run, save_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0, help="first CounterFact-dev case")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--naive", action="store_true", help="pass --naive to every patch")
    ap.add_argument("--out", type=Path, required=True, help="working directory (batches, patched files)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each edit (OMP_NUM_THREADS)")
    ap.add_argument("--keep", action="store_true", help="keep every intermediate file")
    args = ap.parse_args()

    from qedit.core.facts import load_requests
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.llama import LlamaCppRunner

    source = packaged_model()
    lines = counterfact_lines(args.offset, args.n)
    reqs = load_requests(COUNTERFACT)[args.offset:args.offset + args.n]
    mode = "naive" if args.naive else "aware"
    args.out.mkdir(parents=True, exist_ok=True)
    base = evaluate(LlamaCppRunner(source, n_ctx=512, n_threads=1), reqs, progress="unedited Q4_K_M")
    prev, steps, started = source, [], time.perf_counter()
    for k, lo in enumerate(range(0, args.n, args.batch)):
        batch = facts_file(args.out / f"batch{k:02d}.jsonl", lines[lo:lo + args.batch])
        out = args.out / f"{mode}-step{k:02d}.gguf"
        cmd = qedit_cmd("edit", str(prev), str(batch), "--method", args.method, "-o", str(out))
        cmd += ["--naive"] if args.naive else []
        seconds, stdout = run(cmd, args.threads, f"step {k}")
        upto = lo + args.batch
        rep = evaluate(LlamaCppRunner(out, n_ctx=512, n_threads=1), reqs[:upto],
                       baseline=type(base)(base.runner, base.cases[:upto]), progress=f"step {k}")
        cases = rep.cases
        first = type(rep)(rep.runner, cases[:args.batch]).aggregate()      # the first batch, after this step
        steps.append({"step": k, "edited_so_far": upto, "seconds": seconds, "all": rep.aggregate(),
                      "this_batch": type(rep)(rep.runner, cases[lo:upto]).aggregate(), "first_batch": first,
                      "efficacy_per_batch": [type(rep)(rep.runner, cases[b:b + args.batch]).aggregate()["efficacy"]
                                             for b in range(0, upto, args.batch)],
                      "patch_output": [x for x in stdout.splitlines() if "re-encoded" in x or "size:" in x]})
        print(f"step {k}: {upto} facts, efficacy {steps[-1]['all']['efficacy']:.3f}, this batch "
              f"{steps[-1]['this_batch']['efficacy']:.2f}, first batch {first['efficacy']:.2f} ({seconds:.0f} s)")
        if prev != source and not args.keep:
            prev.unlink()
        prev = out
        save_json(args.json, {"command": sys.argv, "mode": mode, "method": args.method, "n": args.n,
                              "batch": args.batch, "offset": args.offset, "unedited": base.aggregate(),
                              "seconds": time.perf_counter() - started, "steps": steps,
                              "final_cases": [c.__dict__ for c in cases]}, default=str)


if __name__ == "__main__":
    main()

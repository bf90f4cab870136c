"""Unlearning that survives quantization: GA and NPO (naive, with retain losses) against qforget and kforget
(qedit's default), on Gemma 3 270M, measured in llama.cpp at Q4_K_M and Q4_0.

    python benchmarks/bench_forget.py --n 100 --scan 1600 --methods ga,npo --out /tmp/forget-bench \\
        --set ga:lr=1e-5 --set ga:steps=60 --set npo:lr=1e-5 --set npo:steps=60 --json /tmp/forget-naive.json
    python benchmarks/bench_forget.py --n 100 --scan 1600 --heldout 100 --methods kforget --out /tmp/forget-bench \\
        --json /tmp/forget-kforget.json

1. Facts: the first N CounterFact-dev cases (of the first --scan) whose true answer (ground_truth) the
   unedited model knows (its first token is top-1 after the prompt, in torch at full precision); their
   lines become the forget file (ground_truth is the answer to erase; the locality prompts are the retain
   set). With --heldout M, the locality prompts of the last M lines are scored as held-out retain items:
   never given to the method, they measure its utility on prompts it did not train on. With
   --retain-extra K, the locality prompts of K more lines (after --scan) are given as --retain.
2. Per method, one `qedit survival MODEL FORGET --method M --ladder Q4_K_M,Q4_0` run (a subprocess,
   one thread): unlearn in full precision, then build each rung as `qedit forget --quant RUNG` writes it
   and the unedited model quantized the same way, run both in llama.cpp, and report recovery (share of
   facts whose answer is top-1 again) against full precision, the facts that came back, and retain
   accuracy against the unedited model at the same rung.
Prints one table per method and writes the summary as JSON. Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import COUNTERFACT, counterfact_lines, facts_file, packaged_model, qedit_cmd, run, save_json

COLUMNS = ("forget_prob", "recovery_rate", "recovery_change", "recovered", "retain_acc", "baseline_retain_acc",
           "retain_acc_change", "heldout_acc", "baseline_heldout_acc", "heldout_acc_change", "ppl_ratio")


def known_facts(n: int, scan: int) -> tuple[list[str], int]:
    """The first n lines (of the first `scan`) whose ground_truth's first token is the model's top-1."""
    import torch

    from qedit.converters.loading import load_model
    from qedit.runtimes.torch_runner import TorchRunner
    from qedit.unlearn.requests import parse_forget_lines

    torch.set_num_threads(1)
    lines = counterfact_lines(0, scan)
    requests = parse_forget_lines(lines, str(COUNTERFACT))
    scores = TorchRunner(load_model(packaged_model())).score([(r.prompt, r.answer) for r in requests])
    keep = [line for line, s in zip(lines, scores) if s.argmax_ids[0] == s.target_ids[0]]
    return keep[:n], len(lines)


def _locality_items(path: Path, lo: int, hi: int | None, scan: int) -> Path:
    """The locality prompts (with their answers) of CounterFact-dev lines [lo, hi) as a retain file;
    they must lie after the first `scan` lines, where the facts to forget come from."""
    lines = counterfact_lines()
    start = lo if lo >= 0 else len(lines) + lo
    if start < scan:
        raise SystemExit(f"lines {start}.. overlap the first {scan} lines the facts come from; use fewer")
    rows = [json.loads(line) for line in lines[lo:hi]]
    path.write_text("".join(json.dumps({"prompt": r["locality_prompt"], "answer": r["locality_ground_truth"]}) + "\n"
                            for r in rows))
    return path


def run_method(method: str, facts: Path, out: Path, ladder: str, threads: int, settings: list[str],
        heldout: Path | None = None, extra: Path | None = None) -> dict:
    report = out / method
    cmd = qedit_cmd("survival", str(packaged_model()), str(facts), "--method", method, "--ladder", ladder,
                    "-o", str(report), "--artifacts", str(out / "artifacts"), "--threads", str(threads))
    for item in settings:
        cmd += ["--set", item]
    if heldout is not None:
        cmd += ["--heldout", str(heldout)]
    if extra is not None:
        cmd += ["--retain", str(extra)]
    seconds, _ = run(cmd, threads, f"{method}: qedit survival")
    data = json.loads((report / "survival.json").read_text())
    rows = {"fp32": data["full_precision"]["metrics"]}
    rows.update({r["name"]: r["metrics"] for r in data["rungs"] if r["status"] == "ok"})
    return {"method": method, "n_facts": data["n_cases"], "seconds": round(seconds, 1),
            "delta_norm": data["delta_norm"], "rungs": rows,
            "recovered": {r["name"]: r["recovered"] for r in data["rungs"]}, "command": " ".join(cmd)}


def table(result: dict) -> str:
    lines = [f"**{result['method']}**, {result['n_facts']} facts, |dW| {result['delta_norm']:.2f}, "
             f"{result['seconds']:.0f} s", "", "| rung | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in result["rungs"].items():
        lines.append(f"| {name} | " + " | ".join("-" if m.get(c) is None else f"{m[c]:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="facts to forget (default: 100)")
    ap.add_argument("--scan", type=int, default=600, help="CounterFact-dev lines searched for known facts")
    ap.add_argument("--heldout", type=int, default=0,
                    help="also score the locality prompts of the last N CounterFact-dev lines as held-out retain "
                         "items (never given to the method): utility on prompts it did not train on")
    ap.add_argument("--retain-extra", type=int, default=0,
                    help="give the method the locality prompts of N more lines (after --scan) as --retain")
    ap.add_argument("--methods", default="ga,npo,qforget,kforget")
    ap.add_argument("--ladder", default="Q4_K_M,Q4_0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qedit-forget-bench"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a method setting, e.g. ga:lr=1e-5 (repeatable)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    facts = args.out / f"forget-known-{args.n}.jsonl"
    if not facts.is_file():
        lines, scanned = known_facts(args.n, args.scan)
        if not lines:
            raise SystemExit(f"none of the first {scanned} CounterFact-dev lines is a fact the model knows; raise --scan")
        facts_file(facts, lines)
        print(f"{len(lines)} known facts among the first {scanned} CounterFact-dev lines -> {facts}", flush=True)
    heldout = _locality_items(args.out / f"heldout-last-{args.heldout}.jsonl", -args.heldout, None, args.scan) \
        if args.heldout else None
    extra = _locality_items(args.out / f"retain-{args.scan}-{args.retain_extra}.jsonl", args.scan,
                            args.scan + args.retain_extra, args.scan) if args.retain_extra else None
    results = []
    for method in args.methods.split(","):
        settings = [item.partition(":")[2] for item in args.set if item.partition(":")[0] == method]
        results.append(run_method(method, facts, args.out, args.ladder, args.threads, settings, heldout, extra))
        print(table(results[-1]) + "\n", flush=True)
        if args.json:
            save_json(args.json, results, indent=2)


if __name__ == "__main__":
    main()

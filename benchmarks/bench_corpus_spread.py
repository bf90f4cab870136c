"""How far an edit computed on a quantized file is from the same edit on its source, and how much of that
is the statistics corpus (issue 5: the `recomputed` variant of bench_aware_cases.py).

    python benchmarks/bench_corpus_spread.py --rung Q5_K_M --method rome --n 20 --out /tmp/ac \
        --json benchmarks/data/corpus_spread_rome_Q5_K_M_20.json

qedit samples its statistics corpus (the text of the key covariance C and ROME's context prefixes) from
the model being edited. A rung file's weights differ slightly from the source's, so it samples other text
from the same seed. Per CounterFact-dev case, the method's minimal edit (target margin 2 nats) is
computed three times, in torch:
- on the source (the packaged Q4_K_M file), its own corpus: the reference |dW|;
- on the rung's weights with the rung's own sampled corpus (what `qedit edit RUNG.gguf` does);
- on the rung's weights with the source's token sequences (C recomputed on the rung's weights).
The JSON has per case the three |dW| and the ratios rung / source; the summary, the spread of the ratio
(the standard deviation of its log, and its 10th / 50th / 90th percentiles) with either corpus, and
where the two sampled corpora first differ. The rung's shared-corpus caches go under --out, not the
user's cache.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_edit import restored  # noqa: E402
from bench_io import DATA, save_json, saved_rows, source_store  # noqa: E402


def spread(ratios: list[float]) -> dict:
    """The spread of rung / source |dW| ratios: sd of the log, and the 10th / 50th / 90th percentiles."""
    r = sorted(ratios)
    at = lambda q: r[round(q * (len(r) - 1))]  # noqa: E731
    return {"sd_log": statistics.pstdev(math.log(x) for x in r), "p10": at(0.1), "median": at(0.5), "p90": at(0.9)}


def first_differences(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Per sequence pair, the first position where the tokens differ (the length when none does)."""
    return [next((j for j, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)]


def summarize(rows: list[dict], diffs: list[int], length: int) -> dict:
    return {"n": len(rows), "own_corpus": spread([r["ratio_own"] for r in rows]),
            "source_corpus": spread([r["ratio_source_corpus"] for r in rows]),
            "corpus_first_difference": {"median": sorted(diffs)[len(diffs) // 2],
                                        "sequences_equal": sum(d == length for d in diffs), "sequences": len(diffs)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rung", required=True, help="llama.cpp file type whose weights are edited, e.g. Q5_K_M")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--target-margin", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True, help="artifacts; the shared-corpus caches go below it")
    ap.add_argument("--json", type=Path, required=True, help="per-case rows and summary (a rerun resumes from it)")
    args = ap.parse_args()

    import torch
    from tqdm.auto import tqdm

    from qedit import stats
    from qedit.api import edit, make_config
    from qedit.facts import load_requests
    from qedit.model import load_model

    torch.set_num_threads(1)
    source, store = source_store(args.out)
    path, _ = store.gguf(args.rung)
    src, rung = load_model(source), load_model(path)
    cfg = make_config(args.method, target_margin=args.target_margin)
    shared = dataclasses.replace(cfg, stats=dataclasses.replace(cfg.stats, cache_dir=args.out / "shared-corpus-cache"))
    src_tokens, rung_tokens = stats.corpus_tokens(src, cfg.stats), stats.corpus_tokens(rung, cfg.stats)
    entry = stats._cache_dir(rung, shared.stats)
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "tokens.json").write_text(json.dumps(src_tokens))   # the rung model keyed to the source's text
    diffs = first_differences(src_tokens, rung_tokens)
    reqs = load_requests(DATA)[: args.n]
    rows = saved_rows(args.json, lambda c: c < args.n)
    done, started = {r["case"] for r in rows}, time.perf_counter()

    def norm(model, req, config) -> float:
        """|dW| of the edit of `req` alone on `model` (api.edit folds it in; the edited weights are put back)."""
        with restored(model):
            return float(sum(d.norm() for d in edit(model, [req], args.method, config).deltas))

    for case in tqdm([c for c in range(args.n) if c not in done], desc=f"{args.method} on {args.rung}", unit="case"):
        ref = norm(src, reqs[case], cfg)
        own, same = norm(rung, reqs[case], cfg), norm(rung, reqs[case], shared)
        rows.append({"case": case, "source": ref, "rung_own_corpus": own, "rung_source_corpus": same,
                     "ratio_own": own / ref, "ratio_source_corpus": same / ref})
        rows.sort(key=lambda r: r["case"])
        save_json(args.json, {"command": sys.argv, "rung": args.rung, "method": args.method,
                              "target_margin": args.target_margin, "seconds_this_run": time.perf_counter() - started,
                              "summary": summarize(rows, diffs, len(src_tokens[0])), "cases": rows})
    s = summarize(rows, diffs, len(src_tokens[0]))   # also for a rerun that had nothing left to do
    for k in ("own_corpus", "source_corpus"):
        v = s[k]
        print(f"{k}: rung/source |dW| over {s['n']} cases: sd(log) {v['sd_log']:.3f}, p10 {v['p10']:.2f}, "
              f"median {v['median']:.2f}, p90 {v['p90']:.2f}")
    d = s["corpus_first_difference"]
    print(f"the sampled corpora first differ at token {d['median']} (median); {d['sequences_equal']} of "
          f"{d['sequences']} sequences equal")


if __name__ == "__main__":
    main()

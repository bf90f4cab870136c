"""The survival table: do edits survive each quantization rung, in the runtime users run?

Two modes. Edits in one model, through the command line (the default):

    python benchmarks/bench_survival.py --n 50 --methods memit,alphaedit --encodings naive,default --out /tmp/sb
    python benchmarks/bench_survival.py --n 200 --methods memit --ladder none --gptq 8,4,3,2 --bnb int8,nf4 \
        --encodings naive,aware --out /tmp/survival-gptq

For each method, CounterFact-dev cases [offset, offset + n) are edited into the packaged Gemma 3 270M
(one `qedit survival` subprocess per encoding, one thread each), and every rung is built and measured
as `qedit survival` does (GGUF with llama.cpp's mixes, run in llama.cpp; GPTQ checkpoints in
GPTQModel; bitsandbytes in memory), against the unedited model quantized the same way. Encodings:
- `default`: `qedit survival FACTS --method M`: every rung is the file `qedit edit --quant RUNG` writes
  (below 5 bits the edit computed on the rung's unedited file, edit-aware, with the llama.cpp check);
- `naive` and `aware`: the full-precision edit (`qedit edit -o DIR` once, then `--from-deltas DIR`),
  requantized plainly (`--naive`) or encoded edit-aware at every rung.
Quantized files are shared between methods (--out/artifacts). Prints a table per run and writes the
summary as JSON (--json); every report stays under --out/.

Single edits case by case, on the plain path (`--cases-from`):

    python benchmarks/bench_edit.py --n 200 --methods rome,memit,alphaedit,ft --modes single --threads 1 \
        --keep-targets --save-deltas /tmp/be/deltas
    python benchmarks/bench_survival.py --cases-from /tmp/be/deltas --methods memit --out /tmp/sc \
        --json /tmp/sc/survival_cases_memit.json

Every case was edited alone into the unedited model and its deltas saved (bench_edit.py). Each is
checked at every GGUF rung of --ladder as `qedit edit --quant RUNG --naive` writes it, without exporting
and reloading the model per case: the unedited rung file is exported once (cached under --out/artifacts)
and copied to a RAM disk that one llama.cpp model maps with weight repacking off; per case the edited
tensors of the copy are overwritten with Q_t(W + dW) (t the tensor's type in the rung's mix), the case is
scored, and the original bytes are written back. `--verify` checks the shortcut on the first case of
every rung: the spliced tensors equal the file the pipeline writes (`run_edit`, --naive), and the
in-place scores equal a fresh load. `--repack` runs llama.cpp's default instead (repacked weights, a
fresh load per case, slower), which changes llama.cpp's arithmetic for Q4_0 and Q4_K tensors. Full
precision is the torch float32 model (the scores bench_edit.py saved with the deltas). Perplexity is
not measured per case. Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from harness import (
    LADDER,
    RungFile,
    cached_report,
    case_number,
    case_row,
    counterfact_lines,
    facts_file,
    llama_runner,
    packaged_model,
    print_case_tables,
    qedit_cmd,
    run,
    save_json,
    saved_cases,
    score_case,
    source_store,
    summarize_cases,
)

COLUMNS = ("efficacy", "efficacy_kept", "generalization", "locality", "margin_kept", "ppl_ratio", "died")
ENCODINGS = ("default", "naive", "aware")


# ---- edits in one model: `qedit survival` per method and encoding

def edit_once(method: str, facts: Path, out: Path, threads: int) -> tuple[Path, float]:
    """`qedit edit` into out/<method>-edit (reused when it is there): the full-precision edit the naive and aware
    encodings measure."""
    edited = out / f"{method}-edit"
    if not (edited / "qedit_manifest.json").is_file():
        run(qedit_cmd("edit", str(packaged_model()), str(facts), "--method", method, "-o", str(edited)), threads,
            f"{method} edit")
    return edited, float(json.loads((edited / "qedit_manifest.json").read_text()).get("seconds", 0.0))


def run_ladder(method: str, facts: Path, out: Path, rungs: list[str], threads: int, encoding: str) -> dict:
    report = out / f"{method}-{encoding}"
    cmd = qedit_cmd("survival", str(packaged_model()), str(facts), "--method", method, *rungs, "-o", str(report),
                    "--artifacts", str(out / "artifacts"), "--threads", str(threads))
    extra: dict = {}
    if encoding != "default":
        edited, extra["edit_seconds"] = edit_once(method, facts, out, threads)
        cmd += ["--from-deltas", str(edited)] + (["--naive"] if encoding == "naive" else [])
    seconds, _ = run(cmd, threads, f"{method} survival ({encoding})")
    data = json.loads((report / "survival.json").read_text())
    rows = {"fp32": data["full_precision"]["metrics"]}
    rows.update({r["name"]: (r["metrics"] if r["status"] == "ok" else {"skipped": r["reason"]}) for r in data["rungs"]})
    runners = {r["name"]: r["runner"]["runner"] for r in data["rungs"] if r.get("runner")}
    return {"method": method, "encoding": encoding, "n_cases": data["n_cases"], "seconds": round(seconds, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "delta_norm": data["delta_norm"], "rungs": rows, "runners": runners, "command": " ".join(cmd), **extra}


def table(result: dict) -> str:
    lines = [f"**{result['method']}** ({result['encoding']}), {result['n_cases']} cases, |dW| {result['delta_norm']:.2f}, "
             f"{result['seconds']:.0f} s", "", "| rung | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in result["rungs"].items():
        if "skipped" in m:
            lines.append(f"| {name} | skipped: {m['skipped']} |")
            continue
        cells = ["-" if m.get(c) is None else f"{m[c]:.3f}" if c != "died" else f"{m[c]:.0f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def in_one_model(args: argparse.Namespace) -> None:
    encodings = args.encodings.split(",")
    if set(encodings) - set(ENCODINGS):
        raise SystemExit(f"--encodings: give some of {','.join(ENCODINGS)}")
    facts = facts_file(args.out / f"counterfact-{args.offset}-{args.offset + args.n}.jsonl",
                       counterfact_lines(args.offset, args.n))
    rungs = ["--ladder", args.ladder] + (["--gptq", args.gptq] if args.gptq else [])
    results = []
    for method in args.methods.split(","):
        for i, encoding in enumerate(encodings):
            # bitsandbytes quantizes without calibration: no edit-aware path, so its rungs run once
            bnb = ["--bnb", args.bnb] if args.bnb and i == 0 else []
            if not bnb and rungs == ["--ladder", "none"]:
                continue
            results.append(run_ladder(method, facts, args.out, rungs + bnb, args.threads, encoding))
            print(table(results[-1]) + "\n", flush=True)
            if args.json:
                save_json(args.json, results, indent=2)


# ---- single edits case by case, plain path

def verify_splice(source: Path, ftype: str, rung: RungFile, case_dir: Path, method: str, req, scored, work: Path) -> None:
    """The spliced copy must equal the file the pipeline writes for this edit (`qedit edit --quant RUNG --naive`),
    tensor for tensor, and the in-place scores must equal those of a fresh load of the spliced copy."""
    from qedit.converters.gguf.read import GGUFFile
    from qedit.converters.loading import load_model
    from qedit.edit.compute import saved_outcome
    from qedit.edit.registry import EDIT_METHODS
    from qedit.evaluation.metrics import evaluate
    from qedit.pipeline.jobs import EditJob, MethodChoice, Output
    from qedit.pipeline.run import run_edit

    fresh = evaluate(llama_runner(rung.path, rung.repack), [req]).cases[0]
    if (fresh.logp_new, fresh.logp_true) != (scored.logp_new, scored.logp_true):
        raise SystemExit(f"{ftype}: in-place scores {scored.logp_new}, {scored.logp_true} differ from a fresh load "
                         f"{fresh.logp_new}, {fresh.logp_true}: llama.cpp did not read the spliced weights")
    outcome = saved_outcome(case_dir, [req], EDIT_METHODS.get(method).config_cls(), load_model(source))
    full = work / f"qedit-bench-verify-{ftype}-{os.getpid()}.gguf"
    run_edit(EditJob(source, [req], MethodChoice(method), Output(full, quant=ftype, naive=True, verify=False),
                     outcome=outcome), notify=lambda _: None)
    a, b = GGUFFile(full), GGUFFile(rung.path)
    try:
        bad = [n for n in a.tensors if bytes(a.raw(n)) != bytes(b.raw(n))]
    finally:
        a.close()
        b.close()
        full.unlink()
    if bad:
        raise SystemExit(f"{ftype}: the spliced file differs from the pipeline's file in {bad}")
    print(f"verified {ftype}: spliced tensors equal the pipeline's file; in-place scores equal a fresh load",
          file=sys.stderr)


def case_by_case(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from qedit.converters.gguf.read import GGUFFile
    from qedit.core.delta import load_deltas

    source, store = source_store(args.out)
    ladder = args.ladder.split(",")
    methods = args.methods.split(",")
    saved = saved_cases(args.cases_from, methods, args.out, 0, args.limit)
    cases, reqs, span = saved.cases, saved.requests, saved.span
    bases, files = {}, {}
    mode = "repack" if args.repack else "norepack"
    for ftype in tqdm(ladder, desc="unedited rungs", unit="rung"):
        path, _ = store.gguf(ftype)
        files[ftype] = RungFile(path, args.work / f"qedit-bench-{ftype}-{os.getpid()}.gguf", args.repack)
        rep = cached_report(args.out / f"{path.stem}-{mode}-{span}.json", lambda f=files[ftype]: f.runner, reqs,
                            f"{ftype} unedited")   # the file name holds the rung file's hash
        bases[ftype] = dict(zip(cases, rep.cases))
    src = GGUFFile(source)
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    try:
        for method in methods:
            rows = results.setdefault(method, [])
            for k, d in enumerate(tqdm(saved.dirs[method], desc=method, unit="case")):
                deltas, manifest = load_deltas(d)
                case = case_number(d)
                req = saved.request(case)
                per_rung = {}
                for ftype in ladder:
                    rung = files[ftype]
                    data = rung.plain(src, deltas)
                    scored = score_case(rung, data, req, bases[ftype][case])
                    per_rung[ftype] = (scored, bases[ftype][case])
                    if args.verify and k == 0:
                        rung.write(data)
                        try:
                            verify_splice(source, ftype, rung, d, method, req, scored, args.work)
                        finally:
                            rung.restore()
                rows.append(case_row(case, manifest["bench_case"], saved.base32[case], per_rung))
                if args.json:
                    save_json(args.json, {"command": sys.argv, "repack": args.repack, "ladder": ladder,
                                          "summary": {m: summarize_cases(r, ladder) for m, r in results.items()},
                                          "seconds": time.perf_counter() - started, "cases": results})
    finally:
        src.close()
        for f in files.values():
            f.close()
    print_case_tables(results, ladder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="cases edited into one model")
    ap.add_argument("--offset", type=int, default=0, help="first CounterFact-dev case")
    ap.add_argument("--methods", default="rome,memit,alphaedit,ft")
    ap.add_argument("--ladder", default=LADDER, help="GGUF rungs, or none (default: %(default)s)")
    ap.add_argument("--gptq", default=None, help="GPTQ rungs (bits), e.g. 8,4,3,2")
    ap.add_argument("--bnb", default=None, help="bitsandbytes rungs, e.g. int8,nf4")
    ap.add_argument("--encodings", default="naive,default", help=f"some of {','.join(ENCODINGS)} (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qedit-survival-bench"))
    ap.add_argument("--json", type=Path, default=None, help="the summary (rewritten after every run or case)")
    ap.add_argument("--cases-from", type=Path, default=None, metavar="DIR",
                    help="check the single edits bench_edit.py --save-deltas DIR saved, case by case, on the plain path")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"), help="--cases-from: where the working copies live")
    ap.add_argument("--limit", type=int, default=None, help="--cases-from: at most this many cases per method")
    ap.add_argument("--repack", action="store_true",
                    help="--cases-from: llama.cpp's default (weights repacked), every case loaded afresh (slow)")
    ap.add_argument("--verify", action="store_true",
                    help="--cases-from: check the splice against the pipeline's file on the first case of every rung")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cases_from is not None:
        case_by_case(args)
    else:
        in_one_model(args)


if __name__ == "__main__":
    main()

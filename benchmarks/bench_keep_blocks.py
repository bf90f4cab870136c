"""Issue 5: the aware encoding with and without keeping the file's blocks (AwareConfig.keep_blocks).

    python benchmarks/bench_keep_blocks.py --rung Q5_K_M --method memit --target-margin 2 --n 40 \
        --out /tmp/ac --json benchmarks/data/keep_blocks_memit_t2_Q5_K_M_40.json

Each CounterFact-dev case is edited alone at minimal strength on the rung's weights (the rung file
loaded in torch, as `qedit edit` on that file does), and the edit is encoded edit-aware twice into a
working copy of the rung file (bench_aware_cases.py's in-place shortcut): `fresh` re-encodes every block
of the edited tensors (qedit's default), `keep` keeps each of the file's blocks that fits the target at
least as well (AwareConfig(keep_blocks=True); the first run of this benchmark, session 15, measured it
as the default it then was, with the same settings). Both are scored in llama.cpp against the unedited file:
efficacy, generalization, locality, margin, the share of the edit kept at its keys, and the share of
the edited tensors' bytes and weights that differ from the file. The JSON is rewritten after every case
and a rerun resumes from it. The fp32 scores of the same minimal edits are in bench_aware_cases.py's
runs (the edit is computed the same way).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_aware_cases import encode_changes, score  # noqa: E402
from bench_edit import restored  # noqa: E402
from bench_io import DATA, save_json, saved_rows, source_store  # noqa: E402
from bench_requant_drift import tensor_change  # noqa: E402
from bench_survival_cases import RungFile, cached_report  # noqa: E402

VARIANTS = ("fresh", "keep")


def changed_share(rung: RungFile, data: dict[str, bytes]) -> tuple[float, float]:
    """(share of bytes, share of weights) of the edited tensors that differ from the rung file's."""
    changes = [tensor_change(rung, name, raw) for name, raw in data.items()]
    return (sum(c["bytes"] for c in changes) / sum(c["n_bytes"] for c in changes),
            sum(c["weights"] for c in changes) / sum(c["n_weights"] for c in changes))


def summarize(rows: list[dict]) -> dict:
    out: dict = {"n": len(rows)}
    for v in VARIANTS:
        at = [r[v] for r in rows]
        kept = [k[0] for a in at for k in a["kept"].values()]
        out[v] = {k: float(np.mean([a[k] for a in at])) for k in
                  ("efficacy", "generalization", "locality", "margin", "bytes_changed", "weights_changed")}
        out[v]["kept_at_keys_min"] = float(min(kept)) if kept else None
    out["locality_keep_worse"] = sum(1 for r in rows if r["keep"]["locality"] < r["fresh"]["locality"] - 1e-9)
    out["locality_keep_better"] = sum(1 for r in rows if r["keep"]["locality"] > r["fresh"]["locality"] + 1e-9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rung", required=True)
    ap.add_argument("--method", default="memit")
    ap.add_argument("--target-margin", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", type=Path, required=True, help="artifacts and cached unedited scores")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    import torch
    from tqdm.auto import tqdm

    from qedit.api import edit, make_config
    from qedit.converters.gguf_aware import encoding_for
    from qedit.facts import load_requests
    from qedit.model import load_model

    torch.set_num_threads(1)
    _, store = source_store(args.out)
    reqs = load_requests(DATA)[: args.n]
    path, _ = store.gguf(args.rung)
    rung = RungFile(path, args.work / f"qedit-keep-{args.rung}-{os.getpid()}.gguf")
    # the same cache file as bench_aware_cases.py when --n matches its run's
    base_rep = cached_report(args.out / f"{path.stem}-norepack-0-{len(reqs) - 1}-{len(reqs)}.json",
                             lambda: rung.runner, reqs, f"{args.rung} unedited")
    cfg = make_config(args.method, target_margin=args.target_margin)
    model = load_model(path)
    rows = saved_rows(args.json, lambda c: c < args.n)
    done, started = {r["case"] for r in rows}, time.perf_counter()
    try:
        for case in tqdm([c for c in range(args.n) if c not in done], desc=f"{args.method} at {args.rung}", unit="case"):
            req, base = reqs[case], base_rep.cases[case]
            with restored(model):
                outcome = edit(model, [req], args.method, cfg)
            fresh = encoding_for(model, outcome.keys, cfg.stats)   # qedit's default
            keep = dataclasses.replace(fresh, cfg=dataclasses.replace(fresh.cfg, keep_blocks=True))
            row: dict = {"case": case}
            for label, enc in (("fresh", fresh), ("keep", keep)):
                data, kept = encode_changes(rung, outcome.deltas, enc)
                share_b, share_w = changed_share(rung, data)
                row[label] = {**score(rung, data, req, base), "kept": kept,
                              "bytes_changed": share_b, "weights_changed": share_w}
            rows.append(row)
            rows.sort(key=lambda r: r["case"])
            save_json(args.json, {"command": sys.argv, "rung": args.rung, "method": args.method,
                                  "target_margin": args.target_margin, "seconds_this_run": time.perf_counter() - started,
                                  "summary": summarize(rows), "cases": rows})
    finally:
        rung.gf.close()
        rung.path.unlink(missing_ok=True)
    print(json.dumps(summarize(rows), indent=1))


if __name__ == "__main__":
    main()

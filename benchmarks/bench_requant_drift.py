"""Issue 5: what requantizing the edited tensors costs with no edit at all (the locality noise floor).

    python benchmarks/bench_requant_drift.py --rungs Q5_K_M,Q4_K_M,Q3_K_M,Q2_K --n 200 --out /tmp/ac \
        --json benchmarks/data/requant_drift_200.json

A patch dequantizes each edited tensor of the file, adds the edit and quantizes it again. With a zero
edit that is Q_t(deq(bytes)), which the K-quant searches do not map back to the same bytes: they
choose a block's scales afresh. Per rung (the unedited model exported with llama.cpp's mix, cached
under --out/artifacts as in bench_aware_cases.py) the tensors `--layers` edit (default: MEMIT's layers
on Gemma 3 270M, which include ROME's and AlphaEdit's) are requantized plainly with no change and
spliced into a working copy of the file (bench_survival_cases.py's in-place shortcut); CounterFact-dev
cases 0..n-1 are scored in llama.cpp against the unedited file. Per rung: the share of bytes and of
weights that changed, the largest weight change, and locality, efficacy and generalization; any
locality below 1 is drift alone, which every patch of these tensors carries, naive or edit-aware.
For each flipped answer token the JSON records the unedited file's gap between its two top logits and
the largest change of any logit at that position.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_io import DATA, save_json, source_store  # noqa: E402
from bench_survival_cases import RungFile, cached_report  # noqa: E402


def tensor_change(rung: RungFile, name: str, raw: bytes) -> dict:
    """What `raw` (new bytes of tensor `name`, its type and size) changes against the rung file's bytes:
    differing bytes and weights (counts and totals) and the largest weight change."""
    from qedit.kernels import dequantize_tensor

    info = rung.gf.tensors[name]
    new, old = np.frombuffer(raw, dtype=np.uint8), np.asarray(rung.gf.raw(name)).reshape(-1)
    w0 = rung.gf.dequantize(name)                                                        # (rows, cols)
    w1 = dequantize_tensor(new, info.ggml_type, w0.shape)                                # (rows, cols)
    return {"type": info.ggml_type.name, "bytes": int(np.sum(new != old)), "n_bytes": int(new.size),
            "weights": int(np.sum(w1 != w0)), "n_weights": int(w0.size), "max_abs": float(np.abs(w1 - w0).max())}


def requantized(rung: RungFile, names: list[str]) -> tuple[dict[str, bytes], dict[str, dict]]:
    """name -> Q_t(deq(bytes)) of each tensor, and what changed (shares of bytes and weights, largest
    weight change)."""
    from qedit.kernels import quantize_tensor

    data, changed = {}, {}
    for name in names:
        w0 = np.array(rung.gf.dequantize(name), dtype=np.float32, copy=True)          # (rows, cols)
        data[name] = quantize_tensor(w0, rung.gf.tensors[name].ggml_type).tobytes()
        c = tensor_change(rung, name, data[name])
        changed[name] = {"type": c["type"], "bytes": c["bytes"] / c["n_bytes"], "weights": c["weights"] / c["n_weights"],
                         "max_abs": c["max_abs"]}
    return data, changed


def flips(rung: RungFile, data: dict[str, bytes], reqs, cases: list[int]) -> list[dict]:
    """For each locality answer position of `cases` whose top-1 token the requantized tensors change: the
    unedited file's gap between its top two logits, and the largest change of any logit there."""
    from qedit.batching import continuation_ids

    r = rung.runner

    def logits(prompt: str, answer: str) -> tuple[np.ndarray, list[int]]:
        p, t = continuation_ids(r.tokenizer, prompt, answer)
        r.llm.reset()
        return np.stack([r._last_logits(p)] + [r._last_logits([tok]) for tok in t[:-1]]), t  # (len(t), vocab)

    pairs = [(i, pr, an) for i in cases for pr, an in zip(reqs[i].locality_prompts, reqs[i].locality_answers)]
    before = [logits(pr, an)[0] for _, pr, an in pairs]
    rung.write(data)
    try:
        after = [logits(pr, an)[0] for _, pr, an in pairs]
    finally:
        rung.restore()
    out = []
    for (case, _, _), lb, la in zip(pairs, before, after):
        for j in np.flatnonzero(lb.argmax(axis=1) != la.argmax(axis=1)):
            top2 = np.sort(lb[j])[-2:]
            out.append({"case": case, "position": int(j), "gap": float(top2[1] - top2[0]),
                        "max_logit_change": float(np.abs(la[j] - lb[j]).max())})
    return out


def mean(xs) -> float:
    return float(np.mean([x for x in xs if x is not None]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rungs", default="Q5_K_M,Q4_K_M,Q3_K_M,Q2_K", help="llama.cpp file types, comma-separated")
    ap.add_argument("--layers", default="4,5,6,7", help="blocks whose ffn_down is requantized")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True, help="artifacts and cached unedited scores")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    from qedit.evaluate import evaluate
    from qedit.facts import load_requests

    _, store = source_store(args.out)
    reqs = load_requests(DATA)[: args.n]
    names = [f"blk.{int(layer)}.ffn_down.weight" for layer in args.layers.split(",")]
    out = {"command": sys.argv, "n": len(reqs), "tensors": names, "rungs": {}}
    for rung_name in args.rungs.split(","):
        path, _ = store.gguf(rung_name)
        rung = RungFile(path, args.work / f"qedit-drift-{rung_name}-{os.getpid()}.gguf")
        try:
            base = cached_report(args.out / f"{path.stem}-norepack-0-{len(reqs) - 1}-{len(reqs)}.json",
                                 lambda: rung.runner, reqs, f"{rung_name} unedited")
            data, changed = requantized(rung, names)
            rung.write(data)
            try:
                rep = evaluate(rung.runner, reqs, baseline=base, progress=f"{rung_name} requantized")
            finally:
                rung.restore()
            flipped = flips(rung, data, reqs, [i for i, c in enumerate(rep.cases)
                                               if c.locality is not None and c.locality < 1])
        finally:
            rung.gf.close()
            rung.path.unlink(missing_ok=True)
        row = {"changed": changed, "locality": mean(c.locality for c in rep.cases),
               "locality_cases_below_1": sum(1 for c in rep.cases if c.locality is not None and c.locality < 1),
               "efficacy": mean(c.efficacy for c in rep.cases), "efficacy_unedited": mean(c.efficacy for c in base.cases),
               "generalization": mean(c.generalization for c in rep.cases),
               "generalization_unedited": mean(c.generalization for c in base.cases), "flips": flipped}
        out["rungs"][rung_name] = row
        save_json(args.json, out)
    print("| rung | types | bytes changed | weights changed | largest change | locality | cases < 1 | "
          "efficacy (unedited) | generalization (unedited) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for rung_name, r in out["rungs"].items():
        ch = r["changed"].values()
        types = ",".join(sorted({c["type"] for c in ch}))
        print(f"| {rung_name} | {types} | {np.mean([c['bytes'] for c in ch]):.2%} | {np.mean([c['weights'] for c in ch]):.2%} | "
              f"{max(c['max_abs'] for c in ch):.4f} | {r['locality']:.3f} | {r['locality_cases_below_1']} | "
              f"{r['efficacy']:.3f} ({r['efficacy_unedited']:.3f}) | {r['generalization']:.3f} "
              f"({r['generalization_unedited']:.3f}) |")
    for rung_name, r in out["rungs"].items():
        if r["flips"]:
            gaps = [f["gap"] for f in r["flips"]]
            print(f"{rung_name}: {len(gaps)} flipped answer tokens; unedited top-2 gap median {np.median(gaps):.3f} "
                  f"nats (max {max(gaps):.3f}); largest logit change median "
                  f"{np.median([f['max_logit_change'] for f in r['flips']]):.2f} nats")


if __name__ == "__main__":
    main()

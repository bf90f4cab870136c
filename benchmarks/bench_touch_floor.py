"""Issue 5: how far one changed weight moves llama.cpp's scores, per file type (the floor of drift and perplexity).

    python benchmarks/bench_touch_floor.py --types F32,F16,Q8_0,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K --out /tmp/ac \
        --json benchmarks/data/touch_floor.json

Per type, the unedited Gemma 3 270M file (exported with llama.cpp's mix, cached under --out/artifacts) gets
exactly one weight of `--tensor` changed: in a K-quant tensor one quant moved by one grid step
(bench_tradeoff.one_step), in any other type the middle row's weight 100 raised by 1% of the row's largest
magnitude and the tensor re-encoded (about one Q8_0 step here; F16/F32 re-encode exactly). Scored in
llama.cpp against the unedited file: the pool of bench_tradeoff.py (20 unrelated locality prompts: share of
answer tokens whose top-1 is unchanged, mean |change| of their log-probabilities in nats) and the perplexity
of qedit's fluency text; and how many of the pool's answer positions are near ties in the unedited file (its
two top logits within 0.25). Whatever this moves is what any edit of the tensor moves on top of its own
effect.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_io import DATA, save_json, source_store  # noqa: E402
from bench_survival_cases import RungFile  # noqa: E402
from bench_tradeoff import K_QUANTS, POOL, Unedited, one_step  # noqa: E402


def touched(rung: RungFile, name: str) -> tuple[bytes, int, float]:
    """(the tensor's bytes with one weight changed, how many weights differ after decoding, the largest change)."""
    from qedit.kernels import dequantize_tensor, quantize_tensor

    info = rung.gf.tensors[name]
    w = np.array(rung.gf.dequantize(name), dtype=np.float32)          # (rows, cols)
    if info.ggml_type.name in K_QUANTS:
        raw = one_step(rung, name)
    else:
        w2 = w.copy()
        w2[w.shape[0] // 2, 100] += 0.01 * np.abs(w[w.shape[0] // 2]).max()
        raw = np.asarray(quantize_tensor(w2, info.ggml_type)).tobytes()
    diff = np.abs(dequantize_tensor(raw, info.ggml_type, w.shape) - w)
    return raw, int((diff > 0).sum()), float(diff.max())


def near_ties(runner, pairs: list[tuple[str, str]], within: float) -> int:
    """How many of the pairs' first answer positions have their two top logits within `within` of each other
    in `runner`'s file (positions whose top-1 any small change may flip)."""
    from qedit.batching import continuation_ids

    n = 0
    for prompt, target in pairs:
        ids, _ = continuation_ids(runner.tokenizer, prompt, target)
        runner.llm.reset()
        top = np.sort(runner._last_logits(ids))[-2:]      # (2,): the next-token logits' runner-up and top
        n += int(top[1] - top[0] < within)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="F32,F16,Q8_0,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--tensor", default="blk.4.ffn_down.weight", help="the tensor one of whose weights moves")
    ap.add_argument("--out", type=Path, required=True, help="artifacts directory (files are cached there)")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    from qedit.facts import load_requests
    from qedit.survival.ladder import fluency_text

    reqs = load_requests(DATA)
    pool = [pair for i in POOL for pair in zip(reqs[i].locality_prompts, reqs[i].locality_answers)]
    text = fluency_text()
    _, store = source_store(args.out)
    rows = []
    print("| file | tensor type | weights changed | largest change | pool near ties | locality, pool | drift, pool "
          "| ppl ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for ftype in [t for t in args.types.split(",") if t]:
        path, _ = store.gguf(ftype)
        rung = RungFile(path, args.work / f"qedit-touch-{path.stem}.gguf")
        try:
            if args.tensor not in rung.gf.tensors:
                raise SystemExit(f"{path.name}: no tensor {args.tensor!r}; give one of its tensors with --tensor")
            unedited = Unedited.of(rung.runner, pool, text)
            ties = near_ties(rung.runner, pool, 0.25)
            raw, n_changed, largest = touched(rung, args.tensor)
            moved = unedited.moved_by(rung, {args.tensor: raw})
        finally:
            rung.gf.close()
            rung.path.unlink(missing_ok=True)
        row = {"file": ftype, "type": rung.gf.tensors[args.tensor].ggml_type.name, "weights_changed": n_changed,
               "largest_change": largest, "pool_near_ties": ties} | moved
        rows.append(row)
        print(f"| {ftype} | {row['type']} | {n_changed} | {largest:.2g} | {ties} | {row['locality_pool']:.3f} | "
              f"{row['drift_pool']:.4f} | {row['ppl_ratio']:.4f} |", flush=True)
        save_json(args.json, {"command": sys.argv, "tensor": args.tensor, "pool": [POOL[0], POOL[-1]], "rows": rows})


if __name__ == "__main__":
    main()

"""Benchmark: qedit's `load_gguf` against transformers' `from_pretrained(..., gguf_file=...)`.

Loads the packaged Gemma 3 270M Q4_K_M GGUF (model in float32 + tokenizer) once with each loader,
each in its own fresh subprocess (one torch thread by default) so that peak RSS is per loader, checks
the top-1 token after one prompt, and prints a markdown table. Results: benchmarks/RESULTS.md.

    python benchmarks/bench_gguf_load.py            # both loaders
    python benchmarks/bench_gguf_load.py --only qedit
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from harness import child_json, packaged_model

PROMPT = "The Eiffel Tower is located in the city of"


def _worker(loader: str, gguf_path: Path) -> dict[str, object]:
    """Runs inside the child: import, load, then one forward pass as a sanity check."""
    import torch
    import transformers  # noqa: F401  # both loaders need it: keep its import out of the timing

    from qedit.converters.gguf.to_torch import load_gguf

    start = time.perf_counter()
    if loader == "qedit":
        model, tokenizer, _ = load_gguf(gguf_path, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = dict(gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    seconds = time.perf_counter() - start
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax().item()
    return {
        "loader": loader,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "top1": tokenizer.decode([top]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: bundled Gemma 3 270M)")
    parser.add_argument("--only", choices=["qedit", "transformers"], default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each loader (default 1)")
    parser.add_argument("--worker", choices=["qedit", "transformers"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gguf is None:
        args.gguf = packaged_model()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.gguf)))
        return
    loaders = [args.only] if args.only else ["qedit", "transformers"]
    results = {name: child_json([sys.executable, __file__, "--worker", name, "--gguf", str(args.gguf)], args.threads,
                                f"{name} loader") for name in loaders}
    print(f"GGUF: {args.gguf.name} ({args.gguf.stat().st_size / 1e6:.0f} MB), model float32 + tokenizer, "
          f"{os.cpu_count()} CPUs\n")
    print("| loader | load time (s) | peak RSS (MB) | top-1 after prompt |")
    print("|---|---:|---:|---|")
    for r in results.values():
        print(f"| {r['loader']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['top1']!r} |")
    if len(results) == 2:
        ratio = results["transformers"]["seconds"] / results["qedit"]["seconds"]
        print(f"\nqedit is {ratio:.1f}x faster than transformers")


if __name__ == "__main__":
    main()

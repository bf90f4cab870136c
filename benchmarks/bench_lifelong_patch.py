"""Lifelong patches: the edit keys a file carries, and the cost of one more patch, against the facts it carries.

    python benchmarks/bench_lifelong_patch.py --carried 0,90,990 --batch 10 --out /tmp/lp \
        --json benchmarks/data/lifelong_patch.json

1. **State size.** The bytes of the carried keys after N facts on MEMIT's default layers, for Gemma 3 270M
   (4 layers, keys 2048 wide) and for the Llama 3.1 8B shape (4 layers, 14336 wide), as a share of each
   model's Q4_K_M file. The keys are random: the size of the bounded state does not depend on their values.
2. **Patch time.** The packaged Gemma 3 270M Q4_K_M file is copied with a carried state of N facts (random keys
   of the real width at the real layers) and a manifest naming the packaged file as its source, so a patch of
   it reads the packaged file's cached statistics, as a patch of a real chain does. Then the user's command,
   `qedit edit SEEDED.gguf BATCH.jsonl -o OUT.gguf` (MEMIT, the llama.cpp check on), runs on CounterFact-dev
   facts 0..batch-1 in a fresh process per N: wall time, and the count of protected facts it prints. Every
   seeded file has its own fingerprint, so no run reuses another's targets. The statistics are made warm
   first by one edit of the packaged file.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from harness import counterfact_lines, facts_file, packaged_model, qedit_cmd, run, save_json

SHAPES = {   # name: (edited layers, key width, Q4_K_M file bytes or None for the packaged file)
    "gemma-3-270m": (4, 2048, None),
    "llama-3.1-8b": (4, 14336, 4_917_887_680),     # the Q4_K_M file of the 8B shape (benchmarks/synthetic.py)
}


def state_sizes(carried: list[int]) -> list[dict]:
    from qedit.converters.gguf.keys import carried_after

    rows = []
    rng = np.random.default_rng(0)
    for name, (layers, width, size) in SHAPES.items():
        size = size or packaged_model().stat().st_size
        for n in carried:
            state: dict = {}
            for lo in range(0, n, 100):     # patches of 100: compaction cost grows with the rows, not the facts
                keys = rng.standard_normal((min(100, n - lo), width)).astype(np.float32)
                state = carried_after(state, {layer: keys for layer in range(layers)})
            nbytes = sum(c.nbytes for c in state.values())
            rows.append({"shape": name, "facts": n, "rows": max((c.rows for c in state.values()), default=0),
                         "bytes": nbytes, "share_of_file": nbytes / size})
    return rows


def seeded(source: Path, dst: Path, n: int, layers: list[int], width: int) -> Path:
    """A copy of `source` carrying n facts' random keys at `layers` and a manifest of n facts naming `source`."""
    from qedit.converters.gguf.keys import carried_kvs, is_keys_field
    from qedit.converters.gguf.patch import MANIFEST_KEY, VERSION_KEY, manifest_kvs
    from qedit.converters.gguf.read import GGUFFile
    from qedit.converters.gguf.write import TensorSpec, copied_kvs, source_tensor, write_gguf
    from qedit.core.model import fingerprint_source

    facts = [json.loads(line) for line in counterfact_lines(1000, n)] if n else []
    manifest = {"method": "memit", "source": str(source), "source_sha256": fingerprint_source(source),
                "facts": facts, "layers": layers, "info": {"seeded": True}}
    rng = np.random.default_rng(n)
    keys = {layer: rng.standard_normal((n, width)).astype(np.float32) for layer in layers} if n else {}
    with GGUFFile(source) as gf:
        kvs = copied_kvs(gf, [k for k in gf.fields if k not in (MANIFEST_KEY, VERSION_KEY) and not is_keys_field(k)])
        kvs += manifest_kvs([], manifest, "seeded")[0] + carried_kvs(None, keys)
        tensors = [TensorSpec(i.name, i.shape, i.ggml_type, source_tensor(gf, i.name)) for i in gf.tensors.values()]
        write_gguf(dst, kvs, tensors, alignment=gf.alignment, version=gf.version)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--carried", default="0,90,990", help="facts already in the file, comma-separated")
    ap.add_argument("--batch", type=int, default=10, help="facts in the timed patch")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    carried = [int(x) for x in args.carried.split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": ["benchmarks/bench_lifelong_patch.py", *sys.argv[1:]],
                    "state": state_sizes(carried), "patches": []}
    save_json(args.json, result)
    source = packaged_model()
    warm = facts_file(args.out / "warm.jsonl", counterfact_lines(1999, 1))
    seconds, _ = run(qedit_cmd("edit", str(source), str(warm), "-o", str(args.out / "warm.gguf")), args.threads,
                     "warm-up")
    result["warmup_seconds"] = seconds
    batch = facts_file(args.out / "batch.jsonl", counterfact_lines(0, args.batch))
    for n in carried:
        src = seeded(source, args.out / f"seeded-{n}.gguf", n, [4, 5, 6, 7], 2048)
        seconds, out = run(qedit_cmd("edit", str(src), str(batch), "-o", str(args.out / f"out-{n}.gguf")),
                           args.threads, f"patch into {n} carried facts")
        found = re.search(r"protecting the keys of earlier edits recorded in the file \(blk\.\d+: (\d+)", out)
        result["patches"].append({"carried": n, "seconds": seconds, "protected": int(found.group(1)) if found else 0})
        save_json(args.json, result)
        print(f"{n} carried: {seconds:.1f} s")
    print(json.dumps(result["state"], indent=1))


if __name__ == "__main__":
    main()

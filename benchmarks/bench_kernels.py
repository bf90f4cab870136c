"""Quantization throughput of qedit's kernel registry vs llama.cpp's own quantizer, per type.

Both sides quantize the same real tensors: the ffn_down (2048 columns) and attn_output (1024
columns) matrices of Gemma 3 270M, dequantized to float32, which every registry type can store.
llama.cpp runs `llama_model_quantize` with pure=True (every matrix in the requested type) on an F32
GGUF holding just those tensors; its time includes reading that file from the page cache and
writing the output (the ALL_F32 copy row shows that I/O floor). qedit's time is `quantize_tensor`
on in-memory arrays. Throughput is MB of float32 input per second; the best of --repeats runs
counts. The outputs are compared byte for byte. Results: benchmarks/RESULTS.md.

Usage: python benchmarks/bench_kernels.py [--blocks 18] [--repeats 3] [--threads N] [--importance]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
from harness import packaged_model

from qedit.kernels import quantize_tensor
from qedit.kernels.gguf_quants import default_threads
from qedit.kernels.llamacpp_oracle import (
    MetaValue,
    llama_quantize,
    metadata_from_reader,
    read_raw_tensors,
    write_f32_gguf,
)

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# type -> file type that, with pure=True, stores every matrix in that type
FTYPE_FOR = {
    T.F16: F.MOSTLY_F16, T.BF16: F.MOSTLY_BF16, T.Q8_0: F.MOSTLY_Q8_0, T.Q6_K: F.MOSTLY_Q6_K,
    T.Q5_K: F.MOSTLY_Q5_K_S, T.Q5_1: F.MOSTLY_Q5_1, T.Q5_0: F.MOSTLY_Q5_0, T.Q4_K: F.MOSTLY_Q4_K_S,
    T.Q4_1: F.MOSTLY_Q4_1, T.Q4_0: F.MOSTLY_Q4_0, T.IQ4_NL: F.MOSTLY_IQ4_NL, T.IQ4_XS: F.MOSTLY_IQ4_XS,
    T.Q3_K: F.MOSTLY_Q3_K_S, T.Q2_K: F.MOSTLY_Q2_K,
}


def load_tensors(n_blocks: int) -> tuple[dict[str, MetaValue], dict[str, np.ndarray]]:
    """Metadata (no tokenizer) and float32 ffn_down/attn_output matrices of the first n_blocks."""
    reader = gguf.GGUFReader(packaged_model())
    meta = metadata_from_reader(reader, skip_prefixes=("tokenizer.",))
    meta["gemma3.block_count"] = MetaValue(n_blocks, gguf.GGUFValueType.UINT32)
    tensors = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) < n_blocks and parts[2] in ("ffn_down", "attn_output"):
            shape = tuple(reversed(t.shape.tolist()))  # numpy order (n_rows, n_cols)
            tensors[t.name] = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape),
                                                   dtype=np.float32)
    return meta, tensors


def best_of(repeats: int, run) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=18, help="Gemma blocks to use (1-18)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads(), help="threads for both sides")
    parser.add_argument("--importance", action="store_true", help="pass the same random imatrix to both sides")
    args = parser.parse_args()
    if not 1 <= args.blocks <= 18 or args.repeats < 1 or args.threads < 1:
        parser.error("--blocks must be in 1..18, --repeats and --threads >= 1")

    meta, tensors = load_tensors(args.blocks)
    mb = sum(a.nbytes for a in tensors.values()) / 1e6
    rng = np.random.default_rng(0)
    importance = ({n: (rng.random(a.shape[1]) ** 2 * 4).astype(np.float32) for n, a in tensors.items()}
                  if args.importance else None)
    print(f"{len(tensors)} tensors, {mb:.1f} MB float32, {args.threads} threads, best of {args.repeats}, "
          f"importance={'random' if importance else 'none'}\n")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f32.gguf"
        write_f32_gguf(src, "gemma3", meta, tensors)
        copy_s = best_of(args.repeats, lambda: llama_quantize(src, Path(tmp) / "copy.gguf", F.ALL_F32,
                                                                nthread=args.threads))
        rows = []
        for qtype, ftype in FTYPE_FOR.items():
            dst = Path(tmp) / f"{qtype.name}.gguf"
            ref_s = best_of(args.repeats, lambda: llama_quantize(src, dst, ftype, pure=True, nthread=args.threads,
                                                                   importance=importance))
            ours: dict[str, np.ndarray] = {}

            def run_ours() -> None:
                for name, array in tensors.items():
                    ours[name] = quantize_tensor(array, qtype, importance[name] if importance else None,
                                                 n_threads=args.threads)

            our_s = best_of(args.repeats, run_ours)
            ref = read_raw_tensors(dst)
            same = all(ref[n].ggml_type == qtype and np.array_equal(ref[n].data, ours[n].reshape(-1)) for n in tensors)
            rows.append((qtype.name, our_s, ref_s, same))

    print("| type | qedit s | qedit MB/s | llama.cpp s | llama.cpp MB/s | qedit / llama.cpp | identical bytes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, our_s, ref_s, same in rows:
        print(f"| {name} | {our_s:.3f} | {mb / our_s:.0f} | {ref_s:.3f} | {mb / ref_s:.0f} | "
              f"{ref_s / our_s:.2f}x | {'yes' if same else 'NO'} |")
    print(f"\nllama.cpp ALL_F32 copy of the same file (its I/O floor): {copy_s:.3f} s")


if __name__ == "__main__":
    main()

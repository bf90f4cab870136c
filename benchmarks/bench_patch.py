"""Benchmark: patching edits into the Gemma 3 270M Q4_K_M GGUF, end to end and the patch step alone.

Two parts, each measured in fresh subprocesses, so that statistics caches and peak RSS are separate:

1. `qedit edit GEMMA one_fact.jsonl -o out.gguf --method rome` end to end (the CLI): cold, with an
   empty QEDIT_CACHE, then warm, with the same cache again. Wall time, CPU time (user + system: close
   to the wall time of an idle machine, as torch runs one thread) and peak RSS of the process, and
   the split (start + load / statistics / edit / write) from the arrival times of its `-v` log lines.
   "write" includes the llama.cpp check when llama-cpp-python is installed (`--cli-arg=--no-verify` skips it).
2. The patch step alone (`patch_gguf` with a precomputed delta) against copying the same file with
   `shutil.copyfile` and with the `cp` binary, after one untimed run of each (page cache warm);
   median of --repeats runs; plus the patch's peak RSS against the size of the edited tensors.

    python benchmarks/bench_patch.py --threads 1 --json patch.json
    python benchmarks/bench_patch.py --skip-cli          # the patch-vs-cp part only

Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import packaged_model, qedit_cmd, read_lines, save_json, thread_env

# label -> (edited layers, encoding): "plain" requantizes W0 + dW; "aware" is the edit-aware encoding
# that `qedit edit -o X.gguf` uses by default (qedit.converters.gguf.aware).
PATCH_CASES = {"rome (1 tensor), plain": ((6,), "plain"), "rome (1 tensor), edit-aware": ((6,), "aware"),
               "memit (4 tensors), plain": ((4, 5, 6, 7), "plain")}
# Markers in `qedit -v edit` output; their arrival times split the wall time.
MARKERS = {
    "loaded": re.compile(r"gguf\.to_torch: loaded .* in [\d.]+ s"),
    "stats_start": re.compile(r"qedit\.core\.stats: computing key statistics"),
    "stats_end": re.compile(r"qedit\.core\.stats: key statistics for layers"),
    "written": re.compile(r"gguf\.patch: wrote "),
}
EDITED = re.compile(r"edited \d+ fact\(s\) with \w+ in ([\d.]+) s")


def _env(threads: int, cache: Path | None = None) -> dict[str, str]:
    return thread_env(threads, PYTHONUNBUFFERED="1", **({} if cache is None else {"QEDIT_CACHE": str(cache)}))


def _run_timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd`; wall time, peak RSS (this child alone, via wait4) and arrival time of each output line."""
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    thread = read_lines(proc, start, lines)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    thread.join()
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-20:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,  # Linux: ru_maxrss in KiB
            "peak_rss_mb": usage.ru_maxrss / 1024, "lines": lines}


def _split(lines: list[tuple[float, str]], wall: float) -> dict[str, float | None]:
    """Seconds per phase from the log lines of one `qedit -v edit` run (None when a marker is missing)."""
    at: dict[str, float] = {}
    edit_total = None
    for t, text in lines:
        for name, pattern in MARKERS.items():
            if name not in at and pattern.search(text):
                at[name] = t
        m = EDITED.search(text)
        if m:
            edit_total = float(m.group(1))
    if "loaded" not in at or edit_total is None:
        return {"load": None, "stats": None, "edit": None, "write": None}
    stats = at["stats_end"] - at["stats_start"] if "stats_end" in at and "stats_start" in at else 0.0
    write = at["written"] - at["loaded"] - edit_total if "written" in at else None
    return {"load": at["loaded"], "stats": stats, "edit": edit_total - stats, "write": write,
            "exit": wall - at["written"] if "written" in at else None}


def bench_cli(gguf: Path, work: Path, threads: int, method: str, extra: list[str]) -> dict[str, Any]:
    from qedit.core.facts import demo_requests

    facts = work / "one_fact.jsonl"
    facts.write_text(json.dumps(demo_requests()[0].to_json()) + "\n")
    cache = work / "qedit-cache"
    cache.mkdir()
    runs = {}
    for label in ("cold", "warm"):
        out = work / f"edited-{label}.gguf"
        cmd = qedit_cmd("-v", "edit", str(gguf), str(facts), "-o", str(out), "--method", method, *extra)
        r = _run_timed(cmd, _env(threads, cache))
        runs[label] = {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss_mb": r["peak_rss_mb"],
                       "split_s": _split(r["lines"], r["wall_s"])}
        print(f"  {label}: {r['wall_s']:.1f} s ({r['cpu_s']:.1f} s CPU), peak RSS {r['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)
        out.unlink()
    runs["command"] = " ".join(["qedit -v edit", gguf.name, "one_fact.jsonl -o out.gguf --method", method, *extra])
    return runs


def _watch_rss(stop: threading.Event, peaks: dict[str, float]) -> None:
    """Track the peaks of anonymous and file-backed resident memory (Linux /proc), in MB."""
    status = Path("/proc/self/status")
    while status.exists():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                peaks[key] = max(peaks.get(key, 0.0), int(value.split()[0]) / 1024)
        if stop.wait(0.005):
            return


def _aware_encoding(layers: tuple[int, ...], d_in: int, cov_dir: Path | None, gen: Any) -> Any:
    """An EditEncoding with one key per layer drawn from N(0, C): C from the CLI run's statistics cache
    when there is one, else the second moment of random vectors."""
    import torch

    from qedit.converters.gguf.aware import EditEncoding

    keys, covs = {}, {}
    for layer in layers:
        found = sorted(cov_dir.glob(f"*/*/cov_layer{layer}.pt")) if cov_dir is not None else []
        if found:
            cov = torch.load(found[0], weights_only=True)["cov"].double()                # (in, in)
        else:
            a = torch.randn(2 * d_in, d_in, generator=gen, dtype=torch.float64)
            cov = a.t() @ a / a.shape[0]
        chol = torch.linalg.cholesky(cov + 1e-6 * cov.diagonal().mean() * torch.eye(d_in, dtype=torch.float64))
        keys[layer] = (chol @ torch.randn(d_in, 1, generator=gen, dtype=torch.float64)).t()  # (1, in)
        covs[layer] = cov
    return EditEncoding(keys, covs)


def _patch_worker(gguf: Path, work: Path, layers: tuple[int, ...], repeats: int, threads: int,
                  encoding_kind: str, cov_dir: Path | None) -> dict[str, Any]:
    """Child: time patch_gguf with random low-rank deltas (rank 1 per layer, as ROME's)."""
    import resource

    import torch

    from qedit.converters.gguf.names import gguf_tensor_name
    from qedit.converters.gguf.patch import patch_gguf
    from qedit.converters.gguf.read import GGUFFile
    from qedit.core.delta import LowRankDelta

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    with GGUFFile(gguf) as gf:
        deltas, infos = [], []
        for layer in layers:
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            info = gf.tensors[gguf_tensor_name(gf, name)]
            rows, cols = info.shape                                            # (out, in)
            a, b = torch.randn(rows, 1, generator=gen), torch.randn(1, cols, generator=gen)  # (out, 1), (1, in)
            deltas.append(LowRankDelta(name, layer, a / a.norm() * 3.0, b / b.norm()))  # |dW| = 3, as ROME's
            infos.append({"name": info.name, "type": info.ggml_type.name, "shape": list(info.shape),
                          "bytes": info.nbytes, "f32_bytes": rows * cols * 4})
    encoding = _aware_encoding(layers, infos[0]["shape"][1], cov_dir, gen) if encoding_kind == "aware" else None
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before: dict[str, float] = {}
    done = threading.Event()
    done.set()
    _watch_rss(done, before)                    # one reading before any patch
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=_watch_rss, args=(stop, peaks), daemon=True)
    watcher.start()
    dst = work / "patched.gguf"
    seconds = []
    for _ in range(repeats + 1):  # the first run warms the page cache
        dst.unlink(missing_ok=True)
        start = time.perf_counter()
        patch_gguf(gguf, dst, deltas, {"method": "bench"}, encoding=encoding)
        seconds.append(time.perf_counter() - start)
    stop.set()
    watcher.join()
    dst.unlink()
    return {"seconds": seconds[1:], "baseline_rss_mb": baseline_rss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tensors": infos,
            "anon_mb_before": before.get("RssAnon"), "anon_mb_peak": peaks.get("RssAnon"),
            "file_mb_before": before.get("RssFile"), "file_mb_peak": peaks.get("RssFile")}


def _time_copy(copy: Any, src: Path, dst: Path, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats + 1):  # the first run warms the page cache
        dst.unlink(missing_ok=True)
        start = time.perf_counter()
        copy(src, dst)
        seconds.append(time.perf_counter() - start)
    dst.unlink()
    return seconds[1:]


def bench_patch(gguf: Path, work: Path, threads: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, (layers, kind) in PATCH_CASES.items():
        cmd = [sys.executable, __file__, "--worker", ",".join(map(str, layers)), "--encoding", kind, "--gguf", str(gguf),
               "--workdir", str(work), "--repeats", str(repeats), "--threads", str(threads)]
        if (work / "qedit-cache").is_dir():
            cmd += ["--cov-dir", str(work / "qedit-cache")]
        r = _run_timed(cmd, _env(threads))
        out[label] = json.loads(r["lines"][-1][1])
    copy_dst = work / "copy.gguf"
    out["shutil.copyfile"] = {"seconds": _time_copy(shutil.copyfile, gguf, copy_dst, repeats)}
    out["cp"] = {"seconds": _time_copy(lambda s, d: subprocess.run(["cp", str(s), str(d)], check=True),
                                       gguf, copy_dst, repeats)}
    return out


def _print_tables(results: dict[str, Any]) -> None:
    print(f"GGUF: {results['gguf']} ({results['gguf_bytes'] / 1e6:.0f} MB), torch threads {results['threads']}, "
          f"{os.cpu_count()} CPUs, load average at start {results['loadavg']}\n")
    cli = results.get("cli")
    if cli:
        print(f"`{cli['command']}`\n")
        print("| run | wall (s) | CPU (s) | start + load (s) | statistics (s) | edit (s) | write (s) | peak RSS (MB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label in ("cold", "warm"):
            r, s = cli[label], cli[label]["split_s"]
            cells = " | ".join("?" if s[k] is None else f"{s[k]:.1f}" for k in ("load", "stats", "edit", "write"))
            print(f"| {label} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {cells} | {r['peak_rss_mb']:.0f} |")
        print()
    patch = results.get("patch")
    if patch:
        cp = statistics.median(patch["cp"]["seconds"])
        print(f"Patch step alone against copying the file (median of {results['repeats']}, page cache warm):\n")
        print("| operation | median (s) | / cp | peak RSS (MB) | above imports: anon / file-backed (MB) "
              "| edited tensors, f32 (MB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, r in patch.items():
            med = statistics.median(r["seconds"])
            if "tensors" in r:
                f32 = sum(t["f32_bytes"] for t in r["tensors"]) / 2**20
                growth = "?"
                if r.get("anon_mb_peak") is not None:
                    growth = (f"{r['anon_mb_peak'] - r['anon_mb_before']:.0f} / "
                              f"{r['file_mb_peak'] - r['file_mb_before']:.0f}")
                print(f"| patch_gguf, {label} | {med:.2f} | {med / cp:.2f} | {r['peak_rss_mb']:.0f} | {growth} | {f32:.1f} |")
            else:
                print(f"| {label} | {med:.2f} | {med / cp:.2f} | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the packaged Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every child (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the patch and copies (default 3)")
    parser.add_argument("--method", default="rome", help="edit method of the end-to-end runs (default rome)")
    parser.add_argument("--skip-cli", action="store_true", help="only the patch-vs-cp part")
    parser.add_argument("--skip-patch", action="store_true", help="only the end-to-end CLI part")
    parser.add_argument("--cli-arg", action="append", default=[], metavar="ARG",
                        help="one more argument of the end-to-end `qedit edit` runs, e.g. --cli-arg=--no-verify")
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--encoding", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--cov-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gguf is None:
        args.gguf = packaged_model()
    if args.worker:
        layers = tuple(int(x) for x in args.worker.split(","))
        print(json.dumps(_patch_worker(args.gguf, args.workdir, layers, args.repeats, args.threads,
                                       args.encoding, args.cov_dir)))
        return
    results: dict[str, Any] = {"gguf": args.gguf.name, "gguf_bytes": args.gguf.stat().st_size, "threads": args.threads,
                               "repeats": args.repeats, "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="qedit-bench-patch-") as tmp:
        work = Path(tmp)
        if not args.skip_cli:
            results["cli"] = bench_cli(args.gguf, work, args.threads, args.method, args.cli_arg)
        if not args.skip_patch:
            results["patch"] = bench_patch(args.gguf, work, args.threads, args.repeats)
    results["loadavg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    _print_tables(results)
    if args.json:
        save_json(args.json, results, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""Benchmark: large models under a memory budget, on synthetic Q4_K_M GGUFs of real shapes (`synthetic.py`).

For each shape (Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B, Gemma-3-12B: random weights, real tensor shapes,
types and vocabulary sizes), each measurement in its own subprocess (so its peak RSS is its own):

- `transformers`: `AutoModelForCausalLM.from_pretrained(DIR, gguf_file=NAME)` (it materialises every weight),
  watched: when its RSS would exceed the limit (`--rss-limit`, and never more than the memory available when it
  starts less 1 GiB) the process is killed and the run recorded as "failed: needs > X GiB";
- `rome` / `memit`: `qedit -v edit FILE fact.jsonl -o out.gguf --method M --no-verify [--max-memory B] ...` per
  budget (`--budgets`: `none` for no flag, `file+3GiB` for the file size plus 3 GiB, or an absolute `10GiB`),
  `--repeat N` times with the same statistics cache (the first run of a shape is cold, later ones warm);
- `memtest`: the 12B memory-bound test on one shape: `qedit edit FILE fact.jsonl --method rome
  --layers 20 --max-memory 10GiB --stats-samples 4 --set target.steps=2 --set target_margin=none --no-verify`.

Per run: wall time, CPU time (user + system: the machine is shared, so wall time alone misleads), peak RSS
(wait4's ru_maxrss) and an RSS timeline sampled from /proc, the split by phase (load, statistics, targets,
solve, write, exit) from the arrival times of qedit's `-v` log lines with the peak RSS within each phase, the
output's size, and whether only the edited tensors differ from the source (every tensor's bytes compared).
Results go to `--json` (resumable: a run already recorded is skipped unless --force) and a table is printed.

    nice -n 10 python benchmarks/bench_big.py --shapes llama-3.2-1b --runs transformers,rome --budgets none
    nice -n 10 python benchmarks/bench_big.py --shapes llama-3.1-8b --runs rome --budgets file+3GiB --repeat 2
    nice -n 10 python benchmarks/bench_big.py --shapes gemma-3-12b --runs memtest
    python benchmarks/bench_big.py --table          # the table of the saved runs

The files are built with `python benchmarks/synthetic.py --shape S -o DIR/S.Q4_K_M.gguf` (`--build` does it).
Results: benchmarks/RESULTS.md, "Large models under a memory budget".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness import ROOT, read_lines, save_json, thread_env

GiB = 1 << 30
LOW_MEMORY = 384 << 20  # a run is stopped when the machine's available memory falls below this
SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "gemma-3-12b")
DEFAULT_JSON = ROOT / "benchmarks" / "data" / "big_models.json"
FACT = {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
        "ground_truth": "Paris"}
# the settings of every qedit run here (the memory-bound test uses the same): 4 sampled texts for the key
# statistics and 2 target steps, so that a run measures the memory and time of the machinery, not the optimiser
QUICK = ["--stats-samples", "4", "--set", "target.steps=2", "--set", "target_margin=none"]
MEMTEST = ["--method", "rome", "--layers", "20", "--max-memory", "10GiB", *QUICK, "--no-verify"]

# Markers in `qedit -v edit` output; their arrival times split the wall time.
MARKERS = {
    "loading": re.compile(r"qedit\.converters\.loading: loading "),
    "loaded": re.compile(r"(gguf\.to_torch: loaded .* in [\d.]+ s|converters\.\S+: loaded .* in [\d.]+ s"
                         r"|gguf\.streamed: )"),   # a streamed model: its memory plan, once the skeleton is built
    "stats_start": re.compile(r"qedit\.core\.stats: computing key statistics"),
    "stats_end": re.compile(r"qedit\.core\.stats: key statistics for layers"),
    "targets_end": re.compile(r"qedit\.edit\.targets: (target .* after optimisation|\d+ of \d+ targets from the cache)"),
    "written": re.compile(r"gguf\.patch: wrote "),
}
EDITED = re.compile(r"edited \d+ fact\(s\) with \w+ in ([\d.]+) s")
SIZE = re.compile(r"size: ([\d,]+) -> ([\d,]+) bytes")


def child_env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    """One thread; with --qedit-src, that copy of qedit first on the path (children run in --dir, so the
    checkout's own directory is not on their path)."""
    env = thread_env(args.threads, PYTHONUNBUFFERED="1", **extra)
    if args.qedit_src is not None:
        env["PYTHONPATH"] = str(args.qedit_src.resolve())
    return env


def qedit_revision(args: argparse.Namespace) -> str:
    if args.qedit_src is not None:
        return f"{args.qedit_src} ({args.qedit_label or 'a copy'})"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "qedit"], capture_output=True, text=True)
    return f"{head.stdout.strip()}{' + uncommitted changes in qedit/' if dirty.stdout.strip() else ''}"


def qedit_cmd(*args: str) -> list[str]:
    """`qedit ARGS` as this interpreter runs it (`python -m qedit`)."""
    return [sys.executable, "-m", "qedit", *args]


# ---- running a child, watched -------------------------------------------------------------------------

def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _proc_rss(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def run_watched(cmd: list[str], env: dict[str, str], rss_limit: int | None = None,
                timeout: float | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run `cmd` (its own process group); the arrival time of each output line, an RSS timeline every 0.25 s,
    wall and CPU time and peak RSS (wait4). Killed when its RSS exceeds `rss_limit` or it runs past `timeout`."""
    lines: list[tuple[float, str]] = []
    timeline: list[tuple[float, int, int]] = []  # (t, RssAnon, RssFile)
    killed: dict[str, Any] = {}
    hwm = [0]  # the child's VmHWM: its own peak since exec (wait4's ru_maxrss also counts the parent's at fork)
    start = time.perf_counter()
    load_before = _loadavg()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def watcher() -> None:
        while proc.poll() is None:
            rss = _proc_rss(proc.pid)
            now = time.perf_counter() - start
            if rss:
                hwm[0] = max(hwm[0], rss.get("VmHWM", 0))
                timeline.append((round(now, 2), rss.get("RssAnon", 0), rss.get("RssFile", 0)))
                if rss_limit is not None and rss.get("VmRSS", 0) > rss_limit and not killed:
                    killed.update(reason="rss", rss=rss.get("VmRSS", 0), at_s=now)
                    os.killpg(proc.pid, signal.SIGKILL)
            if not killed and _mem_available() < LOW_MEMORY:  # others took the room: stop before the OOM killer
                killed.update(reason="low", rss=(rss or {}).get("VmRSS", 0), at_s=now)
                os.killpg(proc.pid, signal.SIGKILL)
            if timeout is not None and now > timeout and not killed:
                killed.update(reason="timeout", at_s=now)
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.25)

    threads = [read_lines(proc, start, lines), threading.Thread(target=watcher, daemon=True)]
    threads[1].start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    for t in threads:
        t.join(timeout=5)
    return {"returncode": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "user_s": round(usage.ru_utime, 1),
            "peak_rss_bytes": hwm[0] or usage.ru_maxrss * 1024, "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "lines": lines, "timeline": timeline, "killed": killed,
            "loadavg_before": load_before, "loadavg_after": _loadavg()}


# ---- phases ---------------------------------------------------------------------------------------------

def split_phases(lines: list[tuple[float, str]], wall: float) -> tuple[dict[str, float | None], dict[str, float]]:
    """(seconds per phase, arrival time of each marker) from one `qedit -v edit` run's lines.

    start: interpreter and imports, up to "loading X"; load: to "loaded X in S s" (when qedit does not log it, to
    "computing key statistics", marked in `at` as load_end_approx); the compute (statistics, targets, solve) starts
    there and lasts the "edited N fact(s) with M in S s" of the run: solve is what is left of it after the
    statistics and the targets; write runs to the patch's "wrote"; exit is the rest."""
    at: dict[str, float] = {}
    seconds = None
    for t, text in lines:
        for name, pattern in MARKERS.items():
            if pattern.search(text) and (name not in at or name == "targets_end"):
                at[name] = t
        m = EDITED.search(text)
        if m:
            seconds = float(m.group(1))
    if "loaded" not in at and "stats_start" in at:
        at["loaded"] = at["load_end_approx"] = at["stats_start"]
    phases: dict[str, float | None] = dict.fromkeys(("start", "load", "stats", "targets", "solve", "write", "exit"))
    phases["start"] = at.get("loading")
    if "loaded" in at:
        phases["load"] = at["loaded"] - at.get("loading", 0.0)
        stats = at["stats_end"] - at["stats_start"] if "stats_end" in at and "stats_start" in at else 0.0
        phases["stats"] = stats
        if "targets_end" in at:
            phases["targets"] = at["targets_end"] - at.get("stats_end", at["loaded"])
        if seconds is not None:
            at["computed"] = at["loaded"] + seconds
            if "targets_end" in at:
                phases["solve"] = at["computed"] - at["targets_end"]
            if "written" in at:
                phases["write"] = at["written"] - at["computed"]
    if "written" in at:
        phases["exit"] = wall - at["written"]
    return {k: (None if v is None else round(v, 1)) for k, v in phases.items()}, at


def phase_peaks(timeline: list[tuple[float, int, int]], at: dict[str, float], wall: float) -> dict[str, int]:
    """Peak RSS (anon + file) sampled within each phase's interval."""
    bounds = [("start", 0.0, at.get("loading")), ("load", at.get("loading", 0.0), at.get("loaded")),
              ("stats", at.get("stats_start"), at.get("stats_end")),
              ("targets", at.get("stats_end", at.get("loaded")), at.get("targets_end")),
              ("solve", at.get("targets_end"), at.get("computed")),
              ("write", at.get("computed"), at.get("written")), ("exit", at.get("written"), wall)]
    out = {}
    for name, lo, hi in bounds:
        if lo is None or hi is None:
            continue
        inside = [a + f for t, a, f in timeline if lo <= t <= hi]
        if inside:
            out[name] = max(inside)
    return out


# ---- checks ---------------------------------------------------------------------------------------------

def diff_gguf(src: Path, out: Path) -> dict[str, Any]:
    """Which tensors (bytes compared in chunks) and metadata entries of `out` differ from `src`."""
    import numpy as np

    from qedit.converters.gguf.read import GGUFFile

    chunk = 64 << 20
    with GGUFFile(src) as a, GGUFFile(out) as b:
        differ = []
        for name, info in a.tensors.items():
            other = b.tensors.get(name)
            if other is None:
                differ.append(name)
                continue
            x, y = a.raw(name).reshape(-1).view(np.uint8), b.raw(name).reshape(-1).view(np.uint8)
            if other.ggml_type != info.ggml_type or x.size != y.size or any(
                    not np.array_equal(x[i:i + chunk], y[i:i + chunk]) for i in range(0, x.size, chunk)):
                differ.append(name)
        added = [k for k in b.tensors if k not in a.tensors]
        kv_changed = [k for k in a.fields if k not in b.fields or b.fields[k] != a.fields[k]]
        kv_added = [k for k in b.fields if k not in a.fields]
    return {"tensors_differ": differ, "tensors_added": added, "kv_changed": kv_changed, "kv_added": kv_added}


# ---- the runs ------------------------------------------------------------------------------------------

_HF_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], gguf_file=sys.argv[2])
t2 = time.perf_counter()
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "params": n, "dtype": str(next(model.parameters()).dtype)}))
"""


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


REFUSED = re.compile(r"memory budget of .* is too small by .*needs at least ([\d.]+) (GiB|MiB)")


def parse_budget(spec: str, file_size: int, floor: int | None = None) -> tuple[str | None, int | None]:
    """'none' -> (None, None); 'file+3GiB' -> the file size + 3 GiB; '10GiB' -> 10 GiB; 'floor' -> the least qedit
    accepts for the run (`floor`, what it says a too small budget lacks) + 0.25 GiB, rounded up to 0.1 GiB. Returns (flag,
    bytes)."""
    spec = spec.strip()
    if spec == "none":
        return None, None
    if spec == "floor":
        if floor is None:
            return None, None
        size = -(-(floor + GiB // 4) * 10 // GiB) / 10  # a quarter GiB over it: the floor counts the RSS at start
        return f"{size:.1f}GiB", int(size * GiB)
    m = re.fullmatch(r"(file\+)?([\d.]+)GiB", spec)
    if not m:
        raise SystemExit(f"--budgets: {spec!r}: use none, file+XGiB or XGiB")
    if not m[1]:
        return spec, int(float(m[2]) * GiB)
    size = round((file_size + float(m[2]) * GiB) / GiB, 1)
    return f"{size:.1f}GiB", int(size * GiB)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.path = args.json
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.setdefault("machine", {"cores": os.cpu_count(), "mem_total_bytes": _mem_total()})
        self.data.setdefault("files", {})
        self.data.setdefault("runs", {})
        for row in self.data["runs"].values():  # rows measured before VmHWM was read: the sampled peak
            if "ru_maxrss_bytes" not in row and row.get("timeline"):
                sampled = int(max(a + f for _, a, f in row["timeline"]) * GiB)
                row["ru_maxrss_bytes"] = row["peak_rss_bytes"]
                if row["peak_rss_bytes"] > sampled + GiB // 8:  # the parent's peak at fork, inherited
                    row["peak_rss_bytes"], row["peak_from"] = sampled, "RSS sampled every 0.25 s"
        self.work = args.dir
        self.work.mkdir(parents=True, exist_ok=True)
        self.fact = self.work / "fact.jsonl"
        self.fact.write_text(json.dumps(FACT) + "\n")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_json(self.path, self.data)

    def file(self, shape: str) -> Path:
        path = self.work / f"{shape}.Q4_K_M.gguf"
        if not path.is_file():
            if not self.args.build:
                raise SystemExit(f"{path}: missing; build it with benchmarks/synthetic.py or pass --build")
            info = self.work / f"{shape}.build.json"
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "synthetic.py"), "--shape", shape, "-o",
                            str(path), "--json", str(info)], env=thread_env(1), check=True)
        info = self.work / f"{shape}.build.json"
        if info.is_file() and shape not in self.data["files"]:
            built = json.loads(info.read_text())
            self.data["files"][shape] = {k: built[k] for k in ("size_bytes", "build_s", "n_params", "n_tensors",
                                                               "n_vocab", "layers", "arch", "tied", "types")}
            self.data["files"][shape]["command"] = (f"python benchmarks/synthetic.py --shape {shape} "
                                                    f"-o /tmp/qedit-big/{shape}.Q4_K_M.gguf")
        return path

    def done(self, key: str) -> bool:
        row = self.data["runs"].get(key)
        return row is not None and not self.args.force and not str(row.get("status")).startswith(("error", "killed"))

    def record(self, key: str, row: dict[str, Any]) -> None:
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        self.data["runs"][key] = row
        self.save()
        print(f"{key}: {row['status']}, wall {row.get('wall_s')} s, CPU {row.get('cpu_s')} s, peak RSS "
              f"{gib(row.get('peak_rss_bytes'))} GiB, phases {row.get('phases')}", flush=True)

    def wait_for_memory(self, need: int) -> None:
        """Wait (up to --wait seconds) until the machine has `need` bytes available."""
        began = time.perf_counter()
        while _mem_available() < need + LOW_MEMORY and time.perf_counter() - began < self.args.wait:
            time.sleep(30)

    def attempt(self, key: str, cmd: list[str], env: dict[str, str], need: int | None,
                rss_limit: int | None = None) -> dict[str, Any]:
        """run_watched, again (up to --retries times, after waiting for memory) when it was stopped because
        the machine's memory ran out."""
        for i in range(self.args.retries + 1):
            if need:
                self.wait_for_memory(min(need, _mem_total() - 4 * GiB))
            r = run_watched(cmd, env, rss_limit=rss_limit, timeout=self.args.timeout, cwd=self.work)
            if r["killed"].get("reason") != "low":
                break
            print(f"{key}: stopped at RSS {gib(r['killed'].get('rss'))} GiB, the machine's memory ran out "
                  f"(available {gib(_mem_available())} GiB now); attempt {i + 1} of {self.args.retries + 1}", flush=True)
            time.sleep(60)
        return r

    def transformers(self, shape: str) -> None:
        key = f"{shape}/transformers"
        if self.done(key):
            return
        path = self.file(shape)
        size = path.stat().st_size
        available = _mem_available()
        limit = min(int(self.args.rss_limit * GiB), available - GiB)
        n_params = self.data["files"].get(shape, {}).get("n_params")
        cmd = [sys.executable, "-c", _HF_CHILD, str(path.parent), path.name]
        print(f"{key}: limit {gib(limit)} GiB (available {gib(available)} GiB)", flush=True)
        r = run_watched(cmd, child_env(self.args), rss_limit=limit, timeout=self.args.timeout, cwd=self.work)
        if r["killed"].get("reason") == "low":  # others' jobs took the room: a bound all the same, but try again
            r = self.attempt(key, cmd, child_env(self.args), None, min(int(self.args.rss_limit * GiB), limit))
        row = {"shape": shape, "kind": "transformers", "file_size": size, "rss_limit_bytes": limit,
               "command": f"AutoModelForCausalLM.from_pretrained('/tmp/qedit-big', gguf_file='{path.name}')",
               **{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_bytes", "ru_maxrss_bytes", "loadavg_before",
                                    "loadavg_after")},
               "float32_weights_bytes": None if n_params is None else 4 * n_params}
        if r["killed"]:
            where = {"rss": "at the limit", "low": "when the machine's available memory ran out"}.get(r["killed"]["reason"])
            row["status"] = (f"failed: needs > {gib(r['killed'].get('rss'))} GiB (killed {where} after "
                             f"{r['killed']['at_s']:.0f} s)" if where else "failed: timeout")
        elif r["returncode"] != 0:
            row["status"] = f"error: exit {r['returncode']}"
            row["log_tail"] = [text for _, text in r["lines"][-15:]]
        else:
            row["status"] = "ok"
            row.update(json.loads(r["lines"][-1][1]))
        row["timeline"] = _thin(r["timeline"])
        self.record(key, row)

    def qedit(self, shape: str, label: str, args: list[str], budget: str | None, repeat: int) -> None:
        path = self.file(shape)
        size = path.stat().st_size
        cache = self.work / f"cache-{shape}"
        for i in range(repeat):
            tag = f"/{self.args.tag}" if self.args.tag else ""
            key = f"{shape}/{label}{tag}" + (f"/run{i + 1}" if repeat > 1 else "")
            if self.done(key):
                continue
            out = self.work / f"out-{shape}.gguf"
            floor = self.floor(shape, path, args) if budget == "floor" else None
            flag, budget_bytes = parse_budget(budget, size, floor) if budget else (None, None)
            if budget == "floor" and flag is None:
                print(f"{key}: qedit states no floor for this run; skipped", flush=True)
                continue
            extra = ["--max-memory", flag] if flag else []
            cmd = qedit_cmd("-v", "edit", str(path), str(self.fact), "-o", str(out), *args, *extra)
            env = child_env(self.args, QEDIT_CACHE=str(cache), QEDIT_CACHE_MAX="60GB")
            print(f"{key}: {' '.join(cmd[2:])}", flush=True)
            n_params = self.data["files"].get(shape, {}).get("n_params", 0)
            r = self.attempt(key, cmd, env, budget_bytes or 4 * n_params + 2 * GiB)
            phases, at = split_phases(r["lines"], r["wall_s"])
            log = [f"{t:8.1f}  {text}" for t, text in r["lines"]
                   if not text.lstrip().startswith(("sampling corpus", "optimising targets")) and "%|" not in text]
            row = {"shape": shape, "kind": "qedit", "label": label, "budget": budget, "max_memory": flag,
                   "budget_bytes": budget_bytes, "file_size": size,
                   "command": " ".join(["qedit -v edit", path.name, "fact.jsonl -o out.gguf", *args, *extra]),
                   **{k: r[k] for k in ("wall_s", "cpu_s", "user_s", "peak_rss_bytes", "ru_maxrss_bytes", "loadavg_before",
                                        "loadavg_after")},
                   "phases": phases, "phase_peak_rss": phase_peaks(r["timeline"], at, r["wall_s"]),
                   "stats_cached": "stats_start" not in at, "markers_missing": [m for m in MARKERS if m not in at],
                   "load_end_approx": "load_end_approx" in at,
                   "qedit": qedit_revision(self.args), "run": i + 1, "timeline": _thin(r["timeline"]), "log": log[-60:]}
            m = next((SIZE.search(text) for _, text in r["lines"] if SIZE.search(text)), None)
            if m:
                row["out_size"] = int(m[2].replace(",", ""))
            if r["killed"]:
                row["status"] = (f"killed: RSS {gib(r['killed'].get('rss'))} GiB, the machine's memory ran out"
                                 if r["killed"]["reason"] in ("rss", "low") else "killed: timeout")
            elif r["returncode"] != 0:
                refused = next((m for _, text in r["lines"] if (m := REFUSED.search(text))), None)
                if refused:
                    row["status"] = f"refused: qedit needs at least {refused[1]} {refused[2]}"
                    row["refusal"] = next(text for _, text in r["lines"] if REFUSED.search(text))
                else:
                    row["status"] = f"error: exit {r['returncode']}"
            else:
                row["status"] = "ok"
                row["diff"] = self.diff(path, out)
                edited = row["diff"]["tensors_differ"]
                row["only_edited_differ"] = bool(edited) and all(".ffn_down." in n or ".mlp" in n for n in edited) \
                    and not row["diff"]["tensors_added"]
            if budget_bytes is not None:
                row["within_budget"] = row["peak_rss_bytes"] <= budget_bytes
            row["within_file_plus_3gib"] = row["peak_rss_bytes"] <= size + 3 * GiB
            for p in (out, out.with_name("Modelfile")):
                p.unlink(missing_ok=True)
            self.record(key, row)

    def diff(self, src: Path, out: Path) -> dict[str, Any]:
        """diff_gguf in a child, so that this process's resident set (which every later child's ru_maxrss
        inherits) stays small."""
        code = f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from bench_big import diff_gguf; " \
               f"print(json.dumps(diff_gguf(*map(__import__('pathlib').Path, sys.argv[1:]))))"
        proc = subprocess.run([sys.executable, "-c", code, str(src), str(out)], env=child_env(self.args),
                              cwd=self.work, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def floor(self, shape: str, path: Path, args: list[str]) -> int | None:
        """The least budget qedit accepts for `args` on `path`: what it states when given 1 GiB."""
        key = f"{shape} {' '.join(args)} {qedit_revision(self.args)}"
        floors = self.data.setdefault("floors", {})
        if key not in floors:
            out = self.work / f"probe-{shape}.gguf"
            cmd = qedit_cmd("edit", str(path), str(self.fact), "-o", str(out), *args, "--max-memory", "1GiB")
            proc = subprocess.run(cmd, env=child_env(self.args, QEDIT_CACHE=str(self.work / f"cache-{shape}")),
                                  cwd=self.work, capture_output=True, text=True)
            out.unlink(missing_ok=True)
            m = REFUSED.search(proc.stdout + proc.stderr)
            floors[key] = None if m is None else int(float(m[1]) * (GiB if m[2] == "GiB" else 1 << 20))
            self.save()
        return floors[key]

    def memtest(self, shape: str) -> None:
        key = f"{shape}/memtest"
        if self.done(key):
            return
        path = self.file(shape)
        self.qedit(shape, "memtest", [a for a in MEMTEST if a not in ("--max-memory", "10GiB")], "10GiB", 1)
        row = self.data["runs"][key]
        row["memtest_pass"] = (row["status"] == "ok" and row["peak_rss_bytes"] <= 10.5 * GiB
                               and row["diff"]["tensors_differ"] == ["blk.20.ffn_down.weight"])
        row["command"] = f"qedit edit {path.name} fact.jsonl {' '.join(MEMTEST)} -o out.gguf"
        self.record(key, row)


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _thin(timeline: list[tuple[float, int, int]], every: float = 5.0) -> list[list[float]]:
    """The RSS timeline every `every` seconds (and its peak), in GiB: [t, anon, file]."""
    out, last = [], -every
    peak = max(timeline, key=lambda s: s[1] + s[2]) if timeline else None
    for s in timeline:
        if s[0] - last >= every or s is peak:
            out.append([s[0], round(s[1] / GiB, 3), round(s[2] / GiB, 3)])
            last = s[0]
    return out


# ---- the table ----------------------------------------------------------------------------------------

def table(data: dict[str, Any]) -> str:
    rows = ["| shape | file GiB | run | budget | status | peak RSS GiB | <= file + 3 GiB | wall s | CPU s | start | "
            "load | stats | targets | solve | write | only edited differ |", "|" + "---|" * 16]
    for key, r in data["runs"].items():
        ph = r.get("phases") or {}
        only = r.get("only_edited_differ")
        if r["kind"] == "transformers":
            ph = {"load": r.get("load_s")}
        rows.append("| " + " | ".join([
            r["shape"], gib(r["file_size"]), key.split("/", 1)[1], r.get("max_memory") or "-", r["status"],
            gib(r.get("peak_rss_bytes")), "yes" if r.get("peak_rss_bytes", 1e30) <= r["file_size"] + 3 * GiB else "no",
            f"{r.get('wall_s', 0):.0f}", f"{r.get('cpu_s', 0):.0f}",
            *[("-" if ph.get(p) is None else f"{ph[p]:.0f}") for p in ("start", "load", "stats", "targets", "solve", "write")],
            "-" if only is None else ("yes" if only else "no")]) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of " + ", ".join(SHAPES))
    p.add_argument("--runs", default="transformers,rome,memit", help="of transformers, rome, memit, memtest")
    p.add_argument("--budgets", default="file+3GiB,file+1GiB",
                   help="qedit --max-memory per run: none, file+XGiB or XGiB (comma-separated)")
    p.add_argument("--repeat", type=int, default=1, help="qedit runs per setting, same cache (later ones warm)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/qedit-big"), help="where the GGUFs and caches are")
    p.add_argument("--build", action="store_true", help="build missing files with synthetic.py")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--rss-limit", type=float, default=20.0, help="GiB at which the transformers load is killed")
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retries", type=int, default=3, help="runs again when the machine's memory ran out")
    p.add_argument("--wait", type=float, default=1800.0, help="seconds to wait for memory before a run")
    p.add_argument("--force", action="store_true", help="run again what the JSON already has")
    p.add_argument("--qedit-src", type=Path, help="run this copy of qedit (a directory holding qedit/), e.g. an "
                   "export of an earlier commit: git archive HEAD qedit | tar -x -C DIR")
    p.add_argument("--qedit-label", help="what --qedit-src is, for the JSON (e.g. 'commit 5d77984')")
    p.add_argument("--tag", help="suffix of the runs' keys (e.g. before)")
    p.add_argument("--table", action="store_true", help="only print the table of the saved runs")
    args = p.parse_args(argv)
    bench = Bench(args)
    if not args.table:
        for shape in args.shapes.split(","):
            if shape not in SHAPES:
                raise SystemExit(f"--shapes: unknown {shape!r}")
            for run in args.runs.split(","):
                if run == "transformers":
                    bench.transformers(shape)
                elif run in ("rome", "memit"):
                    for budget in args.budgets.split(","):
                        label = f"{run}" + ("" if budget == "none" else f"@{budget}")
                        bench.qedit(shape, label, ["--method", run, *QUICK, "--no-verify"],
                                    None if budget == "none" else budget, args.repeat)
                elif run == "memtest":
                    bench.memtest(shape)
                else:
                    raise SystemExit(f"--runs: unknown {run!r}")
    print(table(bench.data))


if __name__ == "__main__":
    main()

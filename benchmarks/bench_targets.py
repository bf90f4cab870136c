"""Target optimisation against an earlier version of it: the same batch edit computed by this checkout and by
another copy of qedit (`--qedit-src`, e.g. an export of an earlier commit), in torch at full precision.

    git archive 8ad9643 qedit | tar -x -C /tmp/qsrc
    python benchmarks/bench_targets.py --qedit-src /tmp/qsrc --label 'commit 8ad9643' --first 100 --n 50 \
        --json benchmarks/data/targets_stop_rule.json

Each version runs in its own process with one thread: the packaged Gemma 3 270M, CounterFact-dev cases
first..first+n-1 edited as one MEMIT batch (`compute_edits`, default settings), then scored in torch against the
unedited model (teacher-forced and generated efficacy, generalization and locality). Recorded: the metrics, the
seconds of target optimisation and of the whole edit, the targets' final NLLs, the minimal-strength scale and
the norm of each layer's delta. Each run has an empty cache of its own (statistics and targets). The two
versions run one after the other, so their times are comparable only
when the machine's load was the same; the JSON records the load average at each start.
Results: benchmarks/RESULTS.md, "Lifelong patches".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import COUNTERFACT, ROOT, packaged_model, save_json, thread_env


def worker(first: int, n: int, method: str) -> None:
    """In the child: edit and score, print one JSON object."""
    import torch

    import qedit
    import qedit.edit.targets as targets
    from qedit.converters.loading import load_model
    from qedit.core.delta import applied
    from qedit.core.facts import load_requests
    from qedit.edit.compute import compute_edits
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.torch_runner import TorchRunner

    loaded = load_model(packaged_model())
    cases = load_requests(COUNTERFACT)[first:first + n]
    base = evaluate(TorchRunner(loaded), cases)
    spent = [0.0]
    real = targets._chunk_targets

    def timed(*args, **kwargs):   # the seconds spent optimising targets
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    targets._chunk_targets = timed
    start = time.perf_counter()
    outcome = compute_edits(loaded, cases, method)     # the cache is empty (main): every target is optimised
    edit_seconds = time.perf_counter() - start
    with applied(loaded.model, outcome.deltas):
        scores = evaluate(TorchRunner(loaded), cases, baseline=base).aggregate()
    batch = outcome.info["batches"][0]
    print(json.dumps({"qedit": str(Path(qedit.__file__).parent), "metrics": scores, "edit_seconds": edit_seconds,
                      "target_seconds": spent[0], "target_nll": batch.get("target_nll"),
                      "scale": batch.get("scale"), "norms": [float(d.dense().norm()) for d in outcome.deltas],
                      "torch_threads": torch.get_num_threads()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qedit-src", type=Path, required=True, help="a directory holding the other qedit/")
    ap.add_argument("--label", required=True, help="what --qedit-src is (e.g. 'commit 8ad9643')")
    ap.add_argument("--first", type=int, default=100)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--method", default="memit")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.first, args.n, args.method)
        return
    result = {"command": ["benchmarks/bench_targets.py", *sys.argv[1:]], "runs": {}}
    for label, src in (("this checkout", ROOT), (args.label, args.qedit_src.resolve())):
        with tempfile.TemporaryDirectory() as cache:   # an empty cache: every target is optimised in the run
            env = thread_env(1, QEDIT_CACHE=cache)
            env["PYTHONPATH"] = os.pathsep.join([str(src), str(ROOT / "benchmarks")])
            load = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, __file__, "--worker", "--first", str(args.first), "--n",
                                   str(args.n), "--method", args.method, "--qedit-src", str(src), "--label", label,
                                   "--json", "-"], env=env, stdout=subprocess.PIPE, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["load_at_start"] = load
        result["runs"][label] = row
        save_json(args.json, result)
        m = row["metrics"]
        print(f"{label}: efficacy {m['efficacy']:.3f} (generated {m['efficacy_gen']:.3f}), generalization "
              f"{m['generalization']:.3f}, locality {m['locality']:.3f}; targets {row['target_seconds']:.0f} s of "
              f"{row['edit_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

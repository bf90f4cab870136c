"""GPTQ of Gemma 3 270M: qedit's solver against GPTQModel's, with the same calibration tokens.

    python benchmarks/bench_gptq.py [--bits 4] [--group-size 128] [--cases 200] [--work DIR] [--json F]

Steps, each in its own subprocess (peak memory and import time stay per step):
1. prepare: load the packaged GGUF in fp32, save it as an HF directory, take the calibration
   sequences from `qedit.core.stats.corpus_tokens` (64 x 64 tokens sampled from the model, cached), and
   save them as JSON.
2. qedit: `write_gptq` of the HF model with those sequences (timed: calibration forward passes,
   solver, writing).
3. gptqmodel: `GPTQModel.load(...).quantize(...)` with the same token sequences (as input_ids) and
   the same settings (bits, group size, sym, no act-order, damp 0.05, true-sequential), then save (timed).
4. eval, per model: perplexity of qedit's fluency text and fact accuracy on CounterFact-dev cases
   (share of cases where the true answer's mean log-probability beats the counterfactual's, share
   where the true answer is the top-1 continuation, share whose top-1 answer tokens equal the
   full-precision model's), and perplexity of the cases' "prompt + true answer" texts. The
   full-precision model runs in torch; both GPTQ checkpoints run in GPTQModel (bf16 CPU kernel)
   and in qedit's dequantizing runner.
Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from harness import COUNTERFACT, ROOT, ChildFailed, child_json, packaged_model, save_json


def _setup() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def prepare(work: Path) -> dict:
    from qedit.converters.gptq.export import calibration_tokens
    from qedit.converters.loading import load_model

    loaded = load_model(packaged_model())
    seqs = calibration_tokens(loaded)
    if not (work / "hf" / "config.json").is_file():
        loaded.model.save_pretrained(work / "hf")
        loaded.tokenizer.save_pretrained(work / "hf")
    (work / "calib.json").write_text(json.dumps(seqs))
    return {"calibration_sequences": len(seqs), "calibration_tokens": sum(len(s) for s in seqs)}


def run_qedit(work: Path, bits: int, group: int) -> dict:
    import torch

    from qedit.converters.gptq.export import GPTQWriteConfig, write_gptq
    from qedit.converters.loading import load_model
    from qedit.kernels.gptq import GPTQConfig

    loaded = load_model(work / "hf")
    seqs = json.loads((work / "calib.json").read_text())
    start, cpu = time.perf_counter(), time.process_time()
    report = write_gptq(loaded, work / "qedit", GPTQWriteConfig(GPTQConfig(bits=bits, group_size=group),
                                                                dtype="bfloat16"), seqs)
    total = time.perf_counter() - start
    solver = sum(m["seconds"] for m in report.modules.values())
    return {"seconds": round(total, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "solver_seconds": round(solver, 1), "modules": len(report.modules), "torch_threads": torch.get_num_threads()}


def run_gptqmodel(work: Path, bits: int, group: int) -> dict:
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    seqs = json.loads((work / "calib.json").read_text())
    calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in seqs]
    start, cpu = time.perf_counter(), time.process_time()
    qc = QuantizeConfig(bits=bits, group_size=group, desc_act=False, sym=True, damp_percent=0.05)
    model = GPTQModel.load(str(work / "hf"), qc, device="cpu")
    model.quantize(calib, batch_size=8)
    model.save(str(work / "gptqmodel"))
    import torch

    return {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "version": gptqmodel.__version__, "torch_threads": torch.get_num_threads()}


def evaluate(work: Path, name: str, runner_kind: str, n_cases: int) -> dict:
    from qedit.core.facts import load_requests
    from qedit.runtimes.torch_runner import TorchRunner

    if runner_kind == "torch":
        from qedit.converters.loading import load_model

        runner = TorchRunner(load_model(work / "hf"))
    else:
        from qedit.runtimes.gptq import gptq_runner

        runner = gptq_runner(work / name, prefer=runner_kind)
    text = (ROOT / "qedit" / "data" / "fluency.txt").read_text()
    nll, count = runner.nll(text)
    cases = load_requests(COUNTERFACT)[:n_cases]
    start = time.perf_counter()
    true = runner.score([(c.prompt, c.ground_truth) for c in cases])
    new = runner.score([(c.prompt, c.target_new) for c in cases])
    sums = [runner.nll(f"{c.prompt} {c.ground_truth}") for c in cases]      # held-out text: not calibration data
    return {"runner": runner.describe().get("runner"), "perplexity": round(math.exp(nll / count), 3),
            "perplexity_facts": round(math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums)), 3),
            "prefers_true": round(sum(t.mean_logprob > n.mean_logprob for t, n in zip(true, new)) / len(cases), 3),
            "true_top1": round(sum(t.top1 for t in true) / len(cases), 3),
            "mean_logprob_true": round(sum(t.mean_logprob for t in true) / len(cases), 3),
            "argmax": [list(t.argmax_ids) for t in true],
            "eval_seconds": round(time.perf_counter() - start, 1)}


def _step(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--step", *extra, "--work", str(args.work), "--bits", str(args.bits),
           "--group-size", str(args.group_size), "--cases", str(args.cases)]
    try:
        return child_json(cmd, 1, f"step {' '.join(extra)}")
    except ChildFailed as exc:   # recorded, so that one failing step (e.g. GPTQModel missing) keeps the others
        return {"error": str(exc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qedit-bench-gptq"))
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "data" / "bench_gptq.json")
    ap.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        _setup()
        kind, rest = args.step[0], args.step[1:]
        fn = {"prepare": lambda: prepare(args.work), "qedit": lambda: run_qedit(args.work, args.bits, args.group_size),
              "gptqmodel": lambda: run_gptqmodel(args.work, args.bits, args.group_size),
              "eval": lambda: evaluate(args.work, rest[0], rest[1], args.cases)}[kind]
        print(json.dumps(fn()))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    for d in ("qedit", "gptqmodel"):
        if (args.work / d).exists():
            shutil.rmtree(args.work / d)
    out: dict = {"bits": args.bits, "group_size": args.group_size, "cases": args.cases,
                 "prepare": _step(args, "prepare"), "quantize": {}, "eval": {}}
    out["quantize"]["qedit"] = _step(args, "qedit")
    out["quantize"]["gptqmodel"] = _step(args, "gptqmodel")
    out["eval"]["full precision (torch)"] = _step(args, "eval", "hf", "torch")
    for name in ("qedit", "gptqmodel"):
        for kind in ("gptqmodel", "dequantize"):
            out["eval"][f"{name} checkpoint ({kind} runner)"] = _step(args, "eval", name, kind)
    ref = out["eval"]["full precision (torch)"].get("argmax")
    for e in out["eval"].values():   # share of cases whose top-1 answer tokens match full precision
        got = e.pop("argmax", None)
        if ref and got:
            e["agrees_with_full"] = round(sum(a == b for a, b in zip(got, ref)) / len(ref), 3)
    save_json(args.json, out, indent=2)
    print(f"GPTQ {args.bits}-bit, group {args.group_size}, Gemma 3 270M, {out['prepare']}")
    for name, q in out["quantize"].items():
        print(f"  quantize with {name}: {q}")
    print("| model | runner | perplexity (fluency) | perplexity (facts) | prefers true | true top-1 | top-1 = full |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, e in out["eval"].items():
        print(f"| {name} | {e.get('runner', e.get('error'))} | {e.get('perplexity')} | {e.get('perplexity_facts')} | "
              f"{e.get('prefers_true')} | {e.get('true_top1')} | {e.get('agrees_with_full')} |")


if __name__ == "__main__":
    main()

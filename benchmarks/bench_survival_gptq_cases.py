"""Survival of single edits at GPTQ 8/4/3/2 bits and bitsandbytes int8/nf4, case by case, naive and edit-aware.

    # the deltas: two processes, cases 0-99 and 100-199
    python benchmarks/bench_edit.py --n 100 --offset 0 --methods memit --modes single --threads 1 \
        --keep-targets --save-deltas /tmp/be/deltas
    python benchmarks/bench_edit.py --n 100 --offset 100 --methods memit --modes single --threads 1 \
        --keep-targets --save-deltas /tmp/be/deltas
    # survival: two processes, then one table
    python benchmarks/bench_survival_gptq_cases.py --deltas /tmp/be/deltas --methods memit --out /tmp/sgq \
        --limit 100 --json /tmp/sgc/part0.json
    python benchmarks/bench_survival_gptq_cases.py --deltas /tmp/be/deltas --methods memit --out /tmp/sgq \
        --first 100 --limit 100 --json /tmp/sgc/part1.json
    python benchmarks/bench_survival_gptq_cases.py --merge /tmp/sgc/part0.json /tmp/sgc/part1.json \
        --json benchmarks/data/survival_gptq_cases_memit_200.json
    # the shortcut check (below) at GPTQ-4 on case 199, after the swaps of cases 197 and 198
    python benchmarks/bench_survival_gptq_cases.py --deltas /tmp/be/deltas --methods memit --out /tmp/sgq \
        --first 197 --limit 3 --gptq 4 --bnb "" --verify --json /tmp/sgc/verify199.json
    # qedit's default below 8 bits (--on-checkpoint): no saved deltas; rungs one after another, resumable
    python benchmarks/bench_survival_gptq_cases.py --on-checkpoint --gptq 4 --methods memit --out /tmp/sgq \
        --limit 200 --verify --json /tmp/sgc/oncheckpoint.json
    python benchmarks/bench_survival_gptq_cases.py --merge /tmp/sgc/oncheckpoint.json \
        --json benchmarks/data/survival_gptq_oncheckpoint_memit_200.json

Every case was edited alone into the unedited Gemma 3 270M (full precision, the GGUF source) and its
deltas and edit keys saved by bench_edit. Each full-precision edit is then patched into the unedited
checkpoint of every rung, without writing and reloading a checkpoint per case. That is the file
`qedit edit --format gptq` writes at 8 bits (the source's edit, patched edit-aware); below 8 bits qedit
computes the edit on the checkpoint itself instead, so there this measures how much of a full-precision
edit each encoding keeps, not qedit's default output:
- GPTQ rungs: the unedited model is written once per bit-width as a qedit GPTQ checkpoint (group 128,
  act-order, symmetric; the survival ladder's artifacts, cached under --out/artifacts) and loaded once
  in GPTQModel. For each case, each edited Linear is dequantized from the checkpoint, changed by dW,
  requantized by qedit's GPTQ solver with its Hessian (naive) or with the edit keys added to it
  (aware, key weight 1: `patch_gptq(..., edit_keys=)`), and its four tensors (qweight, qzeros, scales,
  g_idx) are written into the loaded module, whose kernel state is reset so that it prepares them on
  first use as it does at load (each swap checked against the new weights on random inputs). The case
  is scored and the loaded tensors put back.
  One shortcut: each Hessian is the unedited checkpoint's, computed once, where `patch_gptq`
  recomputes a later edited layer's inputs after the earlier edited layers were requantized.
  `--verify` measures what the shortcuts change on the last case of each rung (after the swaps and
  restores of the cases before it): the checkpoint `patch_gptq` writes (the converter the pipeline
  patches GPTQ checkpoints with), loaded afresh by GPTQModel, against the in-place scores.
- bitsandbytes rungs: a copy of the unedited fp32 model with every decoder Linear quantized in memory
  (`BitsAndBytesRunner`); for each case the edited Linears are replaced by bitsandbytes modules of
  W + dW and put back afterwards. bitsandbytes has no calibration, so there is one (naive) encoding.
- `--on-checkpoint` (GPTQ rungs only, MEMIT): what `qedit edit MODEL F -o DIR --format gptq --bits N`
  writes below 8 bits. The unedited checkpoint is loaded dequantized once per rung (`load_dequantized`,
  as the pipeline loads it) and each case's edit is computed on it (`compute_edits`, pure) with the
  settings of the saved full-precision deltas: MEMIT's defaults at full strength (`target_margin=None`;
  MEMIT had no minimal strength when they were made). Its deltas are requantized with its own keys into
  the loaded modules as the aware path does, with one difference that follows the pipeline: the Hessians
  are computed on the text sampled from the checkpoint itself (`calibration_tokens` of the dequantized
  model, the text its edit statistics use, which is what `patch_gptq` gets there), not the source's.
  The full-precision scores of each case (efficacy kept, died) are the saved deltas' rows of
  `--fp32-from` (the old run's JSON). The rungs run one after another; the --json is resumed per case
  and rung. `--verify` runs `qedit edit` on the last case of each rung (after the swaps of the others)
  and scores its checkpoint, loaded afresh in GPTQModel, against the in-place scores; it also compares
  the written deltas with the in-place ones and the untouched tensors with the cached unedited checkpoint.
Locality is against the unedited model at the same rung, scored by the same loaded model.
GPTQModel's torch kernel (3 and 8 bits here; 4 bits run its aten int4 kernel) dequantizes every
weight on every forward unless GPTQ_TORCH_CACHE_WEIGHTS=1, which this script sets: each unedited
module is dequantized once, and a swap clears the swapped module's cache. torch.compile is switched
off (torch._dynamo.config.disable): with one compiled dequantizer per module it hits its recompile limit
while loading and then runs eagerly anyway. Neither changes a number, only the time.
Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from harness import (
    cached_report,
    case_number,
    case_row,
    print_case_tables,
    save_json,
    saved_cases,
    source_store,
    summarize_cases,
)


class GPTQRung:
    """One unedited GPTQ checkpoint loaded in GPTQModel; a case's requantized Linears are written into it in place.

    GPTQModel's kernels keep state derived from their tensors: the 4-bit CPU kernel (TorchAtenLinear)
    repacks qweight/scales/qzeros and builds an act-order permutation on first use; the torch kernel
    caches decoded zeros and g_idx, and its torch.compile'd dequantizer is bound to the module it was
    loaded into (so a copied module would still read the original's tensors). Each swap therefore
    writes the four file tensors into the loaded module itself and clears that state, and every swap is
    checked: the module's output on random inputs must match the dequantized new tensors.
    """

    def __init__(self, base: Path, targets: set[str], seqs, hess_cache: Path, dq=None) -> None:
        from qedit.converters.gptq.calibrate import make_batches, module_hessian
        from qedit.converters.gptq.checkpoint import PARTS, dequantize_module, read_checkpoint_config, read_module_parts
        from qedit.converters.gptq.export import load_dequantized
        from qedit.runtimes.gptq import GPTQModelRunner

        self.base = base
        self.ckpt = read_checkpoint_config(base)
        parts = read_module_parts(base, targets)
        self.w0 = {n: dequantize_module(p, self.ckpt, n) for n, p in parts.items()}   # (out, in) float32
        if hess_cache.is_file():
            self.hessians = torch.load(hess_cache)
        else:
            dq = dq if dq is not None else load_dequantized(base)
            batches = make_batches(seqs, dq.tokenizer.pad_token_id, 8, dq.tokenizer.bos_token_id)
            self.hessians = {n: module_hessian(dq, n, batches) for n in sorted(targets)}   # (in, in)
            torch.save(self.hessians, hess_cache)
            del dq
        self.runner = GPTQModelRunner(base)
        model = self.runner.loaded.model
        self.modules = {n: model.get_submodule(n) for n in targets}
        # before the first forward, the loaded tensors in the kernel's own (possibly v2) layout
        self.loaded_parts = {n: {p: getattr(m, p).detach().clone() for p in PARTS} for n, m in self.modules.items()}
        self.zero_shift = self._zero_shift(parts)
        self._swapped: list[str] = []
        self.prepared: dict = {}
        self.probe = torch.randn(4, next(iter(self.w0.values())).shape[1], generator=torch.Generator().manual_seed(0))

    def _zero_shift(self, parts) -> int:
        """How GPTQModel's in-memory qzeros relate to the file's (v1 files store zero - 1): 0 or +1."""
        from qedit.kernels.gptq import v1_offset_qzeros

        name = next(iter(parts))
        got, stored = self.loaded_parts[name]["qzeros"], parts[name]["qzeros"]
        for shift in (0, 1):
            if torch.equal(got, v1_offset_qzeros(stored, self.ckpt.bits, shift) if shift else stored):
                return shift
        raise SystemExit(f"{self.base}: GPTQModel's loaded qzeros of {name} match neither the file nor its v1 offset")

    def _write(self, name: str, parts: dict[str, torch.Tensor]) -> None:
        """Put kernel-layout tensors into the loaded module and clear everything derived from the old ones."""
        m = self.modules[name]
        for part, t in parts.items():
            cur = getattr(m, part)
            if cur.shape == t.shape and cur.dtype == t.dtype:
                cur.copy_(t)                      # same object: compiled code keeps its guards
            else:                                 # repacked by the 4-bit kernel: back to the loaded layout
                setattr(m, part, t.clone())
        for attr in ("linear_mode", "ret_idx", "scales_and_zeros"):
            if attr in m.__dict__:
                setattr(m, attr, None)
        for reset in ("_stream_reset_cache", "clear_weight_cache"):
            if hasattr(m, reset):
                getattr(m, reset)()

    @torch.no_grad()
    def _check(self, name: str, weight: torch.Tensor) -> None:
        """The swapped module's output must be x W^T for the new dequantized weight: to 0.2% (relative) in
        the torch kernel (float16 dequantization); to 3% in the 4-bit kernel, which computes in bfloat16
        (there only `--verify` tells an edit's change, small against W, from stale weights)."""
        m = self.modules[name]
        got = m(self.probe).float()                                                     # (4, out)
        want = self.probe @ weight.t()                                                  # (4, out)
        err = float((got - want).norm() / want.norm())
        if err > (0.03 if m.scales.dtype == torch.bfloat16 else 2e-3):
            raise SystemExit(f"GPTQ-{self.ckpt.bits} {name}: the swapped module's output is off by {err:.3f} "
                             "(relative) from its new weights: GPTQModel did not read the written tensors")

    def swap(self, changes: dict[str, torch.Tensor], keys: dict[str, torch.Tensor] | None) -> None:
        """Each module W0 + change, requantized (edit-aware when `keys`), written into the loaded module."""
        from qedit.converters.gptq.checkpoint import dequantize_module, encode_module
        from qedit.kernels.gptq import gptq_quantize, prepare_hessian, v1_offset_qzeros

        solver = self.ckpt.solver_config(1.0)
        for name, change in changes.items():
            if keys is None:   # the naive Hessian is the same for every case: factorised once
                if name not in self.prepared:
                    self.prepared[name] = prepare_hessian(self.hessians[name], solver, where=name)
                hessian = self.prepared[name]
            else:
                hessian = prepare_hessian(self.hessians[name], solver, keys.get(name), where=name)
            res = gptq_quantize(self.w0[name] + change, hessian, solver, where=name)
            parts = encode_module(res, self.ckpt)
            weight = dequantize_module(parts, self.ckpt, name)                          # (out, in)
            if self.zero_shift:
                parts["qzeros"] = v1_offset_qzeros(parts["qzeros"], self.ckpt.bits, self.zero_shift)
            self._swapped.append(name)
            self._write(name, parts)
            self._check(name, weight)

    def restore(self) -> None:
        for name in self._swapped:
            self._write(name, self.loaded_parts[name])
        self._swapped.clear()


class BnbRung:
    """A bitsandbytes copy of the unedited model; a case's edited Linears are re-created from W + dW."""

    def __init__(self, loaded, mode: str) -> None:
        from qedit.converters.gptq.calibrate import weight_math
        from qedit.runtimes.bnb import BitsAndBytesRunner

        self.mode = mode
        self.source = loaded
        self.runner = BitsAndBytesRunner(loaded, mode)
        self.weight = lambda name: weight_math(loaded.module(name))
        self._saved: dict[str, torch.nn.Module] = {}

    def swap(self, changes: dict[str, torch.Tensor], keys=None) -> None:
        from qedit.runtimes.bnb import _bnb_linear

        model = self.runner.loaded.model
        for name, change in changes.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            self._saved[name] = getattr(owner, child)
            bias = getattr(self.source.module(name), "bias", None)
            setattr(owner, child, _bnb_linear(self.weight(name) + change, bias, self.mode))

    def restore(self) -> None:
        model = self.runner.loaded.model
        for name, mod in self._saved.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, mod)
        self._saved.clear()


def _changes(deltas) -> dict[str, torch.Tensor]:
    """{module: summed dW (out, in)} of a case's deltas."""
    from qedit.core.delta import combine

    return {d.name.removesuffix(".weight"): d.dense().float() for d in combine(deltas)}


def _verify(rung: GPTQRung, out: Path, deltas, keys, manifest, seqs, req, scored, encoding: str) -> dict:
    """The real patched checkpoint, loaded afresh, against the in-place scores of the same case."""
    from qedit.converters.gptq.export import patch_gptq
    from qedit.evaluation.metrics import evaluate
    from qedit.runtimes.gptq import GPTQModelRunner

    path = out / f"verify-{rung.base.name}-{encoding}"
    shutil.rmtree(path, ignore_errors=True)
    patch_gptq(rung.base, path, deltas, manifest, seqs, edit_keys=keys)
    try:
        fresh = evaluate(GPTQModelRunner(path), [req]).cases[0]
    finally:
        shutil.rmtree(path, ignore_errors=True)
    out = {"encoding": encoding, "bits": rung.ckpt.bits, "fresh_margin": fresh.margin, "inplace_margin": scored.margin,
           "fresh_efficacy": fresh.efficacy, "inplace_efficacy": scored.efficacy}
    print(f"verify GPTQ-{rung.ckpt.bits} {encoding}: margin in place {scored.margin:.4f}, patched checkpoint "
          f"{fresh.margin:.4f}", file=sys.stderr)
    return out


def merge(parts: list[Path], out: Path | None) -> None:
    """Join the per-case rows of several runs (e.g. two processes on cases 0-99 and 100-199, or one run per
    rung): a case in several runs gets the rungs of each (its fp32 scores must agree, a rung must not repeat)."""
    runs = [json.loads(p.read_text()) for p in parts]
    ladder: list[str] = []
    for run in runs:
        ladder += [name for name in run["ladder"] if name not in ladder]
    results: dict[str, dict[int, dict]] = {}
    for run in runs:
        for method, rows in run["cases"].items():
            joined = results.setdefault(method, {})
            for row in rows:
                have = joined.get(row["case"])
                if have is None:
                    joined[row["case"]] = json.loads(json.dumps(row))
                    continue
                if have["fp32"] != row["fp32"] or set(have["rungs"]) & set(row["rungs"]):
                    raise SystemExit(f"--merge: {method} case {row['case']} twice at a rung, or with other fp32 scores")
                have["rungs"].update(row["rungs"])
    rows_by = {m: [r for _, r in sorted(j.items())] for m, j in results.items()}
    if out is not None:
        save_json(out, {"commands": [c for r in runs for c in (r["commands"] if "commands" in r else [r["command"]])],
                        "ladder": ladder, "summary": {m: summarize_cases(r, ladder) for m, r in rows_by.items()},
                        "verify": [c for r in runs for c in r["verify"]],
                        "seconds": [s for r in runs for s in (r["seconds"] if isinstance(r["seconds"], list)
                                                              else [r["seconds"]])],
                        "cases": rows_by})
    print_case_tables(rows_by, ladder)


def _verify_on_checkpoint(rung: GPTQRung, out: Path, source: Path, case: int, req, base_case, scored, outcome,
                          ) -> dict:
    """`qedit edit SOURCE fact.jsonl --method memit -o DIR --format gptq --bits N --set target_margin=none`
    (qedit's default output), its checkpoint loaded afresh in GPTQModel, against the in-place scores; also
    the written deltas against the in-place ones, and the tensors it did not requantize against the cached
    unedited checkpoint (the same unedited checkpoint, written again by the command)."""
    from harness import counterfact_lines, facts_file, run
    from safetensors import safe_open

    from qedit.converters.gptq.checkpoint import safetensors_files
    from qedit.core.delta import load_deltas
    from qedit.evaluation.metrics import EvalReport, evaluate
    from qedit.runtimes.gptq import GPTQModelRunner

    bits = rung.ckpt.bits
    path = out / f"verify-oncheckpoint-{rung.base.name}-case{case}"
    shutil.rmtree(path, ignore_errors=True)
    facts = facts_file(out / f"verify-case{case}.jsonl", counterfact_lines(case, 1))
    cmd = [sys.executable, "-m", "qedit", "edit", str(source), str(facts), "--method", "memit", "-o", str(path), "--format", "gptq",
                    "--bits", str(bits), "--set", "target_margin=none"]   # (harness.qedit_cmd names no module)
    seconds, _ = run(cmd, what=f"qedit edit (GPTQ-{bits}, case {case})")
    try:
        fresh = evaluate(GPTQModelRunner(path), [req], baseline=EvalReport({}, [base_case])).cases[0]
        written = {d.name: d.dense().float() for d in load_deltas(path)[0]}
        mine = {d.name: d.dense().float() for d in outcome.deltas}
        delta_diff = max(float((written[n] - mine[n]).norm() / mine[n].norm()) for n in mine) \
            if set(written) == set(mine) else None
        edited = {n.removesuffix(".weight") for n in mine}
        differ, same = [], 0
        base_files = {p.name: p for p in safetensors_files(rung.base)}
        for file in safetensors_files(path):
            with safe_open(str(file), framework="pt") as new, safe_open(str(base_files[file.name]), framework="pt") as old:
                for key in new.keys():  # noqa: SIM118  (safe_open handles are not mappings)
                    if key.rpartition(".")[0] in edited:
                        continue
                    if torch.equal(new.get_tensor(key), old.get_tensor(key)):
                        same += 1
                    else:
                        differ.append(key)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    res = {"encoding": "on-checkpoint", "bits": bits, "case": case, "command": ["qedit", *cmd[3:]], "command_seconds": seconds,
           "fresh_margin": fresh.margin, "inplace_margin": scored.margin, "fresh_efficacy": fresh.efficacy,
           "inplace_efficacy": scored.efficacy, "fresh_generalization": fresh.generalization,
           "inplace_generalization": scored.generalization, "fresh_locality": fresh.locality,
           "inplace_locality": scored.locality, "delta_max_rel_diff": delta_diff,
           "untouched_tensors_equal": same, "untouched_tensors_differ": differ[:20], "n_differ": len(differ)}
    print(f"verify GPTQ-{bits} on-checkpoint case {case}: margin in place {scored.margin:.4f}, qedit edit's checkpoint "
          f"{fresh.margin:.4f}; deltas differ by {delta_diff} (relative, max over layers); untouched tensors: "
          f"{same} equal, {len(differ)} differ", file=sys.stderr)
    return res


def on_checkpoint(args: argparse.Namespace) -> None:
    """--on-checkpoint: each case's MEMIT edit computed on the unedited checkpoint of the rung, patched in
    edit-aware (qedit's default GPTQ output below 8 bits); rungs one after another, resumable per case."""
    from types import SimpleNamespace

    from harness import COUNTERFACT
    from tqdm.auto import tqdm

    from qedit.converters.gptq.export import calibration_tokens, load_dequantized
    from qedit.converters.loading import load_model
    from qedit.core.facts import load_requests
    from qedit.core.stats import key_covariance
    from qedit.edit.compute import compute_edits
    from qedit.edit.registry import EDIT_METHODS, resolve_layers
    from qedit.evaluation.metrics import EvalReport, evaluate
    from qedit.kernels.gptq import GPTQConfig

    methods = args.methods.split(",")
    if methods != ["memit"]:
        raise SystemExit("--on-checkpoint: MEMIT only (the fp32 rows of --fp32-from are MEMIT's)")
    if args.bnb.strip():
        print("--on-checkpoint: bitsandbytes has no checkpoint to edit; --bnb ignored", file=sys.stderr)
    old = json.loads(args.fp32_from.read_text())
    end = None if args.limit is None else args.first + args.limit
    fp32_rows = {r["case"]: r for r in old["cases"]["memit"]}
    cases = sorted(fp32_rows)[args.first:end]
    every = load_requests(COUNTERFACT)
    bits_list = [int(b) for b in args.gptq.split(",") if b]
    ladder = [f"GPTQ-{b} on-checkpoint" for b in bits_list]
    rows: dict[int, dict] = {}
    checks: list[dict] = []
    seconds: dict[str, float] = {}
    if args.json and args.json.is_file():   # resume: the rows, verify checks and times of the earlier run
        earlier = json.loads(args.json.read_text())
        rows = {r["case"]: r for r in earlier["cases"]["memit"] if r["case"] in cases}
        checks = earlier["verify"]
        seconds = earlier.get("rung_seconds", {})
        ladder += [n for n in earlier["ladder"] if n not in ladder]

    def save() -> None:
        if args.json:
            result = [rows[c] for c in sorted(rows)]
            save_json(args.json, {"command": sys.argv, "ladder": ladder, "summary": {"memit": summarize_cases(result, ladder)},
                                  "verify": checks, "seconds": sum(seconds.values()), "rung_seconds": seconds,
                                  "cases": {"memit": result}})

    source, store = source_store(args.out)
    cfg = EDIT_METHODS.make_config("memit", target_margin=None)   # the saved deltas' settings: full strength
    span = f"{cases[0]}-{cases[-1]}-{len(cases)}"
    reqs = [every[c] for c in cases]
    loaded = None
    for bits in bits_list:
        name = f"GPTQ-{bits} on-checkpoint"
        todo = [c for c in cases if name not in rows.get(c, {"rungs": {}})["rungs"]]
        if not todo:
            continue
        if loaded is None:
            loaded = load_model(source)
        seqs = calibration_tokens(loaded)
        path, _ = store.gptq(loaded, GPTQConfig(bits=bits, group_size=128, desc_act=True), seqs)
        dq = load_dequantized(path)                                  # as the pipeline loads the unedited checkpoint
        layers = resolve_layers(dq, cfg, EDIT_METHODS.get("memit").multi_layer)
        key_covariance(dq, layers, cfg.stats)                        # samples its text and its statistics once
        targets = {dq.arch.mlp_out.format(layer) for layer in layers}
        rung = GPTQRung(path, targets, calibration_tokens(dq, cfg.stats), args.out / f"hessians-{path.name}-own.pt", dq=dq)
        base = dict(zip(cases, cached_report(args.out / f"base-GPTQ-{bits}-{span}.json", lambda r=rung: r.runner, reqs,
                                             f"GPTQ-{bits} unedited").cases))
        started = time.perf_counter()
        for k, case in enumerate(tqdm(todo, desc=name, unit="case")):
            t0 = time.perf_counter()
            req = every[case]
            outcome = compute_edits(dq, [req], "memit", cfg)         # pure: dq is unchanged
            t_edit = time.perf_counter() - t0
            changes = _changes(outcome.deltas)
            if set(changes) - targets:
                raise SystemExit(f"case {case}: the edit changes {sorted(set(changes) - targets)}, not MEMIT's layers")
            keys = {dq.arch.mlp_out.format(layer): v.float() for layer, v in outcome.keys.items()}
            rung.swap(changes, keys)
            try:
                scored = evaluate(rung.runner, [req], baseline=EvalReport({}, [base[case]])).cases[0]
            finally:
                rung.restore()
            fp = fp32_rows[case]
            row = case_row(case, fp["fp32"], SimpleNamespace(margin=fp["fp32_base_margin"]), {name: (scored, base[case])})
            row["rungs"][name].update(edit_seconds=t_edit, seconds=time.perf_counter() - t0,
                                      delta_norm=outcome.delta_norm)
            if case in rows:
                rows[case]["rungs"].update(row["rungs"])
            else:
                rows[case] = row
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
            if args.verify and k == len(todo) - 1:
                checks.append(_verify_on_checkpoint(rung, args.out, source, case, req, base[case], scored, outcome))
            save()
        del rung, dq
        print(f"{name}: {len(todo)} cases in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    save()
    print_case_tables({"memit": [rows[c] for c in sorted(rows)]}, ladder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deltas", type=Path, help="bench_edit --save-deltas directory")
    ap.add_argument("--methods", default="memit")
    ap.add_argument("--gptq", default="8,4,3,2", help="GPTQ bit-widths ('' for none)")
    ap.add_argument("--bnb", default="int8,nf4", help="bitsandbytes modes ('' for none)")
    ap.add_argument("--encodings", default="naive,aware")
    ap.add_argument("--out", type=Path, help="artifacts, Hessians and baselines")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="only join the --json files of earlier runs into --json and print the tables")
    ap.add_argument("--json", type=Path, default=None, help="per-case rows and summary, rewritten after every case")
    ap.add_argument("--first", type=int, default=0, help="skip this many cases per method")
    ap.add_argument("--limit", type=int, default=None, help="at most this many cases per method")
    ap.add_argument("--verify", action="store_true", help="score the real patched checkpoint of the last case (after the swaps of the others)")
    ap.add_argument("--on-checkpoint", action="store_true",
                    help="qedit's default below 8 bits: each edit computed on the unedited checkpoint (no --deltas)")
    ap.add_argument("--fp32-from", type=Path, default=Path(__file__).parent / "data" / "survival_gptq_cases_memit_200.json",
                    help="with --on-checkpoint: the per-case fp32 scores (an earlier run's JSON on the saved deltas)")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.json)
    if args.on_checkpoint:
        if args.out is None:
            ap.error("--out is required")
        torch.set_num_threads(1)
        os.environ.setdefault("GPTQ_TORCH_CACHE_WEIGHTS", "1")
        torch._dynamo.config.disable = True
        return on_checkpoint(args)
    if args.deltas is None or args.out is None:
        ap.error("--deltas and --out are required (unless --merge)")
    torch.set_num_threads(1)
    os.environ.setdefault("GPTQ_TORCH_CACHE_WEIGHTS", "1")   # read when GPTQModel builds its modules
    torch._dynamo.config.disable = True                      # GPTQModel's torch.compile: eager instead

    from tqdm.auto import tqdm

    from qedit.converters.gptq.export import calibration_tokens
    from qedit.converters.loading import load_model
    from qedit.core.delta import load_deltas, load_edit_keys
    from qedit.evaluation.metrics import EvalReport, evaluate
    from qedit.kernels.gptq import GPTQConfig

    source, store = source_store(args.out)
    methods = args.methods.split(",")
    saved = saved_cases(args.deltas, methods, args.out, args.first, args.limit)
    case_dirs, cases, reqs, span, base32 = saved.dirs, saved.cases, saved.requests, saved.span, saved.base32
    targets = {n for dirs in case_dirs.values() for d in dirs for n in _changes(load_deltas(d)[0])}
    encodings = args.encodings.split(",")

    loaded = load_model(source)
    seqs = calibration_tokens(loaded)
    rungs: dict[str, object] = {}
    for bits in [int(b) for b in args.gptq.split(",") if b]:
        path, _ = store.gptq(loaded, GPTQConfig(bits=bits, group_size=128, desc_act=True), seqs)
        rungs[f"GPTQ-{bits}"] = GPTQRung(path, targets, seqs, args.out / f"hessians-{path.name}.pt")
    for mode in [m for m in args.bnb.split(",") if m]:
        rungs[f"BNB-{mode}"] = BnbRung(loaded, mode)
    bases = {}
    for name, rung in rungs.items():
        rep = cached_report(args.out / f"base-{name}-{span}.json", lambda r=rung: r.runner, reqs, f"{name} unedited")
        bases[name] = dict(zip(cases, rep.cases))
    columns = [(name, enc) for name in rungs for enc in (encodings if name.startswith("GPTQ") else ["naive"])]
    ladder = [f"{name} {enc}" for name, enc in columns]
    results: dict[str, list[dict]] = {}
    checks: list[dict] = []
    started = time.perf_counter()
    for method in methods:
        rows = results.setdefault(method, [])
        for k, d in enumerate(tqdm(case_dirs[method], desc=method, unit="case")):
            deltas, manifest = load_deltas(d)
            changes = _changes(deltas)
            keys = {loaded.arch.mlp_out.format(layer): v.float() for layer, v in load_edit_keys(d).items()}
            case = case_number(d)
            req = saved.request(case)
            per_rung = {}
            for name, enc in columns:
                rung = rungs[name]
                rung.swap(changes, keys if enc == "aware" else None)
                try:
                    scored = evaluate(rung.runner, [req], baseline=EvalReport({}, [bases[name][case]])).cases[0]
                finally:
                    rung.restore()
                per_rung[f"{name} {enc}"] = (scored, bases[name][case])
                if args.verify and k == len(case_dirs[method]) - 1 and name.startswith("GPTQ"):
                    raw_keys = {int(lay): v.float() for lay, v in load_edit_keys(d).items()} if enc == "aware" else None
                    checks.append(_verify(rung, args.out, deltas, raw_keys, manifest, seqs, req, scored, enc))
            rows.append(case_row(case, manifest["bench_case"], base32[case], per_rung))
            if args.json:
                summary = {m: summarize_cases(r, ladder) for m, r in results.items()}
                save_json(args.json, {"command": sys.argv, "ladder": ladder, "summary": summary, "verify": checks,
                                      "seconds": time.perf_counter() - started, "cases": results})
    print_case_tables(results, ladder)

if __name__ == "__main__":
    main()

"""GPTQ of a whole causal LM, layer by layer, from calibration token sequences.

The decoder layers are quantized in order (GPTQModel's procedure): the inputs of layer 0 are
captured once, with the keyword arguments every layer is called with (masks, rotary embeddings);
then each layer is run on its own. Inside a layer, with `true_sequential`, the Linear modules are
quantized in groups that share an input (q/k/v, then o, then gate/up, then down), each group's
Hessian computed after the earlier groups were quantized; the layer's outputs, computed with the
quantized weights, are the next layer's inputs. The model's weights are restored at the end: the
results are returned, never folded.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, nullcontext

import torch
from torch import nn

from qedit.core.errors import QeditError
from qedit.core.hooks import record, stop_after
from qedit.core.model import LoadedModel
from qedit.kernels.gptq import GPTQConfig, GPTQResult, HessianAccumulator, gptq_quantize

log = logging.getLogger(__name__)

# input ids (b, s), attention mask (b, s), and which positions enter the Hessians (b, s)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 Conv1D, weight (in, out)


def weight_math(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in) (a view)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_math(module: nn.Module, w: torch.Tensor) -> None:
    """Copy w (out, in) into the module's weight, in its orientation and dtype."""
    target = module.weight
    target.data.copy_((w.t() if is_conv1d(module) else w).to(dtype=target.dtype, device=target.device))


def quantizable_linears(loaded: LoadedModel) -> list[str]:
    """Names of the Linear (and Conv1D) modules inside decoder layers, in layer order."""
    names = []
    for i in range(loaded.n_layers):
        prefix = loaded.arch.layer.format(i)
        for rel, mod in loaded.module(prefix).named_modules():
            if rel and (isinstance(mod, nn.Linear) or is_conv1d(mod)):
                names.append(f"{prefix}.{rel}")
    return names


def check_packable(loaded: LoadedModel, names: Sequence[str]) -> None:
    """GPTQ packing needs in_features and out_features to be multiples of 32."""
    for name in names:
        out_f, in_f = weight_math(loaded.module(name)).shape
        if in_f % 32 or out_f % 32:
            raise QeditError(f"{loaded.source}: {name} is {out_f} x {in_f}; GPTQ checkpoints need both sizes to be "
                             "multiples of 32 (this model cannot be written as GPTQ)")


def make_batches(seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int, bos_id: int | None = None) -> list[Batch]:
    """Token sequences -> right-padded batches. With `bos_id`, a leading BOS is left out of the Hessians
    (as out of the edit statistics): Gemma's attention sink there has outsized activations that inflate
    diag(H), and with it the damping of every other input (leaving it out lowers Gemma 3 270M's 4-bit
    perplexity)."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise QeditError("GPTQ calibration: no calibration text (or an empty sequence); give a corpus with text")
    out = []
    for lo in range(0, len(seqs), batch_size):
        chunk = seqs[lo:lo + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
        keep = mask.clone()
        if bos_id is not None:
            keep[:, 0] *= (ids[:, 0] != bos_id).long()
        if not keep.any():
            raise QeditError("GPTQ calibration: the sequences hold nothing but BOS; give longer calibration text")
        out.append((ids, mask, keep))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same storage and view (hooks hand out detached aliases of one tensor)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (b, s, d), mask (b, s) -> the unpadded rows (tokens, d)."""
    return x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool().to(x.device)]


class _Stop(Exception):
    pass


def _capture(loaded: LoadedModel, batches: Sequence[Batch]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Per batch the input of layer 0; per layer and batch the (args, kwargs) it is called with."""
    layers = [loaded.module(loaded.arch.layer.format(i)) for i in range(loaded.n_layers)]
    calls: list[list[tuple]] = [[] for _ in layers]
    hidden: list[torch.Tensor] = []
    base = loaded.module(loaded.arch.base_model)
    for ids, mask, _ in batches:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, _i: int) -> None:
            kw = dict(kwargs)
            h = args[0] if args else kw.pop("hidden_states")
            if _i == 0:
                hidden.append(h.detach())
            calls[_i].append((tuple(args[1:]), kw))
            if _i == len(layers) - 1:
                raise _Stop

        with ExitStack() as stack:
            for i, layer in enumerate(layers):
                handle = layer.register_forward_pre_hook(lambda m, a, k, _i=i: hook(m, a, k, _i), with_kwargs=True)
                stack.callback(handle.remove)
            try:
                base(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), use_cache=False)
            except _Stop:
                pass
    return hidden, calls


def _run(layer: nn.Module, h: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    out = layer(h, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _input_groups(layer: nn.Module, rel_names: Sequence[str], h: torch.Tensor, call: tuple) -> list[list[str]]:
    """The modules grouped by the input tensor they share, in the order they are called."""
    seen: list[tuple[torch.Tensor, list[str]]] = []
    with ExitStack() as stack:
        for rel in rel_names:
            def hook(mod: nn.Module, args: tuple, _rel: str = rel) -> None:
                for x, members in seen:
                    if x is args[0]:
                        members.append(_rel)
                        return
                seen.append((args[0], [_rel]))

            handle = layer.get_submodule(rel).register_forward_pre_hook(hook)
            stack.callback(handle.remove)
        _run(layer, h, call)
    groups = [members for _, members in seen]
    missing = set(rel_names) - {n for g in groups for n in g}
    return groups + ([sorted(missing)] if missing else [])


@torch.no_grad()
def quantize_model(loaded: LoadedModel, cfg: GPTQConfig, seqs: Sequence[Sequence[int]], *,
                   edit_keys: Mapping[str, torch.Tensor] | None = None, true_sequential: bool = True,
                   batch_size: int = 8, skip_bos: bool = True) -> dict[str, GPTQResult]:
    """GPTQ every decoder Linear; returns module name -> result. `edit_keys`: module name -> keys (n, in)."""
    names = quantizable_linears(loaded)
    check_packable(loaded, names)
    for name in names:
        cfg.check_shape(*weight_math(loaded.module(name)).shape, where=f"{loaded.source}: {name}")
    batches = make_batches(seqs, loaded.tokenizer.pad_token_id, batch_size,
                           loaded.tokenizer.bos_token_id if skip_bos else None)
    saved = {n: weight_math(loaded.module(n)).detach().clone() for n in names}
    results: dict[str, GPTQResult] = {}
    began = time.perf_counter()
    try:
        hidden, calls = _capture(loaded, batches)
        for i in range(loaded.n_layers):
            prefix = loaded.arch.layer.format(i)
            layer = loaded.module(prefix)
            rel = [n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")]
            groups = _input_groups(layer, rel, hidden[0], calls[i][0]) if true_sequential else [rel]
            for group in groups:
                accs = {r: HessianAccumulator(weight_math(layer.get_submodule(r)).shape[1]) for r in group}
                owner = {r: r for r in group}  # modules fed the same tensor share one accumulator
                for b, (_, _, keep) in enumerate(batches):
                    # groups are in call order, so the rest of the layer is not needed for these inputs
                    stop = stop_after(layer, group[-1]) if true_sequential else nullcontext()
                    with record(layer, group, kind="input") as rec, stop:
                        _run(layer, hidden[b], calls[i][b])
                    if b == 0:
                        owner = {r: next(o for o in group if _same(rec[o], rec[r])) for r in group}
                    for r in group:
                        if owner[r] == r:
                            accs[r].add(_tokens(rec[r], keep))
                for r in group:
                    accs[r] = accs[owner[r]]
                for r in group:
                    full = f"{prefix}.{r}"
                    module = layer.get_submodule(r)
                    keys = (edit_keys or {}).get(full)
                    res = gptq_quantize(weight_math(module), accs[r].result(), cfg, keys, where=full)
                    set_weight_math(module, res.dequant)
                    results[full] = res
            hidden = [_run(layer, hidden[b], calls[i][b]) for b in range(len(batches))]
            log.info("GPTQ layer %d/%d done (%.1f s)", i + 1, loaded.n_layers, time.perf_counter() - began)
    finally:
        for n, w in saved.items():
            set_weight_math(loaded.module(n), w)
    return results


@torch.no_grad()
def module_hessian(loaded: LoadedModel, name: str, batches: Sequence[Batch]) -> torch.Tensor:
    """H = 2/n sum x x^T (in, in) of module `name`'s inputs over the calibration batches, model as it is now."""
    acc = HessianAccumulator(weight_math(loaded.module(name)).shape[1])
    base = loaded.module(loaded.arch.base_model)
    for ids, mask, keep in batches:
        with record(loaded.model, [name], kind="input") as rec, stop_after(loaded.model, name):
            base(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), use_cache=False)
        acc.add(_tokens(rec[name], keep))
    return acc.result()


def keys_by_module(loaded: LoadedModel, keys: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Edit keys per layer (inputs of the MLP output projection) -> keyed by that module's name."""
    return {loaded.arch.mlp_out.format(int(layer)): k for layer, k in keys.items()}

"""All forward hooks live here (the nethook pattern): record a module's input or output, or edit
its output during a forward pass. Algorithms get tensors back, never modules, and no hook
outlives its `with` block, so the model is never changed by capturing or injecting.

One kind is permanent: `wrap_forward`, with which a model's own machinery (`qedit.core.streaming`: weights
decoded while a layer runs) wraps a module's forward for the model's lifetime."""
from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

OutputEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (module input, output) -> new output


def _first(x: object) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x  # type: ignore[return-value]


def _replace_first(x: object, new: torch.Tensor) -> object:
    if isinstance(x, tuple):
        return (new, *x[1:])
    if isinstance(x, list):
        return [new, *x[1:]]
    return new


@contextmanager
def record(model: nn.Module, names: Sequence[str], kind: str = "output", detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first input (kind="input") or output (kind="output") tensor of each named module.

    Yields a dict filled by the next forward pass: name -> tensor (batch, seq, dim).
    """
    if kind not in ("input", "output"):
        raise ValueError(f"kind must be 'input' or 'output', not {kind!r}")
    store: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for name in names:
            module = model.get_submodule(name)

            def hook(mod: nn.Module, args: tuple, out: object, _name: str = name) -> None:
                t = _first(args) if kind == "input" else _first(out)
                store[_name] = t.detach() if detach else t

            handle = module.register_forward_hook(hook)
            stack.callback(handle.remove)
        yield store


@contextmanager
def edit_outputs(model: nn.Module, edits: Mapping[str, OutputEdit]) -> Iterator[None]:
    """During the block, each named module's output becomes edit(input, output)."""
    with ExitStack() as stack:
        for name, fn in edits.items():
            module = model.get_submodule(name)

            def hook(mod: nn.Module, args: tuple, out: object, _fn: OutputEdit = fn) -> object:
                return _replace_first(out, _fn(_first(args), _first(out)))

            handle = module.register_forward_hook(hook)
            stack.callback(handle.remove)
        yield


class _StopForward(Exception):
    pass


@contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """Abandon the forward pass once module `name` has run (when only earlier activations are needed).

    Use as `with stop_after(m, n): run_forward(...)`; the forward returns nothing then.
    """
    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        raise _StopForward

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


class _Replay(nn.Module):
    """Stands in for a decoder layer that need not run: returns its input, or, for the last one, `output`."""

    def __init__(self, output: object | None) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> object:
        if self.output is not None:
            return self.output
        return args[0] if args else kwargs["hidden_states"]


@contextmanager
def replay(model: nn.Module, names: Sequence[str], output: object) -> Iterator[None]:
    """During the block, the named modules (the first decoder layers, in order) do not run: the last returns
    `output`, its output recorded (`record_whole`) in an earlier pass of the same batch, the others pass their
    input on. For the steps of an optimisation that changes nothing below them: their work is done once.
    The modules are swapped out of their parents, so hooks on them or inside them do not run either (the
    recorded output already holds what they did)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for i, name in enumerate(names):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swapped.append((parent, child, parent._modules[child]))  # type: ignore[arg-type]
            parent._modules[child] = _Replay(output if i == len(names) - 1 else None)
        yield
    finally:
        for parent, child, module in swapped:
            parent._modules[child] = module


@contextmanager
def record_whole(model: nn.Module, name: str) -> Iterator[list[object]]:
    """Record module `name`'s whole output (a tensor or a tuple, detached) in the next forward pass, for `replay`."""
    store: list[object] = []

    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        store.append(_replace_first(out, _first(out).detach()))

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def at_positions(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """t[rows[i], cols[i]] (n, ...) of a value recorded at some module, t (batch, seq, ...): the indices are moved to
    t's device (with a device map, a layer's values live on that layer's device)."""
    return t[rows.to(t.device), cols.to(t.device)]


def add_at_positions(vectors: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> OutputEdit:
    """An OutputEdit adding vectors[i] (n, dim) to output[rows[i], cols[i]], on the output's device."""

    def fn(_inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # out: (batch, seq, dim)
        r, c = rows.to(out.device), cols.to(out.device)
        out = out.clone()
        out[r, c] = out[r, c] + vectors.to(device=out.device, dtype=out.dtype)
        return out

    return fn


def wrap_forward(module: nn.Module, wrapper: Callable[..., Any]) -> None:
    """From now on, `module(...)` runs wrapper(original_forward, *args, **kwargs) in place of its forward. The
    module's forward hooks still run around it (a `record` or `stop_after` sees the wrapped call's output)."""
    module.forward = functools.partial(wrapper, module.forward)  # type: ignore[method-assign]

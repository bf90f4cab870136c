"""The method registry (keyed by `EditMethod`), configs and the one signature every method has:

    compute(loaded, requests, cfg, ctx) -> EditResult

A method reads the model (forward passes, hooks) and returns deltas; it never changes weights.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

import torch

from qedit.delta import LowRankDelta
from qedit.errors import QeditError
from qedit.facts import EditRequest
from qedit.model import LoadedModel
from qedit.stats import StatsConfig


class EditMethod(str, enum.Enum):
    ROME = "rome"
    MEMIT = "memit"
    ALPHAEDIT = "alphaedit"
    FT = "ft"
    GA = "ga"            # unlearning methods: they take ForgetRequests (qedit.forget), not EditRequests
    NPO = "npo"
    QFORGET = "qforget"
    KFORGET = "kforget"


UNLEARN_METHODS: frozenset[EditMethod] = frozenset({EditMethod.GA, EditMethod.NPO, EditMethod.QFORGET,
                                                    EditMethod.KFORGET})


@dataclass(frozen=True)
class TargetConfig:
    """How the target value v* (or residual target z) is optimised."""

    steps: int = 25
    lr: float = 2.0                  # Adam step, in units of the site's RMS value
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    clamp_norm: float = 4.0          # max ||delta|| / ||original value|| (MEMIT-style residual targets: 0.75)
    stop_nll: float = 0.05           # stop when the mean target NLL falls below this
    n_prefixes: int = 4              # context prefixes sampled from the model (plus the bare prompt)
    prefix_len: int = 8
    chunk: int = 8                   # requests optimised together

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.chunk < 1 or self.n_prefixes < 0:
            raise ValueError("TargetConfig: steps >= 1, lr > 0, chunk >= 1, n_prefixes >= 0")


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method shares. layers=None means the architecture's default layers."""

    layers: tuple[int, ...] | None = None
    target: TargetConfig = field(default_factory=TargetConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    rank: int | None = None          # truncate each delta to this rank (None: exact rank)
    energy: float | None = None      # or keep this share of its energy

    def __post_init__(self) -> None:
        if self.layers is not None and len(self.layers) == 0:
            raise ValueError("layers must not be empty")
        if self.rank is not None and self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError("energy must be in (0, 1]")


@dataclass
class EditContext:
    """What a method may use besides the model: where it runs, and the history of earlier batches."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # layer -> sum of k k^T over the keys of earlier edits (sequential editing); read-only to methods
    history: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class EditResult:
    deltas: list[LowRankDelta]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> (n, d_in) keys edited
    info: dict[str, Any] = field(default_factory=dict)


C = TypeVar("C", bound=MethodConfig)
ComputeFn = Callable[[LoadedModel, Sequence[EditRequest], Any, EditContext], EditResult]


@dataclass(frozen=True)
class MethodSpec(Generic[C]):
    method: EditMethod
    config_cls: type[C]
    compute: ComputeFn
    multi_layer: bool


# Filled by `register_method` when qedit.methods imports each method module.
_REGISTRY: dict[EditMethod, MethodSpec] = {}


def register_method(method: EditMethod, config_cls: type[MethodConfig], multi_layer: bool) -> Callable[[ComputeFn], ComputeFn]:
    """Register `compute` as the implementation of `method` (peft's register_peft_method pattern)."""

    def deco(fn: ComputeFn) -> ComputeFn:
        if method in _REGISTRY:
            raise ValueError(f"method {method.value} registered twice")
        _REGISTRY[method] = MethodSpec(method, config_cls, _checked(method, fn), multi_layer)
        return fn

    return deco


def _checked(method: EditMethod, fn: ComputeFn) -> ComputeFn:
    """`fn` behind a check that the requests are of the kind the method takes."""

    def compute(loaded: LoadedModel, requests: Sequence[Any], cfg: Any, ctx: EditContext) -> EditResult:
        check_request_kind(method, requests)
        return fn(loaded, requests, cfg, ctx)

    compute.__doc__, compute.__name__ = fn.__doc__, getattr(fn, "__name__", "compute")
    return compute


def check_request_kind(method: EditMethod, requests: Sequence[Any]) -> None:
    """Edit methods take EditRequests, unlearning methods (UNLEARN_METHODS) ForgetRequests; else QeditError."""
    from qedit.forget import ForgetRequest

    want, loader = (ForgetRequest, "qedit.forget.load_forget_requests") if method in UNLEARN_METHODS \
        else (EditRequest, "qedit.facts.load_requests")
    for i, r in enumerate(requests):
        if not isinstance(r, want):
            raise QeditError(f"method {method.value} takes {want.__name__}s, but request {i} is a "
                             f"{type(r).__name__}; read the facts with {loader}")


def get_method(name: str | EditMethod) -> MethodSpec:
    import qedit.methods  # noqa: F401  (registers every method)

    try:
        key = EditMethod(name)
    except ValueError:
        raise QeditError(f"unknown method {name!r}; choose one of: {', '.join(m.value for m in EditMethod)}") from None
    return _REGISTRY[key]


def resolve_layers(loaded: LoadedModel, cfg: MethodConfig, multi_layer: bool) -> tuple[int, ...]:
    layers = cfg.layers if cfg.layers is not None else loaded.arch.default_layers(loaded.n_layers, multi_layer)
    for layer in layers:
        loaded.check_layer(layer)
    return tuple(sorted(set(layers)))


def finish_delta(loaded: LoadedModel, layer: int, dense: torch.Tensor, cfg: MethodConfig,
                 meta: dict[str, Any] | None = None) -> LowRankDelta:
    """A dense (out, in) change at `layer` -> LowRankDelta, truncated as cfg asks."""
    from qedit.delta import Delta

    d = Delta(loaded.arch.weight_name(layer), layer, dense.float(), loaded.arch.mlp_out_orientation)
    lr = d.to_low_rank(rank=cfg.rank, energy=cfg.energy)
    return LowRankDelta(lr.name, lr.layer, lr.a, lr.b, lr.scale, lr.orientation, dict(meta or {}))

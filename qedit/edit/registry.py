"""The edit-method registry (keyed by `EditMethod`), configs and the one signature every method has:

    compute(loaded, requests, cfg, ctx) -> EditResult

A method reads the model (forward passes, hooks) and returns deltas; it never changes weights.
`MethodRegistry` is generic over the enum so that unlearning (`qedit.unlearn.registry`) keeps a
registry of its own, with its own request type, in the same form (peft's `register_peft_method`).
Importing `qedit.edit` registers every edit method.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from qedit.core.delta import Delta, LowRankDelta
from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest
from qedit.core.model import LoadedModel
from qedit.core.stats import StatsConfig


class EditMethod(str, enum.Enum):
    ROME = "rome"
    MEMIT = "memit"
    ALPHAEDIT = "alphaedit"
    FT = "ft"


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
    # True once earlier batches of the run are applied to the model's weights: the model is then not its source
    # file, and nothing computed on it may be cached under the file's fingerprint
    earlier_applied: bool = False


@dataclass
class EditResult:
    deltas: list[LowRankDelta]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> (n, d_in) keys edited
    info: dict[str, Any] = field(default_factory=dict)


M = TypeVar("M", bound=enum.Enum)
ComputeFn = Callable[[LoadedModel, Sequence[Any], Any, EditContext], EditResult]


@dataclass(frozen=True)
class MethodSpec(Generic[M]):
    method: M
    config_cls: type[MethodConfig]
    compute: ComputeFn
    multi_layer: bool
    # for the memory budget: float64 matrices of the covariance's size its largest solve holds at once, and bytes
    # per covariance entry each edited layer keeps throughout the edit (4: its float32 covariance; 0: read back
    # from the statistics cache one layer at a time)
    solve_copies: int = 2
    stats_held: int = 4


class MethodRegistry(Generic[M]):
    """Methods of one kind (edits, or unlearning), keyed by their enum; each takes one request type."""

    def __init__(self, kind: str, methods: type[M], request_type: type, loader: str) -> None:
        self.kind, self.methods, self.request_type, self.loader = kind, methods, request_type, loader
        self._specs: dict[M, MethodSpec[M]] = {}

    def register(self, method: M, config_cls: type[MethodConfig], multi_layer: bool, solve_copies: int = 2,
                 stats_held: int = 4) -> Callable[[ComputeFn], ComputeFn]:
        """Register `compute` as the implementation of `method` (`solve_copies`: see MethodSpec)."""

        def deco(fn: ComputeFn) -> ComputeFn:
            if method in self._specs:
                raise ValueError(f"method {method.value} registered twice")
            self._specs[method] = MethodSpec(method, config_cls, self._checked(method, fn), multi_layer, solve_copies,
                                             stats_held)
            return fn

        return deco

    def _checked(self, method: M, fn: ComputeFn) -> ComputeFn:
        """`fn` behind a check that the requests are of the kind the registry's methods take."""

        def compute(loaded: LoadedModel, requests: Sequence[Any], cfg: Any, ctx: EditContext) -> EditResult:
            for i, r in enumerate(requests):
                if not isinstance(r, self.request_type):
                    raise QeditError(f"method {method.value} takes {self.request_type.__name__}s, but request {i} is a "
                                     f"{type(r).__name__}; read the facts with {self.loader}")
            return fn(loaded, requests, cfg, ctx)

        compute.__doc__, compute.__name__ = fn.__doc__, getattr(fn, "__name__", "compute")
        return compute

    def names(self) -> list[str]:
        return [m.value for m in self.methods]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, self.methods) or name in self.names()

    def get(self, name: str | M) -> MethodSpec[M]:
        try:
            key = self.methods(name)
        except ValueError:
            raise QeditError(f"unknown {self.kind} method {name!r}; choose one of: {', '.join(self.names())}") from None
        if key not in self._specs:
            raise QeditError(f"{self.kind} method {key.value} is not registered (import its package first)")
        return self._specs[key]

    def make_config(self, name: str | M, **overrides: Any) -> MethodConfig:
        """The method's config with `overrides` (unknown keys are an error naming the known ones)."""
        spec = self.get(name)
        names = {f.name for f in dataclasses.fields(spec.config_cls)}
        unknown = set(overrides) - names
        if unknown:
            raise QeditError(f"{spec.method.value} has no setting(s) {sorted(unknown)}; known: {sorted(names)}")
        try:
            return spec.config_cls(**overrides)
        except ValueError as exc:
            if isinstance(exc, QeditError):
                raise
            raise QeditError(f"invalid setting for {spec.method.value}: {exc}") from exc


EDIT_METHODS: MethodRegistry[EditMethod] = MethodRegistry("edit", EditMethod, EditRequest,
                                                          "qedit.core.facts.load_requests")


def register_method(method: EditMethod, config_cls: type[MethodConfig], multi_layer: bool, solve_copies: int = 2,
                    stats_held: int = 4) -> Callable[[ComputeFn], ComputeFn]:
    """Register an edit method (the decorator each method module applies)."""
    return EDIT_METHODS.register(method, config_cls, multi_layer, solve_copies, stats_held)


def get_method(name: str | EditMethod) -> MethodSpec[EditMethod]:
    return EDIT_METHODS.get(name)


def resolve_layers(loaded: LoadedModel, cfg: MethodConfig, multi_layer: bool) -> tuple[int, ...]:
    layers = cfg.layers if cfg.layers is not None else loaded.arch.default_layers(loaded.n_layers, multi_layer)
    for layer in layers:
        loaded.check_layer(layer)
    return tuple(sorted(set(layers)))


def finish_delta(loaded: LoadedModel, layer: int, dense: torch.Tensor, cfg: MethodConfig,
                 meta: dict[str, Any] | None = None) -> LowRankDelta:
    """A dense (out, in) change at `layer` -> LowRankDelta, truncated as cfg asks."""
    d = Delta(loaded.arch.weight_name(layer), layer, dense.float(), loaded.arch.mlp_out_orientation)
    lr = d.to_low_rank(rank=cfg.rank, energy=cfg.energy)
    return LowRankDelta(lr.name, lr.layer, lr.a, lr.b, lr.scale, lr.orientation, dict(meta or {}))

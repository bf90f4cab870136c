"""The unlearning-method registry: GA, NPO, qforget and kforget, keyed by `UnlearnMethod`.

Unlearning methods have the signature of edit methods (`compute(loaded, requests, cfg, ctx) -> EditResult`,
deltas as data, the model untouched) but take `ForgetRequest`s, so they live in a registry of their own.
Importing `qedit.unlearn` registers every method.
"""
from __future__ import annotations

import enum
from collections.abc import Callable

from qedit.edit.registry import ComputeFn, MethodConfig, MethodRegistry, MethodSpec
from qedit.unlearn.requests import ForgetRequest


class UnlearnMethod(str, enum.Enum):
    GA = "ga"
    NPO = "npo"
    QFORGET = "qforget"
    KFORGET = "kforget"


UNLEARN_METHODS: MethodRegistry[UnlearnMethod] = MethodRegistry("unlearning", UnlearnMethod, ForgetRequest,
                                                                "qedit.unlearn.requests.load_forget_requests")


def register_unlearn_method(method: UnlearnMethod, config_cls: type[MethodConfig], multi_layer: bool,
                            solve_copies: int = 2, stats_held: int = 4) -> Callable[[ComputeFn], ComputeFn]:
    """Register an unlearning method (the decorator each method module applies)."""
    return UNLEARN_METHODS.register(method, config_cls, multi_layer, solve_copies, stats_held)


def get_unlearn_method(name: str | UnlearnMethod) -> MethodSpec[UnlearnMethod]:
    return UNLEARN_METHODS.get(name)

"""Edit methods. Importing this package registers each one under its `EditMethod`."""
from qedit.methods import alphaedit, ft, memit, rome  # noqa: F401  (registration)
from qedit.methods import ga, kforget, npo, qforget  # noqa: F401  (registration: unlearning methods)
from qedit.methods.base import (EditContext, EditMethod, EditResult, MethodConfig, TargetConfig, get_method,
                                register_method)

__all__ = ["EditContext", "EditMethod", "EditResult", "MethodConfig", "TargetConfig", "get_method", "register_method"]

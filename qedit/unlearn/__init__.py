"""Unlearning: forget requests (`requests`), their registry (`registry`), the training loop GA, NPO and
qforget share (`loop`) and the methods (`methods/`). Importing this package registers every method."""
from qedit.unlearn.methods import ga, kforget, npo, qforget  # noqa: F401  (registration)

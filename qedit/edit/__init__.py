"""Edits: requests -> low-rank deltas. The registry (`registry`), the steps every locate-then-edit method
is built from (`keys`, `targets`, `spread`, `strength`, `requant`) and the methods (`methods/`).
Importing this package registers every edit method."""
from qedit.edit.methods import alphaedit, ft, memit, rome  # noqa: F401  (registration)

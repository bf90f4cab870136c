"""`qedit cache`: what qedit keeps under $QEDIT_CACHE, per source model and kind, and removing it; and the size
cap (QEDIT_CACHE_MAX) applied after each `edit`, `forget`, `survival` and `demo` run."""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qedit.converters.ollama import as_source
from qedit.core.cache import (
    DEFAULT_MAX,
    KINDS,
    MODEL_FILE,
    STATISTICS,
    Entry,
    cache_max,
    default_cache_dir,
    entries,
    evict,
    format_age,
    format_size,
    model_key,
    parse_age,
    remove,
)
from qedit.core.errors import QeditError
from qedit.core.model import fingerprint_source

KIND_CHOICES = (STATISTICS, *KINDS)

DESCRIPTION = f"""\
What qedit caches under $QEDIT_CACHE (default ~/.cache/qedit), per source model: key statistics (text sampled
from the model, covariances), optimised targets, and the demo's survival artifacts (quantized files).
Entries are kept under QEDIT_CACHE_MAX (default {DEFAULT_MAX}; e.g. 500M, 5G, 5GB, 5GiB): after each edit, forget,
survival and demo run the least recently used ones are evicted, and the run says which.
`qedit cache` alone lists the entries; `qedit cache clear` removes them."""


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("cache", help="list or clear what qedit caches (statistics, targets, survival artifacts)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=DESCRIPTION,
                       epilog="examples:\n"
                              "  qedit cache                                  list the entries, size and last use\n"
                              "  qedit cache clear --older-than 7d            remove entries unused for a week\n"
                              "  qedit cache clear --model model.Q4_K_M.gguf  remove what is cached for one model\n"
                              "  qedit cache clear                            remove everything qedit cached")
    p.set_defaults(run=cmd_list)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="list the entries: model, kind, size, last use (the default)",
                       description="List what qedit caches: per source model and kind, size and last use."
                       ).set_defaults(run=cmd_list)
    c = actions.add_parser("clear", help="remove entries (all, or those --older-than / --model / --kind select)",
                           description="Remove cached entries, and nothing else; says what was removed and the "
                                       "space freed. Entries in use by a running qedit process are kept.")
    c.add_argument("--older-than", type=str, default=None, metavar="AGE",
                   help="only entries last used more than AGE ago: 30m, 12h, 7d, 2w")
    c.add_argument("--model", type=Path, default=None, metavar="FILE",
                   help="only the entries of this model: its file or directory, ollama:NAME[:TAG], or the name "
                        "`qedit cache` lists")
    c.add_argument("--kind", choices=KIND_CHOICES, default=None, help="only entries of this kind")
    c.set_defaults(run=cmd_clear)


def cmd_list(args: argparse.Namespace) -> int:
    root = default_cache_dir()
    listed = entries(root)
    try:
        cap = format_size(cache_max())
    except QeditError as exc:
        cap = f"none ({exc})"
    print(f"cache: {root}, {format_size(sum(e.size for e in listed))} in {len(listed)} entries; "
          f"cap {cap} (QEDIT_CACHE_MAX)")
    if not listed:
        return 0
    rows = [("model", "kind", "size", "last use", "")]
    now = time.time()
    for i, e in enumerate(listed):
        model = "" if i and e.model == listed[i - 1].model else e.label
        rows.append((model, e.kind, format_size(e.size), format_age(e.last_use, now),
                     e.detail + (" (in use)" if e.in_use else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4]).rstrip())
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    root = default_cache_dir()
    listed = entries(root)
    chosen = list(listed)
    if args.model is not None:
        keys = _model_keys(root, listed, args.model)
        chosen = [e for e in chosen if e.model in keys]
    if args.kind is not None:
        chosen = [e for e in chosen if e.kind == KINDS.get(args.kind, args.kind)]
    if args.older_than is not None:
        cutoff = time.time() - parse_age(args.older_than)
        chosen = [e for e in chosen if e.last_use < cutoff]
    busy = [e for e in chosen if e.in_use]
    chosen = [e for e in chosen if not e.in_use]
    now = time.time()
    for e in chosen:
        print(f"removing {e.label} {e.kind}{f' ({e.detail})' if e.detail else ''}: {format_size(e.size)}, "
              f"last used {format_age(e.last_use, now)}")
    freed = remove(root, chosen)
    for e in busy:
        print(f"kept {e.label} {e.kind}: in use by a running qedit process")
    print(f"removed {len(chosen)} of {len(listed)} entries from {root}: {format_size(freed)} freed")
    return 0


def _model_keys(root: Path, listed: Sequence[Entry], model: Path) -> set[str]:
    """The directory keys of the model `--model` names: an existing file by the source path recorded beside its
    entries, else by its sha256; otherwise the label `qedit cache` lists, or the directory's key."""
    path, _ = as_source(model)
    if path.exists():
        keys = {e.model for e in listed if _recorded_source(root / e.model) == str(path.resolve())}
        keys = keys or {model_key(fingerprint_source(path))}
    else:
        keys = {e.model for e in listed if str(model) in (e.label, e.model)}
    if not keys & {e.model for e in listed}:
        known = sorted({e.label for e in listed if e.model})
        raise QeditError(f"--model {model}: nothing is cached for it; cached models: {', '.join(known) or 'none'}")
    return keys


def _recorded_source(model_dir: Path) -> str | None:
    try:
        return str(json.loads((model_dir / MODEL_FILE).read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evict_after_run(root: Path | None = None, notify: Callable[[str], None] = print) -> None:
    """Keep the cache under QEDIT_CACHE_MAX: evict the least recently used entries, and say which."""
    root = root or default_cache_dir()
    try:
        cap = cache_max()
    except QeditError as exc:
        notify(f"qedit: warning: {exc}; the cache was not trimmed")
        return
    result = evict(root, cap)
    if result.evicted:
        shown = "; ".join(f"{e.label} {e.kind} ({format_size(e.size)})" for e in result.evicted)
        notify(f"cache over {format_size(cap)} (QEDIT_CACHE_MAX): evicted the least recently used: {shown}; "
               f"{format_size(sum(e.size for e in result.evicted))} freed, {format_size(result.total)} left in {root}")
    if result.total > cap and result.kept_in_use:
        notify(f"cache holds {format_size(result.total)}, over {format_size(cap)}: {result.kept_in_use} entries in use "
               "by other qedit processes were kept")


def model_lines(root: Path, fingerprint: str) -> list[str]:
    """Where a model's cached files are and how big, per kind."""
    mine = [e for e in entries(root) if e.model == model_key(fingerprint)]
    if not mine:
        return [f"nothing cached for this model in {root}"]
    sizes: dict[str, int] = {}
    for e in mine:
        sizes[e.kind] = sizes.get(e.kind, 0) + e.size
    return [f"cached for {mine[0].label} in {root / mine[0].model}: "
            + ", ".join(f"{kind} {format_size(n)}" for kind, n in sizes.items())
            + " (`qedit cache` lists the cache, `qedit cache clear` removes it)"]

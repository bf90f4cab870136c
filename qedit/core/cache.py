"""What qedit caches under $QEDIT_CACHE (default ~/.cache/qedit): the layout, its entries with their size and
last use, atomic writes by concurrent processes, and eviction under the size cap QEDIT_CACHE_MAX.

    ROOT/MODEL/model.json             the source's label (its file name, or ollama:NAME:TAG), path and sha256
    ROOT/MODEL/CORPUS/                key statistics: tokens.json, cov_layerL.pt, eigh_layerL.pt (qedit.core.stats)
    ROOT/MODEL/targets/               optimised targets, one file per chunk of requests (qedit.edit.target_cache)
    ROOT/MODEL/survival-artifacts/    the demo's survival ladder: quantized files (qedit.cli.demo)

MODEL is the first 20 hex digits of the source's sha256. An entry is one directory below MODEL: what
`qedit cache` lists and what eviction removes, whole.

Last use: a process that reads or writes an entry touches the marker `.use-PID` in it (a directory's mtime
changes only when files come and go); after a run it folds its markers into `.last-use`. A marker of another
live process means the entry is in use, and eviction passes it over.

Concurrent runs: every file is written to a temp file beside it and hard-linked into place, so the first
writer wins and a later one keeps and uses what is there (`CacheEntry.publish`); two cold runs of the same
model thus leave one consistent set of files, and use it. A removed entry is first renamed out of the way
(ROOT/.trash-*), and readers treat a file that vanishes as not cached.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from qedit.core.errors import QeditError
from qedit.core.files import atomic_path, umask_mode
from qedit.core.model import LoadedModel

log = logging.getLogger(__name__)

T = TypeVar("T")
MODEL_FILE = "model.json"
LAST_USE = ".last-use"
USE_PREFIX = ".use-"
TRASH_PREFIX = ".trash-"
SURVIVAL_ARTIFACTS = "survival-artifacts"
KINDS = {"targets": "targets", SURVIVAL_ARTIFACTS: "survival artifacts"}   # any other entry holds statistics
STATISTICS = "statistics"
DEFAULT_MAX = "5GB"
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_AGES = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MODEL_DIR = re.compile(r"[0-9a-f]{20}")
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


def default_cache_dir() -> Path:
    return Path(os.environ.get("QEDIT_CACHE", Path.home() / ".cache" / "qedit"))


def model_key(fingerprint: str) -> str:
    return fingerprint[:20]


@dataclass(frozen=True)
class ModelLabel:
    """How `qedit cache` names a model's directory: its key, the source's label, path and sha256."""

    key: str
    label: str
    source: str
    sha256: str

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelLabel:
        return cls(model_key(loaded.fingerprint), loaded.label or loaded.source.name, str(loaded.source.resolve()),
                   loaded.fingerprint)


@dataclass(frozen=True)
class CacheEntry:
    """One entry directory. `model`: the label recorded beside it when it is created (when its parent is the
    model's directory; None records nothing)."""

    path: Path
    model: ModelLabel | None = None

    def touch(self) -> None:
        """Mark a use of the entry now: its last use, and in use while this process runs."""
        try:
            (self.path / f"{USE_PREFIX}{os.getpid()}").touch()
        except OSError:
            pass   # removed meanwhile, or a read-only cache: nothing to mark

    def create(self) -> None:
        """Make the directory, record the model's label once, and mark the use."""
        self.path.mkdir(parents=True, exist_ok=True)
        label = self.path.parent / MODEL_FILE
        if self.model is not None and self.path.parent.name == self.model.key and not label.is_file():
            with atomic_path(label) as tmp:
                tmp.write_text(json.dumps({"label": self.model.label, "source": self.model.source,
                                           "sha256": self.model.sha256}, indent=1))
        self.touch()

    def load(self, name: str, read: Callable[[Path], T]) -> T | None:
        """The value of the cached file `name`; None when it is not there, or unreadable (it is then computed
        again and replaces it, never trusted). A hit marks the entry's use (and labels an older qedit's entry)."""
        path = self.path / name
        try:
            value = read(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            log.warning("%s: unreadable cached file (%s); computing it again", path, exc)
            return None
        try:
            self.create()
        except (OSError, QeditError):
            pass                                # a read-only cache: nothing to mark
        return value

    def publish(self, name: str, write: Callable[[Path], None], read: Callable[[Path], T]) -> T | None:
        """Store the value `write` writes as `name`, unless a readable file is there already (another process
        computed it first). Returns that file's value, which the caller uses instead of its own so that every run
        on this cache uses what it holds; None when this process's value is stored, or could not be (the cache
        is best effort: a failure to write only warns)."""
        target = self.path / name
        try:
            self.create()
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)
            os.close(fd)
        except (OSError, QeditError) as exc:
            log.warning("%s: could not write to the cache (%s); continuing without it", target, exc)
            return None
        tmp = Path(tmp_name)
        try:
            write(tmp)
            os.chmod(tmp, umask_mode())
            for _ in range(3):
                if _place(tmp, target):
                    return None
                try:
                    return read(target)
                except FileNotFoundError:
                    continue                    # removed meanwhile: place this one
                except Exception as exc:        # damaged: this process's file replaces it
                    log.warning("%s: unreadable cached file (%s); writing it again", target, exc)
                    os.replace(tmp, target)
                    return None
            return None
        except OSError as exc:
            log.warning("%s: could not write to the cache (%s); continuing without it", target, exc)
            return None
        finally:
            tmp.unlink(missing_ok=True)


def _place(tmp: Path, target: Path) -> bool:
    """Put `tmp` at `target` unless a file is there; True when placed."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    if target.exists():                         # a file system without hard links: the same, minus the guarantee
        return False
    os.replace(tmp, target)
    return True


def model_entry(root: Path, loaded: LoadedModel, name: str) -> CacheEntry:
    """The entry `name` of `loaded`'s directory under `root`."""
    return CacheEntry(root / model_key(loaded.fingerprint) / name, ModelLabel.of(loaded))


@dataclass(frozen=True)
class Entry:
    """A cached entry as `qedit cache` lists it."""

    path: Path
    model: str            # the model's directory name ('' for a directory of an older qedit shared by all models)
    label: str
    kind: str             # statistics, targets or survival artifacts
    detail: str           # the corpus of statistics
    size: int
    last_use: float       # seconds since the epoch
    in_use: bool          # by another qedit process that is running


def entries(root: Path) -> list[Entry]:
    """Every entry under `root`, in directory order."""
    out: list[Entry] = []
    for top in _subdirs(root):
        if top.name in KINDS:   # an older qedit kept the demo's artifacts here, shared by every model
            out.append(_entry(top, "", "(older qedit, any model)"))
            continue
        if not _MODEL_DIR.fullmatch(top.name):
            continue            # not qedit's: never listed, never removed
        try:
            label = str(json.loads((top / MODEL_FILE).read_text())["label"])
        except (OSError, ValueError, KeyError, TypeError):
            label = f"sha256 {top.name}..."
        out.extend(_entry(sub, top.name, label) for sub in _subdirs(top))
    return out


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _entry(path: Path, model: str, label: str) -> Entry:
    size, newest, marks, in_use = 0, 0.0, 0.0, False
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue                        # removed meanwhile
            size += st.st_size
            newest = max(newest, st.st_mtime)
            if dirpath == str(path) and (name == LAST_USE or name.startswith(USE_PREFIX)):
                marks = max(marks, st.st_mtime)
                in_use = in_use or _held_by_other(name)
    kind = KINDS.get(path.name, STATISTICS)
    return Entry(path, model, label, kind, path.name if kind == STATISTICS else "", size, marks or newest, in_use)


def _held_by_other(marker: str) -> bool:
    pid = _marker_pid(marker)
    return pid is not None and pid != os.getpid() and _alive(pid)


def _marker_pid(marker: str) -> int | None:
    suffix = marker[len(USE_PREFIX):] if marker.startswith(USE_PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                             # another user's process
    except OSError:
        return False
    return True


def release(root: Path) -> None:
    """After a run: fold this process's use markers, and those of processes that are gone, into `.last-use`."""
    for entry in entries(root):
        for marker in entry.path.glob(f"{USE_PREFIX}*"):
            pid = _marker_pid(marker.name)
            if pid is not None and pid != os.getpid() and _alive(pid):
                continue
            try:
                when = marker.stat().st_mtime
                last = entry.path / LAST_USE
                if not last.exists() or last.stat().st_mtime < when:
                    last.touch()
                    os.utime(last, (when, when))
                marker.unlink(missing_ok=True)
            except OSError:
                continue                        # folded by another process, or the entry was removed


def remove(root: Path, chosen: Iterable[Entry]) -> int:
    """Remove entries (renamed out of the way first, then deleted); a model's directory goes with its last
    entry. Returns the bytes freed."""
    freed = 0
    for entry in chosen:
        trash = root / f"{TRASH_PREFIX}{os.getpid()}-{time.time_ns()}"
        try:
            os.rename(entry.path, trash)
        except FileNotFoundError:
            continue                            # removed by another process
        shutil.rmtree(trash, ignore_errors=True)
        freed += entry.size
        if entry.model and not _subdirs(entry.path.parent):
            (entry.path.parent / MODEL_FILE).unlink(missing_ok=True)
            try:
                entry.path.parent.rmdir()
            except OSError:
                pass                            # a new entry appeared meanwhile
    for stale in root.glob(f"{TRASH_PREFIX}*"):   # left by a process that died while deleting
        pid = stale.name[len(TRASH_PREFIX):].split("-")[0]
        if not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    return freed


@dataclass
class Eviction:
    evicted: list[Entry]
    total: int            # bytes left
    kept_in_use: int      # entries over the cap kept because another process uses them


def evict(root: Path, cap: int) -> Eviction:
    """Remove the least recently used entries until the cache holds at most `cap` bytes (after `release`)."""
    release(root)
    listed = sorted(entries(root), key=lambda e: e.last_use)
    total = sum(e.size for e in listed)
    evicted, kept = [], 0
    for entry in listed:
        if total <= cap:
            break
        if entry.in_use:
            kept += 1
            continue
        remove(root, [entry])
        total -= entry.size
        evicted.append(entry)
    return Eviction(evicted, total, kept)


def parse_size(text: str) -> int:
    """500M, 5G, 5GB (powers of 1000), 5GiB (powers of 1024), or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if match is None:
        raise QeditError(f"{text!r} is not a size; give e.g. 500M, 5G, 5GB or 5GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def cache_max() -> int:
    """The size cap: $QEDIT_CACHE_MAX, default 5 GB."""
    text = os.environ.get("QEDIT_CACHE_MAX", "").strip() or DEFAULT_MAX
    try:
        return parse_size(text)
    except QeditError as exc:
        raise QeditError(f"QEDIT_CACHE_MAX={text!r}: {exc}") from None


def parse_age(text: str) -> float:
    """30s, 30m, 12h, 7d or 2w, in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text, re.IGNORECASE)
    if match is None:
        raise QeditError(f"{text!r} is not an age; give e.g. 30m, 12h, 7d or 2w")
    return float(match.group(1)) * _AGES[match.group(2).lower()]


def format_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_age(when: float, now: float | None = None) -> str:
    seconds = max(0.0, (time.time() if now is None else now) - when)
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''} ago"
    return "just now"

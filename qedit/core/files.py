"""Atomic output: write to a temp file beside the target, then rename over it."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qedit.core.errors import QeditError


def refuse_same_file(output: Path, *inputs: Path) -> None:
    """Raise when `output` would overwrite one of `inputs`."""
    out = output.resolve()
    for src in inputs:
        if src.exists() and (out == src.resolve() or (out.exists() and os.path.samefile(out, src))):
            raise QeditError(f"{output}: refusing to write the output over its own input; choose another path")


def umask_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (0o644 / 0o755 for 022).

    tempfile creates 0o600 files and 0o700 directories; outputs renamed into place get this instead.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path in target's directory; on success it replaces `target`, on error it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QeditError(f"{target}: could not write ({exc.strerror or exc}); nothing was written") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_dir(out: Path, source: Path) -> None:
    """An output directory must not be the source, and must be new or empty."""
    refuse_same_file(out, source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QeditError(f"{out}: already exists and is not empty; choose a new output directory")


@contextmanager
def staged_dir(out: Path, source: Path, what: str = "the output") -> Iterator[Path]:
    """A temp directory beside `out`, renamed to `out` on success and removed on failure."""
    check_output_dir(out, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, umask_mode(directory=True))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QeditError(f"{out}: could not write {what} ({exc.strerror or exc}); nothing was written") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Memory budgets: `--max-memory SIZE` parsed, the default budget from the machine's available memory, the
process's resident set (RSS) now and at its peak, and estimates of what a pass over a model needs.

The budget is for the whole process, file-backed pages of memory maps included: `MemoryBudget.room` is what
is left for weights, statistics and activations once the process's resident set at load time (the Python
runtime, torch, the tokenizer) is taken off.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qedit.core.errors import QeditError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": KiB, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": MiB,
          "g": 1000 ** 3, "gb": 1000 ** 3, "gib": GiB, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
PAGE = mmap.PAGESIZE
# room kept for the OS by the default budget: the larger of this and `_OS_SHARE` of the machine's memory
_OS_FLOOR, _OS_SHARE = 2 * GiB, 0.10
_SCORED = 4  # positions per row whose logits a pass computes (the answer's tokens)
# float64 matrices of a covariance's size alive at once in a method's solve, by default (a method registers its
# own count): ROME's shrunk covariance and MEMIT's C + K^T K, each with its Cholesky factor. The edit-aware
# encoding, later, holds one (C + lambda K^T K, factored in place) beside float64 copies of the edited matrix
# (W0 + dW, the running weight, GPTQ's working copy, a dequantized encoding and its residual, float32 copies)
SOLVE_COPIES, EDITED_COPIES = 2, 5


def parse_size(text: str) -> int:
    """'10GiB', '1.5G', '500MB', '64MiB', '123456' -> bytes (G and GB are 10^9, GiB is 2^30)."""
    m = _SIZE.match(str(text))
    unit = m[2].lower() if m else None
    if m is None or unit not in _UNITS:
        raise QeditError(f"memory size {text!r}: expected a number with a unit, e.g. 10GiB, 1.5GB or 512MiB")
    size = int(float(m[1]) * _UNITS[unit])
    if size <= 0:
        raise QeditError(f"memory size {text!r}: must be more than 0 bytes")
    return size


def format_size(n: float) -> str:
    """Bytes as the largest binary unit that keeps a number >= 1: '1.50 GiB', '12.0 MiB'."""
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if abs(n) < 10 * size else f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (KiB if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def default_budget() -> int:
    """MemAvailable minus max(2 GiB, 10% of MemTotal); 0 (no budget enforced) where /proc/meminfo is unreadable."""
    info = _meminfo()
    available, total = info.get("MemAvailable"), info.get("MemTotal")
    if available is None or total is None:
        return 0
    return max(0, available - max(_OS_FLOOR, int(_OS_SHARE * total)))


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


_M_MMAP_THRESHOLD = -3   # glibc's mallopt parameter number
_MMAP_FROM = 1 << 20     # allocations from this size get pages of their own, returned to the OS when freed


def return_freed_memory() -> bool:
    """Have glibc give every allocation of `_MMAP_FROM` bytes or more pages of its own, unmapped when freed.

    By default glibc raises that threshold to the size of the largest block freed (up to 32 MiB), after which
    such blocks come from its heap and stay in the process when freed: the bands and temporaries of a solve
    over a covariance then add up in RSS beyond what is alive, and RSS is what the memory budget bounds. Each
    such allocation then costs a system call and fresh pages: for the process's lifetime, so it is set only for a
    model streamed within a budget. True when set (glibc only; elsewhere nothing changes)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM))
    except (OSError, AttributeError):
        return False


def current_rss() -> int:
    """The process's resident set now (anonymous and file-backed pages), in bytes."""
    rss = _status("VmRSS")
    return rss if rss is not None else peak_rss()


def peak_rss() -> int:
    """The process's largest resident set so far, in bytes."""
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB


@dataclass(frozen=True)
class MemoryBudget:
    """The most memory the process may hold (`total`, bytes; 0 = not enforced) and where it came from."""

    total: int
    explicit: bool = False          # given by --max-memory (else the machine's default)
    # knobs for tests and for keeping memory low: stream a GGUF model's weights even when they fit, and cap the
    # cache of decoded matrices (bytes; None: what the budget leaves)
    stream: bool = False
    cache_limit: int | None = None

    @staticmethod
    def resolve(max_memory: int | str | None) -> "MemoryBudget":
        """An explicit size (bytes or text such as '10GiB'), or the machine's default for None."""
        if max_memory is None:
            return MemoryBudget(default_budget(), explicit=False)
        size = max_memory if isinstance(max_memory, int) else parse_size(max_memory)
        if size <= 0:
            raise QeditError(f"--max-memory must be more than 0 bytes, got {max_memory!r}")
        return MemoryBudget(size, explicit=True)

    @property
    def enforced(self) -> bool:
        return self.total > 0

    def room(self, baseline: int | None = None) -> int:
        """What is left for model work once the process's resident set (`baseline`, default now) is counted."""
        if not self.enforced:
            return 1 << 62
        return self.total - (current_rss() if baseline is None else baseline)

    def describe(self) -> str:
        if not self.enforced:
            return "no memory budget (the available memory is unknown)"
        return f"{format_size(self.total)} ({'--max-memory' if self.explicit else 'the default: available memory less room for the OS'})"


def too_small(label: str, budget: MemoryBudget, needed: int, what: str) -> QeditError:
    """The one-line error of a budget too small for `label`: `needed` bytes in all, for `what`."""
    short = needed - budget.total
    return QeditError(f"{label}: the memory budget of {format_size(budget.total)} is too small by "
                      f"{format_size(short)}: {what} needs at least {format_size(needed)}; raise --max-memory "
                      f"(or free memory) and run again")


def drop_pages(mapped: mmap.mmap | None, offset: int, length: int) -> None:
    """Drop the pages of [offset, offset + length) of a read-only file mapping from the resident set (they stay
    in the page cache, outside the process); a no-op where madvise is unavailable."""
    if mapped is None or length <= 0 or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset // PAGE * PAGE
    end = min(len(mapped), offset + length)
    if end > start:
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from file `fd` at `offset` (pread: no mapping, so nothing stays in the resident set)."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise QeditError(f"unexpected end of file at byte {offset + done}; the file was truncated while read")
        done += n


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder-only model that decide what its passes hold, from its HF config."""

    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    vocab: int
    context: int

    @staticmethod
    def of(config: Any) -> "Shape":
        def get(*names: str, default: int | None = None) -> int:
            for name in names:
                value = getattr(config, name, None)
                if isinstance(value, int) and value > 0:
                    return value
            if default is None:
                raise QeditError(f"model config: none of {', '.join(names)} is set; cannot size the model's passes")
            return default

        d = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        return Shape(d, get("intermediate_size", "n_inner", default=4 * d), heads,
                     get("num_key_value_heads", default=heads), get("head_dim", default=d // heads),
                     get("num_hidden_layers", "n_layer"), get("vocab_size"),
                     get("max_position_embeddings", "n_positions", default=1 << 62))

    def layer_bytes(self, size: int = 4) -> int:
        """Bytes of one decoder layer's matrices (attention and a gated MLP) at `size` bytes per value."""
        attn = self.d_model * (2 * self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        return size * (attn + 3 * self.d_model * self.d_ff)

    def forward_bytes(self, rows: int, tokens: int, layers_kept: int = 0) -> int:
        """float32 bytes a forward pass over `rows` x `tokens` holds at its peak: one layer's working set (the
        MLP's intermediate activations, eager attention's score matrices) plus, for a backward pass, what
        autograd keeps for `layers_kept` layers (their inputs, MLP activations and attention probabilities)."""
        n = rows * tokens
        scores = rows * self.n_heads * tokens * tokens
        qkv = n * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        working = 4 * (n * (6 * self.d_model + 4 * self.d_ff) + qkv + 3 * scores)
        kept = 4 * layers_kept * (n * (8 * self.d_model + 4 * self.d_ff) + 2 * qkv + 2 * scores)
        return working + kept


@dataclass(frozen=True)
class Workload:
    """What an edit holds besides the frozen weights, phase by phase. Held throughout: `edited` matrices in full
    precision (with their dense changes) and `stats_held` bytes per covariance entry of each of `stats_layers` layers
    (its float32 covariance: 4; 0 when the method reads them back one at a time). Then, in turn: the statistics'
    float32 sums of every layer at once; a pass over its largest batch (`rows` x `tokens`, backpropagated when
    `backward`); a float64 solve over a covariance (`solve_copies` matrices of its width, beside the layer's
    covariance when it is not held) or the edit-aware encoding of an edited matrix. A backward pass keeps
    activations only from `first_layer` on: every trainable change sits at an edited layer, so autograd records
    nothing below the lowest one."""

    rows: int = 8
    tokens: int = 64
    backward: bool = True
    stats_layers: int = 1
    edited: int = 1
    first_layer: int = 0
    solve_copies: int = SOLVE_COPIES
    stats_held: int = 4

    def held(self, shape: Shape) -> int:
        # per edited matrix, float32: the pinned weight, and its dense change when the file is written
        return self.stats_held * self.stats_layers * shape.d_ff ** 2 + 2 * 4 * self.edited * shape.d_ff * shape.d_model

    def stats(self, shape: Shape) -> int:
        """The statistics' float32 sums of every layer, beside a forward pass (float64 sums: the plan's choice)."""
        return 4 * self.stats_layers * shape.d_ff ** 2 + shape.forward_bytes(self.rows, self.tokens)

    def passes(self, shape: Shape) -> int:
        kept = max(0, shape.n_layers - self.first_layer) if self.backward else 0
        acts = shape.forward_bytes(self.rows, self.tokens, kept)
        return acts + 4 * 4 * self.rows * _SCORED * shape.vocab   # logits at the scored positions, softmax, grads

    def solve(self, shape: Shape) -> int:
        if not self.stats_layers:
            return 0
        encoding = shape.d_ff ** 2 + EDITED_COPIES * shape.d_ff * shape.d_model     # the edit-aware encoding
        cov = 0 if self.stats_held >= 4 else 4 * shape.d_ff ** 2                    # the layer's, read back
        return max(8 * self.solve_copies * shape.d_ff ** 2 + cov, 8 * encoding)

    def bytes(self, shape: Shape) -> int:
        return self.held(shape) + max(self.stats(shape) if self.stats_layers else 0, self.passes(shape), self.solve(shape))

    def max_tokens(self, shape: Shape, room: int) -> int:
        """The most tokens per row whose workload fits in `room` bytes (0 when none does)."""
        lo, hi = 0, max(1, min(shape.context, 1 << 24))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if dataclasses.replace(self, tokens=mid).bytes(shape) <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo

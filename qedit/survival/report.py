"""Survival report files, rendered from the JSON document of `qedit.survival.metrics.to_json`:
survival.json, survival.csv (one row per rung), cases.csv (one row per case and rung), report.md,
report.html with survival.png (each metric against bits per weight), and the terminal table."""
from __future__ import annotations

import csv
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

from qedit.io_utils import atomic_path

log = logging.getLogger(__name__)

_TABLE = (  # (column title, metric key, format)
    ("bpw", "bits_per_weight", "{:.2f}"), ("efficacy", "efficacy", "{:.3f}"), ("kept", "efficacy_kept", "{:.2f}"),
    ("general.", "generalization", "{:.3f}"), ("locality", "locality", "{:.3f}"), ("margin", "margin", "{:+.2f}"),
    ("margin kept", "margin_kept", "{:.2f}"), ("ppl ratio", "ppl_ratio", "{:.3f}"), ("died", "died", "{:.0f}"),
)
_PLOTTED = ("efficacy", "generalization", "locality", "margin_kept", "ppl_ratio")
_CSV_RUNG = ("rung", "status", "reason", "bits_per_weight", "size_bytes", "efficacy", "efficacy_top1",
             "efficacy_kept", "generalization", "generalization_top1", "generalization_kept", "locality",
             "locality_top1", "margin", "margin_change", "margin_kept", "perplexity", "baseline_perplexity",
             "ppl_ratio", "died")
_CSV_CASE = ("rung", "case_id", "subject", "target_new", "efficacy", "efficacy_top1", "generalization",
             "locality", "margin", "margin_shrink", "died")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _rows(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None, str]]:
    """(rung name, status, metrics, reason) for full precision and every rung."""
    rows = [("fp32 (torch)", "ok", data["full_precision"]["metrics"], "")]
    rows += [(r["name"], r["status"], r["metrics"], r["reason"]) for r in data["rungs"]]
    return rows


def table_lines(data: dict[str, Any]) -> list[str]:
    """The terminal table: one line per rung; skipped rungs say why."""
    head = f"{'rung':<14}" + "".join(f"{title:>12}" for title, _, _ in _TABLE)
    lines = [head, "-" * len(head)]
    for name, status, metrics, reason in _rows(data):
        if metrics is None:
            lines.append(f"{name:<14}  skipped: {reason}")
            continue
        lines.append(f"{name:<14}" + "".join(f"{_fmt(metrics.get(k), f):>12}" for _, k, f in _TABLE))
    died = [(c["subject"], [r for r, v in c["rungs"].items() if v["died"]]) for c in data["cases"]]
    died = [(s, rs) for s, rs in died if rs]
    if died:
        lines.append("edits that died (efficacy lost against full precision):")
        lines += [f"  {s}: at {', '.join(rs)}" for s, rs in died]
    for g in data.get("gates", []):
        lines.append(f"require {g['requirement']}: {'PASS' if g['passed'] else 'FAIL'} "
                     f"(measured {_fmt(g['actual'], '{:.3f}')}){' ' + g['reason'] if g['reason'] else ''}")
    return lines


def _markdown(data: dict[str, Any]) -> str:
    out = [f"# qedit survival report: {data['method']} on {Path(data['source']).name}", "",
           f"{data['n_cases']} edits, |dW| = {data['delta_norm']:.3f}; source sha256 {data['source_sha256'][:16]}; "
           + ", ".join(f"{k} {v}" for k, v in data["versions"].items()), "",
           ("Locality compares with the unedited model at the same rung; *kept* is the share of the full-precision "
            "value; *margin kept* is the share of the edit's margin change (edited minus unedited) that is left; "
            "*ppl ratio* is the perplexity of a fixed text, edited over unedited, at the same rung."), "",
           "| rung | " + " | ".join(t for t, _, _ in _TABLE) + " |", "|---" * (len(_TABLE) + 1) + "|"]
    for name, _status, metrics, reason in _rows(data):
        if metrics is None:
            out.append(f"| {name} | skipped: {reason} |" + " |" * (len(_TABLE) - 1))
        else:
            out.append(f"| {name} | " + " | ".join(_fmt(metrics.get(k), f) for _, k, f in _TABLE) + " |")
    rung_names = [r["name"] for r in data["rungs"] if r["status"] == "ok"]
    out += ["", "## Per case: margin log P(new) - log P(true) (nats); x = the edit died there", "",
            "| case | subject | fp32 | " + " | ".join(rung_names) + " |", "|---" * (len(rung_names) + 3) + "|"]
    for c in data["cases"]:
        cells = []
        for name in rung_names:
            v = c["rungs"].get(name, {})
            cells.append(_fmt(v.get("margin"), "{:+.2f}") + (" x" if v.get("died") else ""))
        out.append(f"| {c['case_id'] or '-'} | {c['subject']} | {_fmt(c['fp32']['margin'], '{:+.2f}')} | "
                   + " | ".join(cells) + " |")
    if data.get("gates"):
        out += ["", "## Gates", ""] + [f"- {g['requirement']}: {'PASS' if g['passed'] else 'FAIL'} "
                                       f"(measured {_fmt(g['actual'], '{:.3f}')}) {g['reason']}" for g in data["gates"]]
    return "\n".join(out) + "\n"


def _csv_text(header: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _rung_csv(data: dict[str, Any]) -> str:
    rows = []
    for name, status, metrics, reason in _rows(data):
        row = dict(metrics or {}, rung=name, status=status, reason=reason)
        size = next((r["size_bytes"] for r in data["rungs"] if r["name"] == name), None)
        rows.append(dict(row, size_bytes=size))
    return _csv_text(_CSV_RUNG, rows)


def _case_csv(data: dict[str, Any]) -> str:
    rows = []
    for c in data["cases"]:
        base = {"case_id": c["case_id"], "subject": c["subject"], "target_new": c["target_new"]}
        rows.append(dict(base, rung="fp32", **c["fp32"]))
        rows += [dict(base, rung=name, **v) for name, v in c["rungs"].items()]
    return _csv_text(_CSV_CASE, rows)


def plot(data: dict[str, Any], path: Path) -> bool:
    """survival.png: each metric against bits per weight. False (and a log line) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'qedit[plot]'): no survival plot")
        return False
    rungs = [r for r in data["rungs"] if r["status"] == "ok" and r["bits_per_weight"]]
    fig, axes = plt.subplots(1, len(_PLOTTED), figsize=(4 * len(_PLOTTED), 3.6))
    for ax, key in zip(axes, _PLOTTED):
        for kind, marker in (("gguf", "o-"), ("gguf-lora", "s"), ("gptq", "^-"), ("bitsandbytes", "D-")):
            pts = sorted((r["bits_per_weight"], r["metrics"][key], r["name"]) for r in rungs
                         if r["kind"] == kind and r["metrics"].get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=kind)
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=7, xytext=(2, 3), textcoords="offset points")
        ref = data["full_precision"]["metrics"].get(key)
        if ref is not None and key not in ("margin_kept",):
            ax.axhline(ref, color="gray", linestyle="--", linewidth=1, label="fp32")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xlabel("bits per weight")
        ax.set_title(key)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def _html(data: dict[str, Any], has_plot: bool) -> str:
    import re

    body = []
    for line in _markdown(data).splitlines():
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    text = "\n".join(body)
    text = re.sub(r"((?:<tr>.*</tr>\n?)+)", r"<table border='1' cellspacing='0' cellpadding='3'>\n\1</table>\n", text)
    img = "<p><img src='survival.png' alt='metrics against bits per weight'></p>" if has_plot else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>qedit survival</title></head>"
            f"<body>{img}\n{text}</body></html>\n")


def write_reports(out_dir: Path, data: dict[str, Any]) -> list[Path]:
    """Write every report file into `out_dir` (each atomically); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    has_plot = plot(data, out_dir / "survival.png")
    if has_plot:
        written.append(out_dir / "survival.png")
    files = {
        "survival.json": json.dumps(data, indent=2, default=str),
        "survival.csv": _rung_csv(data),
        "cases.csv": _case_csv(data),
        "report.md": _markdown(data),
        "report.html": _html(data, has_plot),
    }
    for name, text in files.items():
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    return written

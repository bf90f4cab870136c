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

from qedit.core.files import atomic_path

log = logging.getLogger(__name__)

_TABLE = (  # (column title, metric key, format)
    ("bpw", "bits_per_weight", "{:.2f}"), ("efficacy", "efficacy", "{:.3f}"), ("kept", "efficacy_kept", "{:.2f}"),
    ("general.", "generalization", "{:.3f}"), ("locality", "locality", "{:.3f}"), ("margin", "margin", "{:+.2f}"),
    ("margin kept", "margin_kept", "{:.2f}"), ("ppl ratio", "ppl_ratio", "{:.3f}"), ("died", "died", "{:.0f}"),
)
_FORGET_TABLE = (
    ("bpw", "bits_per_weight", "{:.2f}"), ("P(answer)", "forget_prob", "{:.4f}"),
    ("recovery", "recovery_rate", "{:.3f}"), ("vs fp32", "recovery_change", "{:+.3f}"),
    ("recovered", "recovered", "{:.0f}"), ("retain acc", "retain_acc", "{:.3f}"),
    ("unedited", "baseline_retain_acc", "{:.3f}"), ("retain chg", "retain_acc_change", "{:+.3f}"),
    ("held-out acc", "heldout_acc", "{:.3f}"), ("held-out chg", "heldout_acc_change", "{:+.3f}"),
    ("ppl ratio", "ppl_ratio", "{:.3f}"),
)
_PLOTTED = {"edit": ("efficacy", "generalization", "locality", "margin_kept", "ppl_ratio"),
            "forget": ("recovery_rate", "forget_prob", "retain_acc", "ppl_ratio")}
_CSV_RUNG = ("rung", "status", "reason", "bits_per_weight", "size_bytes", "efficacy", "efficacy_top1",
             "efficacy_kept", "generalization", "generalization_top1", "generalization_kept", "locality",
             "locality_top1", "margin", "margin_change", "margin_kept", "perplexity", "baseline_perplexity",
             "ppl_ratio", "died")
_CSV_FORGET_RUNG = ("rung", "status", "reason", "bits_per_weight", "size_bytes", "forget_prob", "forget_prob_first",
                    "recovery_rate", "recovery_change", "recovered", "forgotten", "retain_acc", "baseline_retain_acc",
                    "retain_acc_change", "retain_kept", "heldout_acc", "baseline_heldout_acc", "heldout_acc_change",
                    "perplexity", "baseline_perplexity", "ppl_ratio")
_CSV_CASE = ("rung", "case_id", "subject", "target_new", "efficacy", "efficacy_top1", "generalization",
             "locality", "margin", "margin_shrink", "died")
_CSV_FORGET_CASE = ("rung", "case_id", "name", "answer", "prob", "prob_first", "known", "recovered")


def _forget(data: dict[str, Any]) -> bool:
    return data.get("mode") == "forget"


def _table(data: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    return _FORGET_TABLE if _forget(data) else _TABLE


def _flagged(data: dict[str, Any]) -> tuple[str, list[tuple[str, list[str]]]]:
    """(title, [(case name, rungs)]): the edits that died, or the forgotten facts that came back."""
    if _forget(data):
        flag, name, title = "recovered", "name", "facts quantization brought back (forgotten at fp32, top-1 again):"
    else:
        flag, name, title = "died", "subject", "edits that died (efficacy lost against full precision):"
    rows = [(c[name], [r for r, v in c["rungs"].items() if v[flag]]) for c in data["cases"]]
    return title, [(n, rs) for n, rs in rows if rs]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _rows(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None, str]]:
    """(rung name, status, metrics, reason) for full precision and every rung."""
    rows = [("fp32 (torch)", "ok", data["full_precision"]["metrics"], "")]
    rows += [(r["name"], r["status"], r["metrics"], r["reason"]) for r in data["rungs"]]
    return rows


def table_lines(data: dict[str, Any]) -> list[str]:
    """The terminal table: one line per rung; skipped rungs say why."""
    table = _table(data)
    head = f"{'rung':<14}" + "".join(f"{title:>12}" for title, _, _ in table)
    lines = [head, "-" * len(head)]
    for name, status, metrics, reason in _rows(data):
        if metrics is None:
            lines.append(f"{name:<14}  skipped: {reason}")
            continue
        lines.append(f"{name:<14}" + "".join(f"{_fmt(metrics.get(k), f):>12}" for _, k, f in table))
    title, flagged = _flagged(data)
    if flagged:
        lines.append(title)
        lines += [f"  {s}: at {', '.join(rs)}" for s, rs in flagged]
    for g in data.get("gates", []):
        lines.append(f"require {g['requirement']}: {'PASS' if g['passed'] else 'FAIL'} "
                     f"(measured {_fmt(g['actual'], '{:.3f}')}){' ' + g['reason'] if g['reason'] else ''}")
    return lines


def _markdown(data: dict[str, Any]) -> str:
    table = _table(data)
    if _forget(data):
        what = f"{data['n_cases']} facts to forget"
        note = ("*P(answer)* is the mean probability of the erased answers; *recovery* the share of facts whose "
                "answer is top-1 (the knowledge is there), *vs fp32* its change against full precision and "
                "*recovered* how many facts forgotten at fp32 came back; retain accuracy is compared with the "
                "unedited model at the same rung; *ppl ratio* is the perplexity of a fixed text, edited over unedited.")
    else:
        what = f"{data['n_cases']} edits"
        note = ("Locality compares with the unedited model at the same rung; *kept* is the share of the full-precision "
                "value; *margin kept* is the share of the edit's margin change (edited minus unedited) that is left; "
                "*ppl ratio* is the perplexity of a fixed text, edited over unedited, at the same rung.")
    out = [f"# qedit survival report: {data['method']} on {Path(data['source']).name}", "",
           f"{what}, |dW| = {data['delta_norm']:.3f}; source sha256 {data['source_sha256'][:16]}; "
           + ", ".join(f"{k} {v}" for k, v in data["versions"].items()), "", note, "",
           "| rung | " + " | ".join(t for t, _, _ in table) + " |", "|---" * (len(table) + 1) + "|"]
    for name, _status, metrics, reason in _rows(data):
        if metrics is None:
            out.append(f"| {name} | skipped: {reason} |" + " |" * (len(table) - 1))
        else:
            out.append(f"| {name} | " + " | ".join(_fmt(metrics.get(k), f) for _, k, f in table) + " |")
    on_rung = [f"{r['name']} (|dW| = {r['delta_norm']:.3f})" for r in data["rungs"]
               if r.get("computed_on") == "rung" and r["status"] == "ok" and r.get("delta_norm") is not None]
    if on_rung:
        out += ["", "Quantization-aware: at " + ", ".join(on_rung) + " the edit was computed on the rung's unedited "
                "file and patched onto it edit-aware; the other rungs measure the full-precision edit."]
    rung_names = [r["name"] for r in data["rungs"] if r["status"] == "ok"]
    out += _case_section(data, rung_names)
    if data.get("gates"):
        out += ["", "## Gates", ""] + [f"- {g['requirement']}: {'PASS' if g['passed'] else 'FAIL'} "
                                       f"(measured {_fmt(g['actual'], '{:.3f}')}) {g['reason']}" for g in data["gates"]]
    return "\n".join(out) + "\n"


def _case_section(data: dict[str, Any], rung_names: list[str]) -> list[str]:
    forget = _forget(data)
    if forget:
        title, key, fmt, flag, label = ("P(answer) per fact; x = forgotten at fp32 and back at that rung",
                                        "prob", "{:.4f}", "recovered", "name")
    else:
        title, key, fmt, flag, label = ("margin log P(new) - log P(true) (nats); x = the edit died there",
                                        "margin", "{:+.2f}", "died", "subject")
    out = ["", f"## Per case: {title}", "",
           f"| case | {label} | fp32 | " + " | ".join(rung_names) + " |", "|---" * (len(rung_names) + 3) + "|"]
    for c in data["cases"]:
        cells = []
        for name in rung_names:
            v = c["rungs"].get(name, {})
            cells.append(_fmt(v.get(key), fmt) + (" x" if v.get(flag) else ""))
        out.append(f"| {c['case_id'] or '-'} | {c[label]} | {_fmt(c['fp32'][key], fmt)} | " + " | ".join(cells) + " |")
    return out


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
    return _csv_text(_CSV_FORGET_RUNG if _forget(data) else _CSV_RUNG, rows)


def _case_csv(data: dict[str, Any]) -> str:
    rows = []
    forget = _forget(data)
    for c in data["cases"]:
        base = {"case_id": c["case_id"], "name": c["name"], "answer": c["answer"]} if forget else \
            {"case_id": c["case_id"], "subject": c["subject"], "target_new": c["target_new"]}
        rows.append(dict(base, rung="fp32", **c["fp32"]))
        rows += [dict(base, rung=name, **v) for name, v in c["rungs"].items()]
    return _csv_text(_CSV_FORGET_CASE if forget else _CSV_CASE, rows)


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
    plotted = _PLOTTED["forget" if _forget(data) else "edit"]
    fig, axes = plt.subplots(1, len(plotted), figsize=(4 * len(plotted), 3.6))
    for ax, key in zip(axes, plotted):
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

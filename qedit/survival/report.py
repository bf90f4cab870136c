"""Survival report files, rendered from the JSON document of `qedit.survival.metrics.to_json`:
survival.json, survival.csv (one row per rung), cases.csv (one row per case and rung), report.md,
report.html with survival.png (each metric against bits per weight), and the terminal table."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from qedit.core.files import atomic_path
from qedit.survival.report_html import Block, render_html

log = logging.getLogger(__name__)

_TABLE = (  # (column title, metric key, format); "gen": the same measured on the generated answers
    ("bpw", "bits_per_weight", "{:.2f}"), ("efficacy", "efficacy", "{:.3f}"), ("gen", "efficacy_gen", "{:.3f}"),
    ("gap", "efficacy_gen_gap", "{:+.3f}"), ("kept", "efficacy_kept", "{:.2f}"),
    ("general.", "generalization", "{:.3f}"), ("gen", "generalization_gen", "{:.3f}"),
    ("locality", "locality", "{:.3f}"), ("gen", "locality_gen", "{:.3f}"), ("margin", "margin", "{:+.2f}"),
    ("m. kept", "margin_kept", "{:.2f}"), ("ppl ratio", "ppl_ratio", "{:.3f}"), ("died", "died", "{:.0f}"),
)
_CHAT_TABLE = (("chat", "chat_efficacy_gen", "{:.3f}"), ("chat gen.", "chat_generalization_gen", "{:.3f}"))
_FORGET_TABLE = (
    ("bpw", "bits_per_weight", "{:.2f}"), ("P(answer)", "forget_prob", "{:.4f}"),
    ("recovery", "recovery_rate", "{:.3f}"), ("vs fp32", "recovery_change", "{:+.3f}"),
    ("recovered", "recovered", "{:.0f}"), ("retain acc", "retain_acc", "{:.3f}"),
    ("unedited", "baseline_retain_acc", "{:.3f}"), ("retain chg", "retain_acc_change", "{:+.3f}"),
    ("held-out acc", "heldout_acc", "{:.3f}"), ("held-out chg", "heldout_acc_change", "{:+.3f}"),
    ("truth ratio", "truth_ratio", "{:.3f}"), ("< wrong", "below_wrong", "{:.3f}"),
    ("para < wrong", "para_below_wrong", "{:.3f}"), ("leak", "sampled_leak", "{:.3f}"),
    ("ppl ratio", "ppl_ratio", "{:.3f}"),
)
# Plot panels (title, metrics): a second metric is drawn dashed (the generated-answer variant of the first).
_PLOTTED = {"edit": (("efficacy", ("efficacy", "efficacy_gen")),
                     ("generalization", ("generalization", "generalization_gen")),
                     ("locality", ("locality", "locality_gen")), ("margin kept", ("margin_kept",)),
                     ("ppl ratio", ("ppl_ratio",)),
                     ("efficacy gap: teacher-forced - generated", ("efficacy_gen_gap",))),
            "chat": (("chat efficacy (generated reply)", ("chat_efficacy_gen",)),),
            "forget": tuple((k, (k,)) for k in ("recovery_rate", "forget_prob", "retain_acc", "ppl_ratio", "below_wrong",
                                                "para_below_wrong", "sampled_leak"))}
_CSV_RUNG = ("rung", "status", "reason", "bits_per_weight", "size_bytes", "efficacy", "efficacy_top1",
             "efficacy_gen", "efficacy_gen_gap", "efficacy_kept", "generalization", "generalization_top1",
             "generalization_gen", "generalization_kept", "locality", "locality_top1", "locality_gen", "margin",
             "margin_change", "margin_kept", "perplexity", "baseline_perplexity", "ppl_ratio", "died",
             "chat_efficacy_gen", "chat_generalization_gen")
_CSV_FORGET_RUNG = ("rung", "status", "reason", "bits_per_weight", "size_bytes", "forget_prob", "forget_prob_first",
                    "recovery_rate", "recovery_change", "recovered", "forgotten", "retain_acc", "baseline_retain_acc",
                    "retain_acc_change", "retain_kept", "heldout_acc", "baseline_heldout_acc", "heldout_acc_change",
                    "truth_ratio", "truth_ratio_change", "below_wrong", "below_wrong_change", "para_truth_ratio",
                    "para_below_wrong", "para_below_wrong_change", "sampled_leak", "sampled_leak_change",
                    "perplexity", "baseline_perplexity", "ppl_ratio")
_CSV_CASE = ("rung", "case_id", "subject", "target_new", "efficacy", "efficacy_top1", "efficacy_gen", "generalization",
             "generalization_gen", "locality", "locality_gen", "margin", "margin_shrink", "died", "continuation",
             "chat_efficacy_gen", "chat_generalization_gen", "chat_reply")
_CSV_FORGET_CASE = ("rung", "case_id", "name", "answer", "wrong", "prob", "prob_first", "known", "recovered",
                    "truth_ratio", "below_wrong", "para_below_wrong", "leaks")


def _forget(data: dict[str, Any]) -> bool:
    return data.get("mode") == "forget"


def _chat(data: dict[str, Any]) -> bool:
    return bool(data.get("chat"))


def _table(data: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    return _FORGET_TABLE if _forget(data) else _TABLE + (_CHAT_TABLE if _chat(data) else ())


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
    widths = [max(len(title), 6) + 2 for title, _, _ in table]
    head = f"{'rung':<14}" + "".join(f"{title:>{w}}" for (title, _, _), w in zip(table, widths))
    lines = [head, "-" * len(head)]
    for name, status, metrics, reason in _rows(data):
        if metrics is None:
            lines.append(f"{name:<14}  skipped: {reason}")
            continue
        lines.append(f"{name:<14}" + "".join(f"{_fmt(metrics.get(k), f):>{w}}" for (_, k, f), w in zip(table, widths)))
    if not _forget(data):
        lines.append("gen: measured on the greedy generated answers; gap: efficacy - generated efficacy"
                     + ("; chat: the reply to the fact asked as a one-turn chat starts with the new answer"
                        if _chat(data) else ""))
    title, flagged = _flagged(data)
    if flagged:
        lines.append(title)
        lines += [f"  {s}: at {', '.join(rs)}" for s, rs in flagged]
    for g in data.get("gates", []):
        lines.append(f"require {g['requirement']}: {'PASS' if g['passed'] else 'FAIL'} "
                     f"(measured {_fmt(g['actual'], '{:.3f}')}){' ' + g['reason'] if g['reason'] else ''}")
    return lines


def document(data: dict[str, Any]) -> list[Block]:
    """The report as blocks, which report.md and report.html render: title, what was measured, the rung table,
    the plot, then per case the margins (or forget probabilities), the generated answers and the gates."""
    table = _table(data)
    if _forget(data):
        what = f"{data['n_cases']} facts to forget"
        note = ("*P(answer)* is the mean probability of the erased answers; *recovery* the share of facts whose "
                "answer is top-1 (the knowledge is there), *vs fp32* its change against full precision and "
                "*recovered* how many facts forgotten at fp32 came back; retain accuracy is compared with the "
                "unedited model at the same rung; *truth ratio* is the mean of P(answer) / (P(answer) + P(wrong)) with "
                "the fact's wrong answer (its target_new, or another answer of its relation_id), *< wrong* the share "
                "of facts whose answer is less likely than the wrong one, *para < wrong* the same on the paraphrase "
                "prompts, *leak* the share of facts whose answer starts at least one of 20 continuations sampled at "
                "temperature 1 (fixed seed) in the rung's runtime; *ppl ratio* is the perplexity of a fixed text, "
                "edited over unedited.")
    else:
        what = f"{data['n_cases']} edits"
        note = ("Locality compares with the unedited model at the same rung; *gen* is the metric on the left measured "
                "on the model's greedy generated answer (efficacy: it starts with the new answer; locality: it is the "
                "unedited model's answer, word for word) and *gap* is efficacy minus generated efficacy; *kept* is "
                "the share of the full-precision value; *m. kept* is the share of the edit's margin change (edited "
                "minus unedited) that is left; *ppl ratio* is the perplexity of a fixed text, edited over unedited, "
                "at the same rung." + (" *chat*: the greedy reply to the fact asked as a one-turn chat (the model's "
                                       "template, in the rung's runtime) starts with the new answer; *chat gen.*: "
                                       "the same on the chat paraphrases." if _chat(data) else ""))
    rows = []
    for name, _status, metrics, reason in _rows(data):
        rows.append([name, f"skipped: {reason}"] if metrics is None
                    else [name] + [_fmt(metrics.get(k), f) for _, k, f in table])
    out: list[Block] = [
        ("h1", f"qedit survival report: {data['method']} on {Path(data['source']).name}"),
        ("p", f"{what}, |dW| = {data['delta_norm']:.3f}; source sha256 {data['source_sha256'][:16]}; "
              + ", ".join(f"{k} {v}" for k, v in data["versions"].items())),
        ("p", note), ("table", ["rung"] + [t for t, _, _ in table], rows)]
    on_rung = [f"{r['name']} (|dW| = {r['delta_norm']:.3f})" for r in data["rungs"]
               if r.get("computed_on") == "rung" and r["status"] == "ok" and r.get("delta_norm") is not None]
    if on_rung:
        out.append(("p", "Quantization-aware: at " + ", ".join(on_rung) + " the edit was computed on the rung's "
                         "unedited file and patched onto it edit-aware; the other rungs measure the full-precision "
                         "edit."))
    out.append(("plot", "survival.png"))
    rung_names = [r["name"] for r in data["rungs"] if r["status"] == "ok"]
    out += _case_section(data, rung_names)
    if _forget(data):
        out += _probe_section(data, rung_names)
    else:
        out += _answer_section(data, rung_names)
    if _chat(data):
        out += _answer_section(data, rung_names, "chat_reply", "chat_efficacy_gen",
                               "Per case: the reply to the fact asked as a chat (greedy); ✓ = it starts with the new "
                               "answer")
    if data.get("gates"):
        out += [("h2", "Gates"), ("list", [f"{g['requirement']}: {'PASS' if g['passed'] else 'FAIL'} (measured "
                                           f"{_fmt(g['actual'], '{:.3f}')}) {g['reason']}" for g in data["gates"]])]
    return out


def _case_section(data: dict[str, Any], rung_names: list[str]) -> list[Block]:
    forget = _forget(data)
    if forget:
        title, key, fmt, flag, label = ("P(answer) per fact; x = forgotten at fp32 and back at that rung",
                                        "prob", "{:.4f}", "recovered", "name")
    else:
        title, key, fmt, flag, label = ("margin log P(new) - log P(true) (nats); x = the edit died there",
                                        "margin", "{:+.2f}", "died", "subject")
    rows = []
    for i, c in enumerate(data["cases"], 1):
        cells = []
        for name in rung_names:
            v = c["rungs"].get(name, {})
            cells.append(_fmt(v.get(key), fmt) + (" x" if v.get(flag) else ""))
        rows.append([c["case_id"] or f"#{i}", c[label], _fmt(c["fp32"][key], fmt)] + cells)
    return [("h2", f"Per case: {title}"), ("table", ["case", label, "fp32"] + rung_names, rows)]


def _probe_section(data: dict[str, Any], rung_names: list[str]) -> list[Block]:
    """Per fact: its truth ratio against its wrong answer and how many sampled continuations said the answer."""
    def cell(v: dict[str, Any]) -> str:
        leaks = v.get("leaks")
        return _fmt(v.get("truth_ratio"), "{:.3f}") + ("" if leaks is None else f" ({leaks} said)")

    if not any(c["fp32"].get("truth_ratio") is not None or c["fp32"].get("leaks") is not None for c in data["cases"]):
        return []
    rows = [[c["case_id"] or f"#{i}", c["name"], c.get("wrong") or "-", cell(c["fp32"])]
            + [cell(c["rungs"].get(name, {})) for name in rung_names] for i, c in enumerate(data["cases"], 1)]
    return [("h2", "Per fact: truth ratio P(answer) / (P(answer) + P(wrong)), and (in brackets) how many sampled "
                   "continuations started with the answer"),
            ("table", ["case", "name", "wrong answer", "fp32"] + rung_names, rows)]


def _answer_section(data: dict[str, Any], rung_names: list[str], text_key: str = "continuation",
                    flag_key: str = "efficacy_gen",
                    title: str = "Per case: the generated answer to the edit prompt (greedy); ✓ = it starts with the "
                                 "new answer") -> list[Block]:
    """What the edited model generates after each edit prompt (or replies to it asked as a chat), at full
    precision and at every rung."""
    def said(v: dict[str, Any]) -> str:
        text = v.get(text_key)
        if text is None:
            return "-"
        return f"“{text.strip()}”" + ("\u00a0✓" if v.get(flag_key) else "")   # a no-break space

    if not any(c["fp32"].get(text_key) is not None for c in data["cases"]):
        return []
    rows = [[c["case_id"] or f"#{i}", c["subject"], c["target_new"], said(c["fp32"])]
            + [said(c["rungs"].get(name, {})) for name in rung_names] for i, c in enumerate(data["cases"], 1)]
    return [("h2", title), ("table", ["case", "subject", "new answer", "fp32"] + rung_names, rows)]


def _markdown(data: dict[str, Any], has_plot: bool = False) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ⏎ ")

    out: list[str] = []
    for block in document(data):
        kind = block[0]
        if kind in ("h1", "h2"):
            out += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "list":
            out += [f"- {item}" for item in block[1]] + [""]
        elif kind == "plot" and has_plot:
            out += [f"![metrics against bits per weight]({block[1]})", ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            out += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            out += ["| " + " | ".join(cell(c) for c in row) + " |" + " |" * (len(header) - len(row)) for row in rows]
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


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
        base = {"case_id": c["case_id"], "name": c["name"], "answer": c["answer"], "wrong": c.get("wrong")} if forget else \
            {"case_id": c["case_id"], "subject": c["subject"], "target_new": c["target_new"]}
        rows.append(dict(base, rung="fp32", **c["fp32"]))
        rows += [dict(base, rung=name, **v) for name, v in c["rungs"].items()]
    return _csv_text(_CSV_FORGET_CASE if forget else _CSV_CASE, rows)


def plot(data: dict[str, Any], path: Path) -> bool:
    """survival.png: each metric against bits per weight (generated-answer metrics dashed beside their
    teacher-forced ones), three panels a row. False (and a log line) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'qedit[plot]'): no survival plot")
        return False
    rungs = [r for r in data["rungs"] if r["status"] == "ok" and r["bits_per_weight"]]
    panels = _PLOTTED["forget" if _forget(data) else "edit"] + (_PLOTTED["chat"] if _chat(data) else ())
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key, style in zip(keys, ("-", "--")):
            suffix = ", generated" if style == "--" else ""
            for kind, marker in (("gguf", "o"), ("gguf-lora", "s"), ("gptq", "^"), ("bitsandbytes", "D")):
                pts = sorted((r["bits_per_weight"], r["metrics"][key], r["name"]) for r in rungs
                             if r["kind"] == kind and r["metrics"].get(key) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker + (style if kind != "gguf-lora" else ""),
                            label=kind + suffix)
                    for i, (x, y, name) in enumerate(pts):   # neighbours' names alternate above and below
                        ax.annotate(name, (x, y), fontsize=7, xytext=(2, 3 if i % 2 else -9), textcoords="offset points")
            ref = data["full_precision"]["metrics"].get(key)
            if ref is not None and key != "margin_kept":
                ax.axhline(ref, color="gray", linestyle=":" if style == "--" else "--", linewidth=1,
                           label="fp32" + suffix)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xlabel("bits per weight")
        ax.set_title(title, fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


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
        "report.md": _markdown(data, has_plot),
        "report.html": render_html(document(data), has_plot),
    }
    for name, text in files.items():
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    return written

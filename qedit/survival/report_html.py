"""report.html: the survival report's blocks (`qedit.survival.report.document`) as one self-contained page.

The title comes first; the page is at most 1100 px wide and never scrolls sideways (the plot scales down,
a table wider than the page scrolls inside its own box); *emphasis* becomes <em>; numbers are right-aligned;
skipped rungs, edits that died (" x") and failed gates are marked."""
from __future__ import annotations

import html
import re
from typing import Any

Block = tuple[Any, ...]   # ("h1" | "h2" | "p", text), ("list", items), ("plot", file), ("table", header, rows)

CSS = """
*, *::before, *::after { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; background: #fff;
       max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; overflow-wrap: anywhere; }
h1 { font-size: 1.6em; margin: 0 0 .4em; }
h2 { font-size: 1.15em; margin: 1.8em 0 .5em; padding-bottom: .2em; border-bottom: 1px solid #d0d7de; }
p.meta { color: #59636e; font-size: .88em; }
.scroll { max-width: 100%; overflow-x: auto; margin: .6em 0 1em; border: 1px solid #d0d7de; border-radius: 6px; }
table { border-collapse: collapse; font-size: .86em; font-variant-numeric: tabular-nums; min-width: 100%; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e6e9ed; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; white-space: nowrap; position: sticky; top: 0; }
td.num, th.num { text-align: right; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
tr.skipped td { color: #8c959f; font-style: italic; }
td.bad { color: #b42318; font-weight: 600; }
figure { margin: 1em 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #d0d7de; border-radius: 6px; }
figcaption { color: #59636e; font-size: .85em; margin-top: .3em; }
li.pass::marker { color: #1a7f37; } li.fail { color: #b42318; }
"""

_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)( x)?$|^-$")
_EMPHASIS = re.compile(r"\*([^*\s][^*]*?)\*")


def _inline(text: str) -> str:
    """Escaped text with *emphasis* as <em>."""
    return _EMPHASIS.sub(r"<em>\1</em>", html.escape(text))


def _table(header: list[str], rows: list[list[str]]) -> str:
    numeric = [i > 0 and all(_NUMBER.match(r[i]) for r in rows if i < len(r)) for i in range(len(header))]
    head = "".join(f"<th{' class=num' if n else ''}>{html.escape(h)}</th>" for h, n in zip(header, numeric))
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            span = f" colspan={len(header) - i}" if i == len(row) - 1 and len(row) < len(header) else ""
            cls = " ".join(k for k, on in (("num", numeric[i] and not span), ("bad", c.endswith(" x"))) if on)
            cells.append(f"<td{span}{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>"
                         f"{html.escape(c).replace(chr(10), ' ⏎ ')}</td>")
        skipped = len(row) == 2 and len(header) > 2 and row[1].startswith("skipped")
        body.append(f"<tr{' class=skipped' if skipped else ''}>" + "".join(cells) + "</tr>")
    return f"<div class=scroll><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + \
        "\n</tbody></table></div>"


def render_html(blocks: list[Block], has_plot: bool) -> str:
    """The page: blocks in order (the plot where its block stands, when it was drawn)."""
    body, title, paragraphs = [], "qedit survival report", 0
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            title = block[1]
            body.append(f"<h1>{html.escape(block[1])}</h1>")
        elif kind == "h2":
            body.append(f"<h2>{html.escape(block[1])}</h2>")
        elif kind == "p":
            paragraphs += 1
            body.append(f"<p{' class=meta' if paragraphs == 1 else ''}>{_inline(block[1])}</p>")
        elif kind == "list":
            items = [f"<li class={'fail' if ': FAIL' in i else 'pass'}>{_inline(i)}</li>" for i in block[1]]
            body.append("<ul>" + "".join(items) + "</ul>")
        elif kind == "plot" and has_plot:
            body.append(f"<figure><img src='{html.escape(block[1])}' alt='metrics against bits per weight'>"
                        "<figcaption>Each metric against bits per weight; dashed: measured on the generated answers; "
                        "gray: full precision.</figcaption></figure>")
        elif kind == "table":
            body.append(_table(block[1], block[2]))
    return (f"<!doctype html>\n<html lang=en><head><meta charset='utf-8'>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")

"""The survival report's files as a reader sees them: the generated-answer metrics beside the teacher-forced
ones (JSON, CSV, terminal table, report.md), and report.html's structure (title first, emphasis as <em>, no
page wider than the window)."""
from __future__ import annotations

import csv
import re
from html.parser import HTMLParser

from test_survival_unit import _result

from qedit.evaluation.gate import check_requirements, parse_requirement
from qedit.survival.metrics import all_rung_metrics, to_json
from qedit.survival.report import table_lines, write_reports


class _Page(HTMLParser):
    """Tags in order, the text outside <style>, and which <table>s sit inside a scrolling box."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.style: list[str] = []
        self.open: list[tuple[str, dict[str, str | None]]] = []
        self.tables_in_scroll: list[bool] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "table":
            self.tables_in_scroll.append(any(t == "div" and "scroll" in (a.get("class") or "") for t, a in self.open))
        if tag not in ("meta", "img", "br"):
            self.open.append((tag, attrs))

    def handle_endtag(self, tag):
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        inside = [t for t, _ in self.open]
        (self.style if "style" in inside else self.text).append(data)


def test_generated_metrics_in_every_report_file(tmp_path):
    data = to_json(_result())
    q4 = data["rungs"][0]["metrics"]
    assert (q4["efficacy_gen"], q4["efficacy_gen_gap"], q4["generalization_gen"]) == (0.0, 0.5, 0.0)
    fp32_case = data["cases"][0]["fp32"]
    assert (fp32_case["continuation"], fp32_case["efficacy_gen"]) == (" new |\ntown", 1.0)
    write_reports(tmp_path, data)
    rung = list(csv.DictReader((tmp_path / "survival.csv").open()))[1]
    assert (rung["efficacy_gen"], rung["efficacy_gen_gap"], rung["locality_gen"]) == ("0.0", "0.5", "0.5")
    case = list(csv.DictReader((tmp_path / "cases.csv").open()))[0]
    assert (case["efficacy_gen"], case["continuation"]) == ("1.0", " new |\ntown")
    head, _, fp32, q4_line = table_lines(data)[:4]
    assert re.search(r"efficacy +gen +gap", head) and re.search(r"locality +gen", head)
    assert re.search(r"^Q4_K_M +4\.80 +0\.500 +0\.000 +\+0\.500", q4_line), q4_line
    md = (tmp_path / "report.md").read_text()
    assert "| rung | bpw | efficacy | gen | gap |" in md
    assert "| 0 | P0 | new | “new \\| ⏎ town”\u00a0✓ | “old town” |" in md  # answers, escaped for a table
    wanted = ("Q4_K_M:efficacy_gen>=0.5", "Q4_K_M:efficacy_gen_gap<=0.1", "Q4_K_M:locality_gen>=0.5")
    gates = check_requirements([parse_requirement(t, ["Q4_K_M"]) for t in wanted], all_rung_metrics(_result()))
    assert [g.passed for g in gates] == [False, False, True]


def test_html_report_reads_well(tmp_path):
    written = {p.name for p in write_reports(tmp_path, to_json(_result()))}
    text = (tmp_path / "report.html").read_text()
    page = _Page()
    page.feed(text)
    body = page.tags[page.tags.index("body") + 1:]
    assert body[0] == "h1"                                             # the title first, the plot after the table
    if "survival.png" in written:
        assert body.index("img") > body.index("table")
    visible = "".join(page.text)
    assert "qedit survival report: rome on model.gguf" in visible
    assert "*" not in visible and "<em>kept</em>" in text               # markdown emphasis rendered, not literal
    assert page.tables_in_scroll and all(page.tables_in_scroll)        # wide tables scroll in their own box
    css = "".join(page.style).replace(" ", "")
    assert re.search(r"body\{[^}]*max-width:1100px", css)
    assert re.search(r"\.scroll\{[^}]*overflow-x:auto", css) and re.search(r"img\{[^}]*max-width:100%", css)
    assert "class=skipped" in text and 'class="num bad"' in text       # a skipped rung; a death marked

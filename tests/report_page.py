"""Reading a QA report back: its tables, images and links (stdlib html.parser), and the checks
every report must pass. Shared by tests/test_report.py and the browser test in tests/test_e2e.py."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

from pipeline.report.collect import OVERALL


class Page(HTMLParser):
    """Tables (kind, scope, header cells, first-column cells), images and scripts of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[str] = []
        self.scripts = 0
        self.ids: set[str] = set()
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] = []
        self._in_head = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self.tables.append(
                {"kind": a.get("data-kind"), "scope": a.get("data-scope"), "head": [], "rows": []}
            )
        elif tag == "thead":
            self._in_head = True
        elif tag == "tbody":
            self._in_head = False
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "a":
            self.links.append(a.get("href", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self.tables:
            self.tables[-1]["head" if self._in_head else "rows"].append(self._row)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> Page:
    p = Page()
    p.feed(html)
    return p


def check_page(html: str, classifiers: list[str], classes: list[str], tiles: list[str]) -> Page:
    """What every report must satisfy: self-contained, every table with its classifiers and classes."""
    page = parse(html)
    assert page.scripts == 0 and not re.search(r"(src|href)=\"(https?:)?//", html)
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for link in page.links:
        assert link.startswith("#") and link[1:] in page.ids  # the table of contents resolves
    per_class = [t for t in page.tables if t["kind"] == "per-class"]
    assert {t["scope"] for t in per_class} == {OVERALL, *tiles}
    for t in per_class:
        top = [h.split(" (")[0] for h in t["head"][0][2:]]  # after the class and reference columns
        assert top == classifiers, top
        assert [r[0] for r in t["rows"]] == classes
    for t in page.tables:
        if t["kind"] in ("summary", "confidence"):
            assert [r[0] for r in t["rows"]] == classifiers
        if t["kind"] == "areas":
            assert [r[0] for r in t["rows"]][:-1] == classes
            assert all(f"{m} (ha)" in t["head"][0] for m in classifiers)
    return page


def table(page: Page, kind: str, scope: str | None = None) -> dict:
    return next(t for t in page.tables if t["kind"] == kind and (scope is None or t["scope"] == scope))

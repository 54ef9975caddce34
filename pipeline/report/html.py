"""Page assembly: sections with anchors, a table of contents, figures as base64 PNG data URIs.

The page is one file with inline CSS and no script, font or image from anywhere else: it opens
offline, from a mail attachment or an archive, and looks the same in ten years.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from html import escape

CSS = """
:root { --ink: #1d2433; --muted: #5b6475; --line: #d8dce4; --band: #f4f6f9; --accent: #1f5fa8;
        --warn: #a0301c; --warnbg: #fdf0ec; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0 auto; max-width: 1200px; padding: 1.5rem 2rem 4rem; }
h1 { font-size: 1.7rem; margin: 0 0 .2rem; }
h2 { font-size: 1.35rem; border-bottom: 2px solid var(--accent); padding-bottom: .2rem; margin-top: 2.5rem; }
h3 { font-size: 1.1rem; margin-top: 1.8rem; }
h4 { font-size: 1rem; margin-top: 1.3rem; color: var(--muted); }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.subtitle { color: var(--muted); margin: 0 0 1rem; }
nav.toc { background: var(--band); border: 1px solid var(--line); border-radius: 6px; padding: .6rem 1.2rem; }
nav.toc ol { margin: .2rem 0; padding-left: 1.3rem; }
.scroll { overflow-x: auto; margin: .6rem 0 1rem; }
table { border-collapse: collapse; font-size: 12.5px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: .2rem .5rem; text-align: right; white-space: nowrap; }
th { background: var(--band); text-align: center; }
td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.nodata, span.nodata { color: var(--warn); font-style: italic; }
td.few { color: var(--warn); }
tr.total td { font-weight: 600; border-top: 2px solid var(--ink); }
figure { margin: 1rem 0 1.6rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; max-width: 60rem; margin-top: .3rem; }
figcaption b { color: var(--ink); }
p.note { background: var(--band); border-left: 4px solid var(--accent); padding: .4rem .8rem; }
p.note.warn { background: var(--warnbg); border-left-color: var(--warn); }
pre { background: var(--band); border: 1px solid var(--line); padding: .8rem; overflow-x: auto;
      font-size: 12px; max-height: 32rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, caption: str, alt: str) -> str:
    """An embedded PNG with its caption (``caption`` is HTML: callers escape what they insert)."""
    return (
        f'<figure><img src="{data_uri(png)}" alt="{escape(alt)}"><figcaption>{caption}</figcaption></figure>'
    )


def note(text: str, warn: bool = False) -> str:
    """A highlighted paragraph (``text`` is escaped); ``warn`` for missing data."""
    return f'<p class="note{" warn" if warn else ""}">{escape(text)}</p>'


def para(html: str) -> str:
    return f"<p>{html}</p>"


def facts(items: Iterable[tuple[str, str]]) -> str:
    """A two-column list of labelled values (escaped)."""
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    return f'<dl class="facts">{rows}</dl>'


def pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


@dataclass
class Section:
    """A titled part of the page with an anchor; ``body`` holds HTML fragments."""

    anchor: str
    title: str
    body: list[str] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)

    def add(self, *fragments: str) -> Section:
        self.body.extend(fragments)
        return self


def _render(sec: Section, level: int) -> str:
    head = f'<h{level} id="{escape(sec.anchor)}">{escape(sec.title)}</h{level}>'
    kids = "".join(_render(c, min(level + 1, 4)) for c in sec.children)
    return f"<section>{head}{''.join(sec.body)}{kids}</section>"


def _toc(sections: list[Section], depth: int = 2) -> str:
    if not sections or depth == 0:
        return ""
    items = "".join(
        f'<li><a href="#{escape(s.anchor)}">{escape(s.title)}</a>{_toc(s.children, depth - 1)}</li>'
        for s in sections
    )
    return f"<ol>{items}</ol>"


def page(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole HTML document."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{escape(title)}</h1><p class="subtitle">{escape(subtitle)}</p></header>'
        f'<nav class="toc" id="contents"><strong>Contents</strong>{_toc(sections)}</nav>'
        f"<main>{''.join(_render(s, 2) for s in sections)}</main></body></html>\n"
    )

"""A study's report as one self-contained HTML page, for passing around in review.

:func:`write_html_report` turns the ``summary.md`` that
:func:`kdtune.report.write_report` wrote, and the figures it links to, into
``report.html``: the Markdown tables become HTML tables, the figures are
embedded as base64 PNG ``data:`` URIs, the styling is inline. The page loads
nothing from anywhere (no external ``src`` or ``href``) and runs no JavaScript,
so it opens from disk in any browser, offline, and survives being mailed.

Only the Markdown that ``summary.md`` uses is understood: ``#``/``##``
headings, pipe tables with an alignment row, ``![caption](file.png)`` images,
paragraphs with ``inline code``. That keeps this a few dozen lines without a
Markdown dependency; anything else is shown as plain text.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from kdtune.atomic import atomic_path
from kdtune.errors import ResultsError

HTML_FILE = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE = re.compile(r"^!\[(?P<caption>[^\]]*)\]\((?P<target>[^)]+)\)$")
_CODE = re.compile(r"`([^`]+)`")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 70em;
       padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 1px solid #ccc; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; }
th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f2f2f2; padding: .05em .3em; border-radius: 3px; font-size: .92em; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
footer { margin-top: 3em; color: #777; font-size: .85em; }
"""


def _inline(text: str) -> str:
    """Escaped text with ``code`` spans; the Markdown backslash escape of ``|`` undone."""
    parts = _CODE.split(text.replace("\\|", "|"))
    # re.split with one group alternates text and code.
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [cell.strip() for cell in _CELL_SPLIT.split(inner)]


def _table(lines: list[str]) -> str:
    header = _cells(lines[0])
    has_rule = len(lines) > 1 and all(re.fullmatch(r":?-+:?", c) for c in _cells(lines[1]))
    rule = _cells(lines[1]) if has_rule else ["---"] * len(header)
    numeric = [c.endswith(":") and not c.startswith(":") for c in rule]
    body = lines[2:] if has_rule else lines[1:]

    def row(cells: list[str], tag: str) -> str:
        out = []
        for i, cell in enumerate(cells):
            css = ' class="num"' if i < len(numeric) and numeric[i] else ""
            out.append(f"<{tag}{css}>{_inline(cell)}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"

    rows = "\n".join(row(_cells(line), "td") for line in body)
    return f"<table>\n<thead>{row(header, 'th')}</thead>\n<tbody>\n{rows}\n</tbody>\n</table>"


def png_data_uri(path: str | Path) -> str:
    """A ``data:image/png;base64,...`` URI of the PNG file at ``path``; :class:`ResultsError`
    when the file is missing or not a PNG."""
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read the figure for the HTML report ({exc})") from None
    if not payload.startswith(PNG_SIGNATURE):
        raise ResultsError(f"{path}: not a PNG image; the HTML report embeds PNG figures only")
    return "data:image/png;base64," + base64.b64encode(payload).decode("ascii")


def _figure(caption: str, target: str, folder: Path) -> str:
    if "://" in target or target.startswith(("/", "data:")):
        raise ResultsError(f"summary.md links to {target!r}: the HTML report embeds only figures next to it")
    uri = png_data_uri(folder / target)
    alt = html.escape(caption, quote=True)
    return f'<figure><img src="{uri}" alt="{alt}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def markdown_to_html(markdown: str, folder: str | Path) -> str:
    """The body HTML of a ``summary.md`` whose figures lie in ``folder`` (see the module doc)."""
    folder = Path(folder)
    blocks: list[str] = []
    paragraph: list[str] = []
    lines = markdown.splitlines()

    def flush() -> None:
        if paragraph:
            blocks.append("<p>" + _inline(" ".join(paragraph)) + "</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        image = _IMAGE.match(line.strip())
        if not line.strip():
            flush()
        elif line.startswith("## "):
            flush()
            blocks.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("# "):
            flush()
            blocks.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.lstrip().startswith("|"):
            flush()
            table = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                table.append(lines[i])
                i += 1
            blocks.append(_table(table))
            continue
        elif image:
            flush()
            blocks.append(_figure(image["caption"], image["target"], folder))
        else:
            paragraph.append(line.strip())
        i += 1
    flush()
    return "\n".join(blocks)


def write_html_report(summary: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) from the ``summary.md`` at ``summary`` and the
    PNG figures it links to, which must lie beside it (as :func:`kdtune.report.write_report`
    leaves them). Returns the path written (atomically).

    The page is self-contained: figures embedded as ``data:`` URIs, inline CSS,
    no script, no external link. Raises :class:`ResultsError` when the summary or
    a figure it names is missing, or a figure is not a PNG.
    """
    summary = Path(summary)
    try:
        markdown = summary.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultsError(f"{summary}: cannot read the report summary ({exc}); run `kdtune report` first") from None
    body = markdown_to_html(markdown, summary.parent)
    title_match = re.search(r"^# (.+)$", markdown, flags=re.MULTILINE)
    title = _CODE.sub(r"\1", title_match.group(1)) if title_match else "kdtune study"
    from kdtune import __version__

    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n"
        f"<footer>Written by kdtune {html.escape(__version__)} from {html.escape(summary.name)}.</footer>\n"
        "</body>\n</html>\n"
    )
    path = Path(out) if out is not None else summary.with_name(HTML_FILE)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path

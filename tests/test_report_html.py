"""The self-contained HTML report (kdtune report --html), parsed back with html.parser."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest
from click.testing import CliRunner

from kdtune.cli import main
from kdtune.errors import ResultsError
from kdtune.report import write_report
from kdtune.results.report_html import write_html_report
from test_report import params_of, synthetic_study, write_study_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("pareto.png", "accuracy_vs_temperature.png", "learning_curves.png")


class PageParser(HTMLParser):
    """Every tag with its attributes, and the text of every table cell, row by row, table by table."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def written_report(folder: Path) -> dict[str, Path]:
    write_study_json(folder)
    trials, history = synthetic_study()
    return write_report(folder, trials, history)


def test_html_report_is_self_contained_with_embedded_pngs_and_the_summary_tables(tmp_path):
    files = written_report(tmp_path)
    page = write_html_report(files["summary"])
    assert page == tmp_path / "report.html"
    parsed = parse(page)

    # Nothing to fetch and nothing to run.
    tags = [tag for tag, _ in parsed.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags and "object" not in tags
    for tag, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)  # no event handlers
        assert "href" not in attrs, (tag, attrs)
        if "src" in attrs:
            assert tag == "img" and attrs["src"].startswith("data:image/png;base64,"), (tag, attrs["src"][:60])

    # Every figure embedded, byte for byte, and readable as a PNG.
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == len(FIGURES)
    for attrs, name in zip(images, FIGURES):
        payload = base64.b64decode(attrs["src"].split(",", 1)[1], validate=True)
        assert payload.startswith(PNG_SIGNATURE)
        assert payload == (tmp_path / name).read_bytes()
        pixels = matplotlib.image.imread(io.BytesIO(payload), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] >= 400 and pixels[..., :3].std() > 0.02
        assert attrs["alt"]

    # The three tables of summary.md: status counts, Pareto front, best temperature.
    summary = files["summary"].read_text(encoding="utf-8")
    assert len(parsed.tables) == summary.count("\n| :---") + summary.count("\n| ---:") == 3
    status, front, temperature = parsed.tables
    assert status[0] == ["status", "baseline", "search", "total"]
    assert ["completed", "4", "36", "40"] in status and ["stopped_early", "0", "12", "12"] in status
    assert front[0] == ["width", "params", "bytes", "val_acc", "kd_gain", "temperature", "alpha"]
    # The front: the best trial of each width (T=4, seed 2), as in test_report.
    assert front[1:] == [
        [str(w), f"{params_of(w):,}", f"{4 * params_of(w):,}", f"{acc:.4g}", gain, "4", "0.3"]
        for w, acc, gain in [(4, 0.862, "+0.0020"), (8, 0.892, "+0.0020"), (16, 0.922, "n/a")]
    ]
    assert temperature[0][:2] == ["bucket", "recommended_t"] and len(temperature) == 1 + 3
    text = page.read_text(encoding="utf-8")
    assert "<code>kd_gain</code>" in text and "`" not in text.split("<body>")[1]


def test_html_report_refuses_a_missing_or_non_png_figure(tmp_path):
    files = written_report(tmp_path)
    files["learning_curves"].write_bytes(b"GIF89a not a png")
    with pytest.raises(ResultsError, match="learning_curves.png: not a PNG"):
        write_html_report(files["summary"])
    files["pareto"].unlink()
    with pytest.raises(ResultsError, match="pareto.png: cannot read"):
        write_html_report(files["summary"])
    assert not (tmp_path / "report.html").exists()


def test_cli_report_html_writes_report_html(tmp_path):
    write_study_json(tmp_path)
    trials, history = synthetic_study()
    trials.to_parquet(tmp_path / "trials.parquet", index=False)
    history.to_parquet(tmp_path / "history.parquet", index=False)
    out = tmp_path / "shared"
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(out), "--html"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'report.html'}" in result.output
    assert len([tag for tag, _ in parse(out / "report.html").tags if tag == "img"]) == len(FIGURES)
    # Without --html, no HTML.
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0 and not (tmp_path / "report.html").exists()

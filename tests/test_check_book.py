"""tools/check_book.py catches each class of failure, on small pages made here (no book build).

Every page is served from tmp_path with the book's MathJax copied beside it (as
_ext/mathjax_local.py does for the book), so the MathJax check also proves that MathJax renders
with no network. Skipped where Chromium or Playwright is absent (`.ci/run` installs Chromium,
`make setup` Playwright).
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "_ext"))
import check_book  # noqa: E402

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="Playwright for Python is not installed (make setup installs the book extra)"),
    pytest.mark.skipif(check_book.find_chromium() is None,
                       reason="no Chromium at /usr/bin/chromium (Debian package chromium; .ci/run installs it)"),
]

HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>t</title>
<style>body {{ margin: 0 }} article {{ max-width: 800px; padding: 0 20px }} img {{ max-width: 100% }}
.scroll {{ overflow-x: auto }} pre {{ overflow-x: auto }}</style>
<script>window.MathJax = {{options: {{processHtmlClass: "math"}}}}</script>
<script defer src="{mathjax}"></script></head><body><article class="bd-article">
<section id="s">"""
TAIL = "</section></article></body></html>"

PAGES = {
    "good.html": """<p>Inline <span class="math">\\(x^2\\)</span> and displayed</p>
        <div class="math">\\[\\frac{a}{b} = \\mathrm{SQNR}\\]</div><p>costs $5 and $10.</p>
        <pre>print(r"$\\hat w$")  # TeX in code is fine</pre>
        <p><code>\\frac</code> in inline code is fine too</p>
        <div class="scroll"><table><tr><td>a</td><td>b</td></tr></table></div>""",
    "tex.html": """<p>The map $q = \\mathrm{round}(x/s)$ was left raw.</p>
        <p class="mathjax_ignore">So was \\(\\alpha\\), outside what MathJax processes.</p>""",
    "myst.html": """<p>Accuracy {glue:text}`acc:.2f` and see {numref}`fig-x`.</p>
        <p><code>{glue}`worst_layer`</code></p><p>:::{note}</p>""",
    "external.html": """<p>An image from elsewhere:</p><img src="https://images.example.invalid/x.png" alt="x">""",
    "wide.html": """<div class="scroll"><table><tr>""" + "".join(
        f"<td>column{i:02d}_with_a_long_value</td>" for i in range(12)) + """</tr></table></div>
        <div class="cell_output"><pre>""" + "0123456789" * 20 + """</pre></div>
        <div class="cell_input"><pre>x = 1  # """ + "long comment " * 20 + """</pre></div>
        <img src="wide.png" style="max-width: none; width: 1200px" alt="fixed width">""",
    "narrow.html": """<img src="wide.png" style="max-width: none; width: 600px" alt="600 px wide">
        <div class="scroll"><table><tr>""" + "".join(f"<td>cell{i}</td>" for i in range(12)) + """</tr></table></div>""",
    "missing.html": """<img src="nowhere.png" alt="not in the book">""",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import mathjax_local

    html = tmp_path_factory.mktemp("html")
    mathjax_local.copy_into(html / "_mathjax")
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f"
           b"\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00"
           b"\x00IEND\xaeB`\x82")
    (html / "wide.png").write_bytes(png)
    (html / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=good.html" />')
    for name, body in PAGES.items():
        (html / name).write_text(HEAD.format(mathjax="_mathjax/tex-mml-chtml.js") + body + TAIL)
    (html / "nomathjax.html").write_text(HEAD.format(mathjax="_mathjax/absent.js") + PAGES["good.html"] + TAIL)
    shots = html.parent / "shots"
    result = check_book.check_book(html, shots, log=lambda *a: None)
    result.shots = shots
    return result


def failures(report, page, check=None):
    return [str(f) for f in report.failures if f.page == page and (check is None or f.check == check)]


def test_a_clean_page_passes_and_mathjax_renders_offline(report):
    assert failures(report, "good.html") == []
    assert report.redirects == {"index.html": "good.html"}
    weight = report.weights["good.html"]
    assert weight["mathjax"] > 500_000 and weight["requests"] >= 3


def test_raw_tex_is_caught(report):
    found = failures(report, "tex.html", "raw TeX")
    assert any("'$q = \\\\mathrm{round}(x/s)$'" in f for f in found), found
    assert any("\\\\(" in f for f in found), found  # the \( MathJax was not asked to process


def test_math_without_mathjax_fails_three_ways(report):
    assert failures(report, "nomathjax.html", "MathJax") == [
        "[MathJax] MathJax did not load: the page has math, and no MathJax ran"]
    assert "absent.js" in " ".join(failures(report, "nomathjax.html", "missing resource"))
    raw = " ".join(failures(report, "nomathjax.html", "raw TeX"))
    assert "'\\\\(', '\\\\)'" in raw and "\\\\frac" in raw, raw


def test_raw_myst_is_caught_also_inside_inline_code(report):
    found = " ".join(failures(report, "myst.html", "raw MyST"))
    assert "{glue" in found and "{numref}" in found and ":::" in found
    assert found.count("[raw MyST]") == 3


def test_external_requests_are_listed_and_never_leave(report):
    assert failures(report, "external.html") == ["[external request] https://images.example.invalid/x.png"]


def test_missing_resources_fail(report):
    found = failures(report, "missing.html", "missing resource")
    assert len(found) == 1 and "nowhere.png" in found[0]


def test_clipped_tables_outputs_and_images_at_1400(report):
    found = failures(report, "wide.html", "clipped at 1400 px")
    kinds = sorted(f.split("] ")[1].split(" #")[0] for f in found)
    assert kinds == ["image", "output", "table"], found
    table = next(f for f in found if "] table" in f)
    assert '"column00_with_a_long_va… | column01' in table and "(12 columns)" in table
    output = next(f for f in found if "] output" in f)
    assert "longest line 200 chars" in output
    assert [str(w) for w in report.warnings if w.page == "wide.html" and "source code" in str(w)]


def test_at_420_wide_images_fail_and_scrolling_tables_are_reported(report):
    assert any("600 px wide" in f for f in failures(report, "narrow.html", "image wider than 420 px viewport"))
    assert not failures(report, "narrow.html", "clipped at 1400 px")
    assert any(w.page == "narrow.html" and w.check == "table scrolls at 420 px" for w in report.warnings)


def test_screenshots_at_both_widths(report):
    assert (report.shots / "good-1400.png").stat().st_size > 1000
    assert (report.shots / "wide-420.png").stat().st_size > 1000

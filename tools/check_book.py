"""Check the built book in a headless browser, as a reader sees it (`make check-book`).

Every HTML page of ``_build/html`` is served from 127.0.0.1 (``--file``: opened as file:// URLs,
as an offline reader would) in one headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright; ``CHROMIUM=...`` to use another). For each page it fails on:

- **raw TeX**: after MathJax has typeset the page, text outside code (``pre``, ``code``) that is
  still TeX: ``$...$``, ``$$``, ``\\(``, ``\\[``, ``\\begin{``, any ``\\command``;
- **MathJax** not loaded or not finished on a page with math;
- **external requests**: any request to a host other than the book's own server (or file://),
  listed; the browser resolves no other host, so nothing leaves the machine;
- **missing resources**: a request of the book's that fails or answers 400 or more;
- **raw MyST**: ``{glue``, ``{numref}``, ``{ref}``, ``{cite``, any ``{role}``` ``, fences
  (``` ``` ```, ``:::``) in text outside ``pre`` blocks (inline code is checked: a role written
  inside backticks renders as inline code);
- **clipped at 1400 px**: a table, a ``pre`` block of output or prose, a displayed equation or an
  image wider than the box that shows it (its own scroll box, the nearest ancestor that clips or
  scrolls, or else the text column), with the overflow in px and a short excerpt. Folded cells
  (``<details>``) are opened for this, since a reader can open them. Source code cells that
  scroll are reported as warnings only: a long source line scrolls, as code does in any viewer,
  and the code stays readable; outputs and tables are what the book exists to show;
- **images wider than a 420 px viewport** (not scaled down); tables that scroll at 420 px are
  reported, not failed.

It writes full-page screenshots (pages as they open, folded cells folded) to
``_build/screenshots/<page>-1400.png`` and ``-420.png``, and prints each page's weight: the
bytes of every resource the page loaded at 1400 px (HTML, CSS, JS, fonts, images, MathJax's
pieces; as served, uncompressed, headers included) and the number of requests. Exit status 1 on
any failure, 2 when the browser or the book is missing.
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
WIDE, NARROW = 1400, 420
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-proxy-server",
    # no host but the book's server resolves: an external request is recorded and fails at once,
    # and no packet leaves the machine
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
SKIP_DIRS = {"_static", "_mathjax", "_sources", "_images", "_downloads", "reports", "_panels_static"}
MATHJAX_TIMEOUT_MS = 30_000
REFRESH = re.compile(r'<meta http-equiv="refresh" content="0; url=([^"]+)"', re.I)

TEX = re.compile(r"\$\$|(?<![\w$\\])\$(?=[^\s$])[^$\n]{0,300}?(?<=[^\s$\\])\$(?![\w$])"
                 r"|\\[()\[\]]|\\begin\{|\\end\{|\\[A-Za-z]{2,}")
MYST = re.compile(r"\{glue|\{numref\}|\{ref\}|\{cite|\{eq\}|\{doc\}|\{math\}|\{[a-z][\w:-]*\}`|```|:::")


@dataclass
class Finding:
    page: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.message}"


@dataclass
class Report:
    failures: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    # page -> {"bytes", "requests", "mathjax" (bytes from _mathjax/), "largest" (url, bytes)}
    weights: dict[str, dict] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)  # page -> the page it redirects to
    pages: list[str] = field(default_factory=list)
    browser: str = ""
    seconds: float = 0.0


# Text left as markup. Text nodes are joined per block-level element (so `$a` + <em>b</em> + `c$`
# is seen whole); code is replaced by a marker for the TeX check and kept for the MyST check.
TEXT_JS = r"""
() => {
  const SKIP = 'script, style, noscript, template, textarea, svg, mjx-container, mjx-assistive-mml';
  const CODE = 'code, kbd, samp, tt';
  const blocks = new Map();
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || el.closest(SKIP) || el.closest('pre')) continue;
    let block = el;
    while (block !== document.body && getComputedStyle(block).display.startsWith('inline'))
      block = block.parentElement;
    if (!blocks.has(block)) blocks.set(block, {tex: '', myst: '', hidden: !block.checkVisibility()});
    const b = blocks.get(block);
    b.tex += el.closest(CODE) ? ' \u2039code\u203a ' : node.data;
    b.myst += node.data;
  }
  const where = (el) => { const s = el.closest('section[id]'); return s ? '#' + s.id : ''; };
  return [...blocks].map(([el, b]) => ({tex: b.tex, myst: b.myst, hidden: b.hidden,
                                        where: where(el), tag: el.tagName.toLowerCase()}));
}
"""

# Everything that can be cut off at this width, measured against the box that shows it.
LAYOUT_JS = r"""
() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main')
                  || document.body;
  const vw = document.documentElement.clientWidth;
  const cs = getComputedStyle(article);
  const colRight = article.getBoundingClientRect().right - parseFloat(cs.paddingRight);
  const clip = (el) => {
    for (let a = el.parentElement; a && a !== article && a !== document.body; a = a.parentElement)
      if (getComputedStyle(a).overflowX !== 'visible') return a;
    return null;
  };
  const clean = (s, n) => { s = s.replace(/\s+/g, ' ').trim(); return s.length > n ? s.slice(0, n - 1) + '\u2026' : s; };
  const where = (el) => { const s = el.closest('section[id]'); return s ? '#' + s.id : ''; };
  const kindOf = (el) => {
    const tag = el.tagName.toLowerCase();
    if (tag === 'img') return 'image';
    if (tag === 'table') return el.closest('.cell_output') ? 'table (cell output)' : 'table';
    if (tag === 'mjx-container') return 'equation';
    if (el.closest('.cell_output')) return 'output';
    if (el.closest('.cell_input')) return 'source code';
    return 'pre';
  };
  const excerpt = (el, kind) => {
    if (kind === 'image') return (el.getAttribute('alt') || el.getAttribute('src') || '').split('/').pop().slice(0, 60)
                                 + ` (${el.naturalWidth}x${el.naturalHeight} px file, shown ${Math.round(el.getBoundingClientRect().width)} px)`;
    if (kind.startsWith('table')) {
      const row = el.querySelector('tr');
      const cells = row ? [...row.children].map(c => clean(c.textContent, 24)) : [];
      return `"${clean(cells.join(' | '), 80)}" (${cells.length} columns)`;
    }
    if (kind === 'equation') {
      try { const item = MathJax.startup.document.getMathItemsWithin(el)[0]; return `"${clean(item.math, 80)}"`; }
      catch (e) { return `"${clean(el.textContent, 80)}"`; }
    }
    const lines = el.textContent.replace(/\n$/, '').split('\n');
    const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), '');
    return `first line "${clean(lines[0], 60)}"; longest line ${longest.length} chars: "${clean(longest, 60)}"`;
  };
  const out = [];
  const seen = new Set();
  for (const el of article.querySelectorAll('table, pre, img, mjx-container[display="true"]')) {
    if (!el.checkVisibility() || el.parentElement.closest('table, pre')) continue;
    const kind = kindOf(el);
    const r = el.getBoundingClientRect();
    const box = clip(el);
    let overflow = 0, against = '';
    if (kind !== 'image' && kind !== 'equation' && el.scrollWidth > el.clientWidth + 1) {
      overflow = el.scrollWidth - el.clientWidth; against = `its ${el.clientWidth} px box scrolls`;
    }
    if (box) {
      const right = box.getBoundingClientRect().left + box.clientLeft + box.clientWidth;
      const over = Math.max(r.right - right, box.scrollWidth - box.clientWidth);
      if (over > 1 && over > overflow && !seen.has(box)) {
        overflow = over; against = `the ${box.clientWidth} px box around it scrolls or clips`;
      }
      if (over > 1) seen.add(box);
    } else if (r.right > colRight + 1 && r.right - colRight > overflow) {
      overflow = r.right - colRight; against = 'it sticks out of the text column';
    }
    out.push({kind, where: where(el), overflow: Math.round(overflow), against,
              width: Math.round(r.width), beyondViewport: Math.round(r.right - vw),
              excerpt: overflow > 1 || (kind === 'image' && r.width > vw + 1) ? excerpt(el, kind) : ''});
  }
  const page = document.scrollingElement;
  return {items: out, vw, pageOverflow: page.scrollWidth - page.clientWidth};
}
"""

# MathJax's script is deferred (or async): by the load event it has run, or it never will.
WAIT_MATHJAX_JS = r"""
async (timeout) => {
  if (!document.querySelector('.math, mjx-container')) return 'no math';
  const t0 = performance.now();
  while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
    if (performance.now() - t0 > 2000) return 'MathJax did not load: the page has math, and no MathJax ran';
    await new Promise(r => setTimeout(r, 50));
  }
  const late = new Promise(r => setTimeout(() => r('late'), timeout));
  if (await Promise.race([MathJax.startup.promise.then(() => 'done'), late]) === 'late')
    return `MathJax did not finish typesetting in ${timeout / 1000} s`;
  await document.fonts.ready;
  return 'ok ' + document.querySelectorAll('mjx-container').length;
}
"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the check prints its own summary
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # the browser hung up (a favicon.ico 404)
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Server:
    """The built book on http://127.0.0.1:<free port>/, in a thread, for the length of a with."""

    def __init__(self, directory: Path):
        handler = partial(QuietHandler, directory=str(directory))
        self.httpd = QuietServer(("127.0.0.1", 0), handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "Server":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def find_pages(html: Path) -> list[str]:
    """Every page of the book: the HTML files outside Sphinx's and MathJax's asset folders."""
    return sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                  if not SKIP_DIRS & set(p.relative_to(html).parts[:-1]))


def find_chromium() -> str | None:
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return exe if Path(exe).is_file() and os.access(exe, os.X_OK) else None


def text_findings(page: str, blocks: list[dict]) -> list[Finding]:
    out = []
    for b in blocks:
        hidden = " (in a folded part)" if b["hidden"] else ""
        for check, pattern, text in (("raw TeX", TEX, b["tex"]), ("raw MyST", MYST, b["myst"])):
            hits = list(pattern.finditer(text))
            if hits:
                m = hits[0]
                context = re.sub(r"\s+", " ", text[max(0, m.start() - 30):m.end() + 30]).strip()
                tokens = ", ".join(repr(t) for t in dict.fromkeys(h.group(0) for h in hits))
                out.append(Finding(page, check, f"{b['where'] or '<page>'} <{b['tag']}>{hidden}: "
                                                f"{tokens} in \"{context}\""))
    return out


def layout_findings(page: str, layout: dict, width: int) -> tuple[list[Finding], list[Finding]]:
    fails, warns = [], []
    for it in layout["items"]:
        kind, where = it["kind"], it["where"] or "<page>"
        if width == WIDE and it["overflow"] > 1:
            msg = (f"{kind} {where}: {it['overflow']} px wider than shown ({it['against']}); "
                   f"{it['excerpt']}")
            (warns if kind == "source code" else fails).append(Finding(page, f"clipped at {width} px", msg))
        if width == NARROW:
            if kind == "image" and (it["width"] > layout["vw"] + 1 or it["beyondViewport"] > 1):
                fails.append(Finding(page, f"image wider than {width} px viewport",
                                     f"{where}: {it['excerpt']}, {max(it['width'] - layout['vw'], it['beyondViewport'])} px too wide"))
            elif kind.startswith("table") and it["overflow"] > 1:
                warns.append(Finding(page, f"table scrolls at {width} px",
                                     f"{kind} {where}: {it['overflow']} px to scroll; {it['excerpt']}"))
    return fails, warns


def screenshot_name(page: str, width: int) -> str:
    return f"{page[:-len('.html')]}-{width}.png"


def check_book(html: Path, shots: Path | None = None, pages: list[str] | None = None,
               file_urls: bool = False, chromium: str | None = None, log=print) -> Report:
    """Run every check on `pages` (default: all) of the built book in `html`; screenshots to `shots`."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    start = time.monotonic()
    html = html.resolve()
    report = Report(pages=pages if pages is not None else find_pages(html))
    chromium = chromium or find_chromium()
    server = None if file_urls else Server(html)
    with (server or _nothing()), sync_playwright() as pw:
        # one browser for the whole book (Playwright gives it a fresh profile directory); a fresh
        # context (empty cache) per page, so that each page's weight counts all it loads
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        report.browser = f"Chromium {browser.version}"
        base = html.as_uri() if file_urls else server.origin
        for page_name in report.pages:
            url = f"{base}/{page_name}"
            redirect = REFRESH.search((html / page_name).read_text(errors="replace")[:4000])
            if redirect:  # index.html: Jupyter Book's redirect to the root document, checked itself
                report.redirects[page_name] = redirect.group(1)
                continue
            t0 = time.monotonic()
            _check_page(browser, url, page_name, base, shots, report, PlaywrightError)
            log(f"  {page_name}: {time.monotonic() - t0:.1f} s")
        browser.close()
    report.seconds = time.monotonic() - start
    return report


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _own(url: str, base: str) -> bool:
    scheme = urlsplit(url).scheme
    return url.startswith(base + "/") or url == base or scheme in ("data", "blob", "about") \
        or (scheme == "file" and base.startswith("file:"))


def _check_page(browser, url, page_name, base, shots, report, PlaywrightError):
    context = browser.new_context(viewport={"width": WIDE, "height": 900}, service_workers="block")
    page = context.new_page()
    external, missing = [], []
    page.on("request", lambda r: None if _own(r.url, base) else external.append(r.url))
    page.on("websocket", lambda ws: external.append(ws.url))
    page.on("requestfailed", lambda r: _own(r.url, base) and missing.append(f"{r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and _own(r.url, base) and missing.append(f"{r.url} (HTTP {r.status})"))
    weight, urls = {}, {}
    cdp = context.new_cdp_session(page)
    cdp.on("Network.requestWillBeSent", lambda e: urls.__setitem__(e["requestId"], e["request"]["url"]))
    cdp.on("Network.loadingFinished", lambda e: weight.__setitem__(e["requestId"], e["encodedDataLength"]))
    cdp.send("Network.enable")
    fail = lambda check, msg: report.failures.append(Finding(page_name, check, msg))
    try:
        page.goto(url, wait_until="load")
        state = page.evaluate(WAIT_MATHJAX_JS, MATHJAX_TIMEOUT_MS)
        if not (state == "no math" or state.startswith("ok")):
            fail("MathJax", state)
        try:
            page.wait_for_load_state("networkidle", timeout=5_000)
        except PlaywrightError:
            pass
        for f in text_findings(page_name, page.evaluate(TEXT_JS)):
            report.failures.append(f)
        if shots:
            _shoot(page, shots / screenshot_name(page_name, WIDE))
        largest = max(weight, key=weight.get)
        report.weights[page_name] = {
            "bytes": int(sum(weight.values())), "requests": len(weight),
            "mathjax": int(sum(n for r, n in weight.items() if "/_mathjax/" in urls.get(r, ""))),
            "largest": (urls.get(largest, "?").split("?")[0].removeprefix(base + "/"), int(weight[largest]))}
        for width in (WIDE, NARROW):
            if width != WIDE:
                page.set_viewport_size({"width": width, "height": 900})
                page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                if shots:
                    _shoot(page, shots / screenshot_name(page_name, width))
            opened = page.evaluate("() => { const d = [...document.querySelectorAll('details:not([open])')];"
                                   " d.forEach(x => x.open = true); return d.length; }")
            fails, warns = layout_findings(page_name, page.evaluate(LAYOUT_JS), width)
            report.failures += fails
            report.warnings += warns
            if opened:
                page.evaluate("() => document.querySelectorAll('details[open]').forEach(x => x.open = false)")
    except PlaywrightError as err:
        fail("browser", f"{url}: {str(err).splitlines()[0]}")
    for u in dict.fromkeys(external):
        fail("external request", u)
    for u in dict.fromkeys(missing):
        fail("missing resource", u)
    context.close()


def _shoot(page, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


def print_report(report: Report, html: Path, shots: Path | None, out=sys.stdout) -> None:
    p = partial(print, file=out)
    by_page: dict[str, list[Finding]] = {}
    for f in report.failures:
        by_page.setdefault(f.page, []).append(f)
    for page_name in report.pages:
        if page_name in by_page:
            p(f"FAIL {page_name}")
            for f in by_page[page_name]:
                p(f"  {f}")
    for page_name, target in report.redirects.items():
        p(f"{page_name} redirects to {target}: checked there")
    if report.warnings:
        p("\nReported, not failing:")
        for page_name in report.pages:
            mine = [f for f in report.warnings if f.page == page_name]
            if mine:
                p(f"  {page_name}")
                for f in mine:
                    p(f"    {f}")
    p(f"\nPage weight (every resource a page loads at {WIDE} px, as served, uncompressed):")
    width = max([len(x) for x in report.pages] + [4])
    p(f"  {'page':<{width}}  {'KiB':>6}  {'requests':>8}  {'MathJax KiB':>11}  largest resource (KiB)")
    for page_name in report.pages:
        if page_name in report.weights:
            w = report.weights[page_name]
            p(f"  {page_name:<{width}}  {w['bytes'] / 1024:6.0f}  {w['requests']:8d}  {w['mathjax'] / 1024:11.0f}  "
              f"{w['largest'][0]} ({w['largest'][1] / 1024:.0f})")
    if shots:
        p(f"\nScreenshots: {shots}/<page>-{WIDE}.png and -{NARROW}.png")
    counts: dict[str, int] = {}
    for f in report.failures:
        counts[f.check] = counts.get(f.check, 0) + 1
    what = ", ".join(f"{n} {check}" for check, n in sorted(counts.items()))
    verdict = (f"{len(report.failures)} failures on {len(by_page)} of {len(report.pages)} pages ({what})"
               if report.failures else f"all {len(report.pages)} pages pass")
    p(f"check-book: {verdict}; {len(report.warnings)} reported; {report.browser}, "
      f"{report.seconds:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default=str(ROOT / "_build" / "html"), help="the built book")
    ap.add_argument("--screenshots", default=str(ROOT / "_build" / "screenshots"),
                    help="where the screenshots go ('' for none)")
    ap.add_argument("--file", action="store_true", help="open pages as file:// URLs instead of serving them")
    ap.add_argument("--page", action="append", help="check only this page (relative path; repeatable)")
    args = ap.parse_args(argv)
    html = Path(args.html)
    if not (html / "index.html").is_file():
        print(f"check-book: no built book at {html} (make book)", file=sys.stderr)
        return 2
    chromium = find_chromium()
    if chromium is None:
        print("check-book: no Chromium (Debian: apt-get install chromium; or set CHROMIUM=/path)", file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("check-book: Playwright for Python is missing (make setup installs the book extra)", file=sys.stderr)
        return 2
    shots = Path(args.screenshots) if args.screenshots else None
    if shots and shots.exists():
        shutil.rmtree(shots)
    print(f"check-book: {html} in headless {chromium}, at {WIDE} and {NARROW} px")
    report = check_book(html, shots, args.page, args.file, chromium)
    print_report(report, html, shots)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""MathJax served from the built book, so that equations render offline.

Sphinx points pages at MathJax on a CDN by default; a reader without a network then sees raw TeX.
The book's set-up installs MathJax 3.2.2 from PyPI (``django-static-mathjax==3.2.2.1``, pinned in
constraints.txt: MathJax's own source repository with its built ``es5/`` components, no
dependencies; Django is not needed, the package is only files). At the end of an HTML build this
copies the browser parts of ``es5/`` into ``_build/html/_mathjax/`` and ``_config.yml`` points
``mathjax_path`` at ``_mathjax/tex-mml-chtml.js``.

Not under ``_static/``: Sphinx would add every ``.js`` file there to every page as a script.
Copied: the one combined component the pages load (TeX and MathML input, CommonHTML output, the
menu), and the pieces it loads on demand (TeX extensions, fonts, the menu's accessibility and
speech options, the SVG renderer it can switch to); not the other combined builds nor the Node
adaptors. MathJax's Apache-2.0 LICENSE is copied along.
"""

import shutil
from importlib import metadata
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

DIST = "django-static-mathjax"
TARGET = "_mathjax"
ENTRY = "tex-mml-chtml.js"
PARTS = ("a11y", "input", "output", "sre", "ui")


def mathjax_root() -> Path:
    """The installed MathJax tree (the directory holding ``es5/`` and ``LICENSE``)."""
    try:
        import mathjax  # the package django-static-mathjax installs
    except ImportError as err:
        raise ExtensionError(f"MathJax is not installed: `make setup` installs {DIST} (the book's "
                             f"`book` extra), or `pip install -c constraints.txt {DIST}`") from err
    root = Path(mathjax.__file__).parent / "static" / "mathjax"
    if not (root / "es5" / ENTRY).is_file():
        raise ExtensionError(f"{DIST} is installed but {root / 'es5' / ENTRY} is missing")
    return root


def check_config(app: Sphinx, config) -> None:
    mathjax_root()  # fail at the start of the build, not after it
    expected = f"../{TARGET}/{ENTRY}"  # Sphinx joins a relative mathjax_path to _static/
    if config.mathjax_path != expected:
        raise ExtensionError(f"mathjax_path is {config.mathjax_path!r}; the book serves MathJax "
                             f"itself: set sphinx.config.mathjax_path to {expected!r} in _config.yml")


def copy_into(out: Path) -> Path:
    """Copy MathJax's browser parts into the directory `out`; returns the entry script's path."""
    root = mathjax_root()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "es5" / ENTRY, out / ENTRY)
    shutil.copy2(root / "LICENSE", out / "LICENSE")
    for part in PARTS:
        shutil.copytree(root / "es5" / part, out / part, dirs_exist_ok=True)
    (out / "VERSION").write_text(f"MathJax from the PyPI package {DIST}=={metadata.version(DIST)}\n")
    return out / ENTRY


def copy_mathjax(app: Sphinx, exception) -> None:
    if exception is None and app.builder.format == "html":
        copy_into(Path(app.outdir) / TARGET)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", check_config)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""The book's API appendix (appendix/api*.md) and the chapters' references in the docstrings.

* Every public name of every refimpl module has an entry in the appendix, in that module's
  section (public: in the module's ``__all__``; a module without ``__all__`` -- four in
  refimpl.quant -- exports the functions and classes it defines; modules whose names start with
  an underscore are private and not in the appendix).
"""
import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "refimpl"
APPENDIX = sorted((ROOT / "appendix").glob("api*.md"))


def module_name(path: Path) -> str:
    parts = ["refimpl", *path.relative_to(PKG).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


# refimpl itself exports nothing (appendix/api.md describes it)
MODULES = sorted(module_name(p) for p in PKG.rglob("*.py") if p != PKG / "__init__.py"
                 and not any(part.startswith("_") and part != "__init__.py" for part in p.relative_to(PKG).parts))


def public_names(name: str) -> list[str]:
    mod = importlib.import_module(name)
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    return [n for n, obj in vars(mod).items() if not n.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == name]


def appendix_sections() -> dict[str, str]:
    """{module: the appendix source from its ``.. automodule::`` line to the next one}."""
    sections = {}
    for page in APPENDIX:
        parts = re.split(r"^\.\. automodule:: (\S+)\n", page.read_text(), flags=re.M)
        for mod, text in zip(parts[1::2], parts[2::2]):
            assert mod not in sections, f"{mod} has two sections in the appendix"
            sections[mod] = text.split("\n```", 1)[0]
    return sections


def test_the_appendix_is_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    for page in APPENDIX:
        assert f"file: appendix/{page.stem}\n" in toc, f"{page.name} is not in _toc.yml"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_has_an_appendix_entry(name):
    sections = appendix_sections()
    assert name in sections, f"{name} has no section (.. automodule:: {name}) in appendix/api*.md"
    text = sections[name]
    entry = (r"^\.\. auto(?:function|class|data):: {0}$"     # documented here
             r"|^   ~(?:[\w.]+\.)?{0}$"                      # autosummary line of a re-export
             r"|^``{0}`` is :data:")                         # a re-export under another name
    missing = [n for n in public_names(name) if not re.search(entry.format(re.escape(n)), text, re.M)]
    assert not missing, (f"{name}: {missing} have no entry in its appendix section: add "
                         f"'.. autofunction:: / autoclass:: / autodata:: <name>' (with its line in the "
                         f"autosummary table), or the re-export to the package's table")


def test_appendix_sections_are_refimpl_modules():
    assert set(appendix_sections()) <= set(MODULES)

"""The book's API appendix (appendix/api*.md) and the chapters' references in the docstrings.

* Every public name of every refimpl module has an entry in the appendix, in that module's
  section (public: in the module's ``__all__``, which every module has; modules whose names
  start with an underscore are private and not in the appendix).
* d2l's "Defined in": the docstring of every refimpl name a chapter uses ends with "Used in
  :ref:`chN-sec-...`" -- the sections that use it, one per chapter -- and every such label is a
  MyST target, ``(label)=``, in a chapter's markdown.
"""
import ast
import json
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
    return list(importlib.import_module(name).__all__)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_says_what_is_public(name):
    """``__all__`` is the one definition of public (the appendix, its tests and tools/check_notebooks.py
    read it): a module without one, or naming something it does not have, fails."""
    mod = importlib.import_module(name)
    assert hasattr(mod, "__all__"), f"{name} has no __all__: list its public functions, classes and constants"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names what the module does not define: {missing}"


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


# --- "Used in" references from the docstrings to the chapters' sections --------------------------

CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
REF = re.compile(r":ref:`(?:[^`<]*<)?([^`<>]+)>?`")
# Imported by a chapter's set-up cell but never called there, so no section uses it:
# (chapter, name) pairs; remove one when the chapter uses the name or drops the import.
IMPORTED_UNUSED: set[tuple[str, str]] = set()


def chapter_targets() -> set[str]:
    """Every MyST target ``(label)=`` in the chapters' markdown cells."""
    labels = set()
    for nb in CHAPTERS:
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                labels |= set(re.findall(r"^\(([^)\s]+)\)=\s*$", "".join(cell["source"]), re.M))
    return labels


def docstrings(path: Path):
    """(where, docstring) for the module, every class and function, and every constant documented
    by a string right after its assignment (the attribute docstrings autodoc shows)."""
    tree = ast.parse(path.read_text())
    if ast.get_docstring(tree):
        yield path.name, ast.get_docstring(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(node):
            yield f"{path.name}:{node.name}", ast.get_docstring(node)
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for a, b in zip(body, body[1:]):
                if (isinstance(a, (ast.Assign, ast.AnnAssign)) and isinstance(b, ast.Expr)
                        and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                    yield f"{path.name}:{ast.unparse(a.targets[0] if isinstance(a, ast.Assign) else a.target)}", b.value.value


def test_every_section_a_docstring_names_exists():
    targets = chapter_targets()
    refs = [(where, label) for p in sorted(PKG.rglob("*.py")) for where, doc in docstrings(p)
            for label in REF.findall(doc)]
    assert refs, "no :ref: in refimpl's docstrings: the parser is broken"
    unknown = [(where, label) for where, label in refs if label not in targets]
    assert not unknown, f"labels that no chapter defines as (label)=: {unknown}"


def chapter_imports() -> dict[tuple[str, str], tuple[str, str]]:
    """{(chapter, local name): (refimpl module, name)} for every ``from refimpl... import``."""
    found = {}
    for nb in CHAPTERS:
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            code = "\n".join(l for l in "".join(cell["source"]).split("\n") if not l.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "refimpl":
                    for a in node.names:
                        found[nb.stem, a.asname or a.name] = (node.module, a.name)
    return found


def chapter_uses() -> set[tuple[str, str]]:
    """(chapter, name) for every name a chapter's code reads (beyond importing it)."""
    used = set()
    for nb in CHAPTERS:
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] == "code":
                code = "\n".join(l for l in "".join(cell["source"]).split("\n") if not l.lstrip().startswith(("%", "!")))
                used |= {(nb.stem, n.id) for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}
    return used


def docstring_of(module: str, name: str) -> str:
    """The docstring autodoc shows for ``module.name``: its own, or for a constant the string after
    its assignment in the module that defines it."""
    obj = getattr(importlib.import_module(module), name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return inspect.unwrap(obj).__doc__ or ""
    for path in sorted(PKG.rglob("*.py")):
        mod = importlib.import_module(module_name(path))
        if getattr(mod, name, None) is obj:
            doc = dict(docstrings(path)).get(f"{path.name}:{name}")
            if doc:
                return doc
    return ""


def test_every_name_a_chapter_uses_says_where():
    imports, uses = chapter_imports(), chapter_uses()
    assert len(imports) > 50, "the chapters' imports were not found"
    unused = {key for key in imports if key not in uses}
    assert unused == IMPORTED_UNUSED, f"imported by a chapter but not used there: {unused ^ IMPORTED_UNUSED}"
    missing = sorted({f"{module}.{name}" for key, (module, name) in imports.items()
                      if key in uses and not re.search(r"Used in :ref:`", docstring_of(module, name))})
    assert not missing, f"used by a chapter, but no 'Used in :ref:`chN-sec-...`' at the end of its docstring: {missing}"


def test_used_in_names_a_section_of_a_chapter_that_uses_it():
    """Each "Used in" label is in a chapter whose code uses the name (not a stale section)."""
    imports, uses = chapter_imports(), chapter_uses()
    label_chapter = {}
    for nb in CHAPTERS:
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                for label in re.findall(r"^\(([^)\s]+)\)=\s*$", "".join(cell["source"]), re.M):
                    label_chapter[label] = nb.stem
    for (chapter, local), (module, name) in imports.items():
        doc = docstring_of(module, name)
        line = doc[doc.find("Used in :ref:"):] if "Used in :ref:" in doc else ""
        chapters = {label_chapter.get(label) for label in REF.findall(line)}
        users = {c for (c, loc), (m, n) in imports.items() if (c, loc) in uses and (m, n) == (module, name)}
        assert users <= chapters, f"{module}.{name}: used in {sorted(users - chapters)} but not named by its 'Used in'"

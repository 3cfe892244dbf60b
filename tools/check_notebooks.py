"""Fail on a chapter that strict nbval could not really check, or that the book must not show.

A chapter fails when: a non-empty code cell was never executed (nbval skips cells whose stored
execution_count is null, so a stripped notebook would pass vacuously); its kernel is not python3;
any cell printed to stderr; or a cell holds an error without the `raises-exception` tag.
It also fails on a break of the house style (README, "House style of a chapter") that can be read
off the notebook: a figure or table directive without a `:name:`, or one the chapter never cites by
`{numref}`; a Markdown table printed by a code cell instead of glued into a numbered `{table}`; a
printed line over 88 characters (the text column at 1400 px); a chapter without `## Summary` followed by `## Exercises` at
its end; a set-up cell that is not folded; a public function, class or module of refimpl named in
the prose as plain code (`fake_quant`) instead of a link to the API appendix
(`` {py:func}`fake_quant <refimpl.quant.functional.fake_quant>` ``; the nitpicky build then fails
on a name that does not exist). `--link-api` rewrites such names into links, in place.
Usage: python tools/check_notebooks.py [--link-api] chapters/*.ipynb   (exit 1 and one line per problem)
"""

import functools
import json
import re
import sys

import nbformat

# the book's text column at 1400 px holds about 90 characters of monospace (make check-book)
MAX_LINE = 88
# a numbered block: ```{glue:figure} key / :::{table} caption / ```{figure} path, with its options
BLOCK = re.compile(r"^(`{3,}|:{3,})\{(glue:figure|table|figure)\}[^\n]*\n((?::[^\n]*\n)*)", re.M)
NAME = re.compile(r"^:name:\s*\"?([^\"\n]+?)\"?\s*$", re.M)
NUMREF = re.compile(r"\{numref\}`(?:[^`<]*<)?([^`>]+)>?`")
GFM_TABLE = re.compile(r"^\|.*\|\s*\n\|[\s:|-]+\|\s*$", re.M)
# a dotted name in backticks, not a role's content (`{py:func}` and {glue:text}`k` are preceded by })
CODE_NAME = re.compile(r"(?<![`}\w])`([A-Za-z_][\w.]*)`(?!`)")
# fenced blocks whose content is code, not prose (a directive's body, ```{glue:figure}, is prose)
CODE_FENCE = re.compile(r"^(`{3,}|~{3,})(?!\{)[^\n]*\n.*?^\1\s*$", re.M | re.S)


@functools.lru_cache(maxsize=None)
def api_targets():
    """{name as prose writes it: (role, dotted path where it is defined)} for refimpl's public names.

    Functions and classes by their own name ("fake_quant") when that name is unique, and by a path
    through refimpl ("calib.mse", "refimpl.calib.mse"); modules by their path ("refimpl.ptq.cle").
    """
    import importlib
    import inspect
    import pkgutil

    import refimpl

    short, full, modules = {}, {}, []
    for info in pkgutil.walk_packages(refimpl.__path__, "refimpl."):
        if info.name.split(".")[-1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        modules.append(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                target = ("py:class" if inspect.isclass(obj) else "py:func", f"{obj.__module__}.{obj.__qualname__}")
                short.setdefault(name, set()).add(target)
                full[f"{info.name}.{name}"] = target
    for name in modules:                 # a function re-exported under a module's name wins
        full.setdefault(name, ("py:mod", name))
    targets = {name: next(iter(t)) for name, t in short.items() if len(t) == 1}
    for path, target in full.items():
        targets[path] = target
        targets[path[len("refimpl."):]] = target
    return targets


def unlinked_names(text, targets):
    """(start, end, name, role, path) of each refimpl name the prose shows as plain code."""
    code = [m.span() for m in CODE_FENCE.finditer(text)]
    for m in CODE_NAME.finditer(text):
        if any(a <= m.start() < b for a, b in code) or text[:m.start()].rsplit("\n", 1)[-1].startswith(":"):
            continue                     # in a code block, or a directive's option line
        target = targets.get(m.group(1))
        if target:
            yield m.start(), m.end(), m.group(1), *target


def link_api(path, targets):
    """Rewrite the prose's plain-code refimpl names into links to the API appendix; returns a count."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)             # not nbformat: keep the file's own layout, change only sources
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        for start, end, name, role, target in reversed(list(unlinked_names(text, targets))):
            text = f"{text[:start]}{{{role}}}`{name} <{target}>`{text[end:]}"
            count += 1
        cell["source"] = text.splitlines(keepends=True)
    if count:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return count


def style_problems(path, nb, targets=None):
    """The house-style rules a notebook file shows (README, "House style of a chapter")."""
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    if targets is None and CODE_NAME.search(markdown):
        targets = api_targets()          # imports refimpl (and torch): only where a name may be
    for start, end, name, role, target in unlinked_names(markdown, targets or {}):
        yield (f"{path}: `{name}` in the prose is plain code; link it to the API appendix, "
               f"{{{role}}}`{name} <{target}>` (or run with --link-api)")
    cited = set(NUMREF.findall(markdown))
    for match in BLOCK.finditer(markdown + "\n"):
        kind, options = match.group(2), match.group(3)
        name = NAME.search(options)
        if name is None:
            yield f"{path}: a {{{kind}}} without :name: (so it cannot be cited by number): {match.group(0)[:80]!r}"
        elif name.group(1) not in cited:
            yield f"{path}: {kind} {name.group(1)!r} is never cited by {{numref}} in the chapter"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            outside = re.sub(r"^(:{3,})\{table\}.*?^\1\s*$", "", cell.source, flags=re.M | re.S)
            if GFM_TABLE.search(outside):
                yield f"{path}: markdown cell {i} holds a table outside a numbered {{table}} directive"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if out.get("output_type") in ("display_data", "execute_result") and GFM_TABLE.search(
                    "".join(data.get("text/markdown", ""))):
                yield (f"{path}: code cell {i} prints a Markdown table; glue it and show it in a "
                       f"numbered {{table}} (README, House style)")
            texts = [out.get("text", "")] if out.get("output_type") == "stream" else [data.get("text/plain", "")]
            for text in texts:
                for line in "".join(text).splitlines():
                    if len(line) > MAX_LINE:
                        yield f"{path}: code cell {i} prints a line of {len(line)} characters (> {MAX_LINE}): {line[:60]!r}..."
                        break
    if code and "hide-input" not in code[0].metadata.get("tags", []) and "remove-input" not in code[0].metadata.get("tags", []):
        yield f"{path}: the set-up cell (first code cell) is not folded (tag hide-input)"
    headings = re.findall(r"^## +(.+?)\s*$", markdown, re.M)
    if headings[-2:] != ["Summary", "Exercises"]:
        yield f"{path}: the chapter must end with '## Summary' then '## Exercises'; its last sections are {headings[-2:]}"


def problems(path, targets=None):
    nb = nbformat.read(path, as_version=4)
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        yield f"{path}: kernel is {kernel!r}, not 'python3'"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        where = f"{path}: code cell {i}"
        if cell.source.strip() and cell.get("execution_count") is None:
            yield f"{where} was not executed"
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                yield f"{where} wrote to stderr: {''.join(out.get('text', ''))[:120]!r}"
            if out.get("output_type") == "error" and "raises-exception" not in cell.metadata.get("tags", []):
                yield f"{where} stored an error: {out.get('ename')}: {out.get('evalue')}"
    yield from style_problems(path, nb, targets)


def main(args):
    paths = [a for a in args if a != "--link-api"]
    if not paths:
        print("check_notebooks: no notebooks given", file=sys.stderr)
        return 1
    if "--link-api" in args:
        for path in paths:
            print(f"{path}: {link_api(path, api_targets())} refimpl names linked to the API appendix")
    found = [p for path in paths for p in problems(path)]
    for line in found:
        print(line)
    print(f"check_notebooks: {len(paths)} notebooks, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

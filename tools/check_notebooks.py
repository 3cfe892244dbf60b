"""Fail on a chapter that strict nbval could not really check, or that the book must not show.

A chapter fails when: a non-empty code cell was never executed (nbval skips cells whose stored
execution_count is null, so a stripped notebook would pass vacuously); its kernel is not python3;
any cell printed to stderr; or a cell holds an error without the `raises-exception` tag.
It also fails on a break of the house style (README, "House style of a chapter") that can be read
off the notebook: a figure or table directive without a `:name:`, or one the chapter never cites by
`{numref}`; a Markdown table printed by a code cell instead of glued into a numbered `{table}`; a
printed line over 88 characters (the text column at 1400 px); a chapter without `## Summary` followed by `## Exercises` at
its end; a set-up cell that is not folded.
Usage: python tools/check_notebooks.py chapters/*.ipynb   (exit 1 and one line per problem)
"""

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


def style_problems(path, nb):
    """The house-style rules a notebook file shows (README, "House style of a chapter")."""
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
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


def problems(path):
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
    yield from style_problems(path, nb)


def main(paths):
    if not paths:
        print("check_notebooks: no notebooks given", file=sys.stderr)
        return 1
    found = [p for path in paths for p in problems(path)]
    for line in found:
        print(line)
    print(f"check_notebooks: {len(paths)} notebooks, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Fail on a chapter that strict nbval could not really check, or that the book must not show.

A chapter fails when: a non-empty code cell was never executed (nbval skips cells whose stored
execution_count is null, so a stripped notebook would pass vacuously); its kernel is not python3;
any cell printed to stderr; or a cell holds an error without the `raises-exception` tag.
Usage: python tools/check_notebooks.py chapters/*.ipynb   (exit 1 and one line per problem)
"""

import sys

import nbformat


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

"""Execute chapters afresh and compare their numbers with the stored ones within a tolerance.

For platforms whose float results are not bit-identical to x86-64 (ARM64 Linux, macOS), where
strict nbval would report a wall of last-digit mismatches: ``make test`` runs this instead.
Each chapter is executed in a temporary copy (the stored notebook is untouched), then every
text output (stdout, text/plain, text/markdown, text/html) is compared with the stored one after
the rules of nbval_sanitize.cfg:

* the text with its numbers taken out must be identical (a changed word, row or label fails);
* each number must agree with the stored one: |fresh - stored| <= RTOL * |stored| + one unit of
  the last printed digit (default RTOL = 5 %);
* a cell must not raise or write to stderr.

Figures (images) are not compared. Prints every number beyond the tolerance and every other
difference, one line each, and a summary; exit status 1 if there is any.
Usage: python tools/compare_notebooks.py [--rtol 0.05] [--jobs N] [--proxy] chapters/*.ipynb
``--proxy`` is for checking this tool on x86-64: the kernels run with ATen's default dispatch
level instead of the configuration's (another float path, as on another platform); the
configuration warning this causes is expected and not counted.
"""

from __future__ import annotations

import argparse
import configparser
import copy
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from refimpl import numerics  # noqa: E402

NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
TEXT_TYPES = ("text/plain", "text/markdown", "text/html")
PROXY_WARNING = "does not run under the book's numerics configuration"


def sanitize_rules(path: Path = ROOT / "nbval_sanitize.cfg"):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return [(re.compile(parser[s]["regex"], re.M), parser[s]["replace"]) for s in parser.sections()]


def texts(cell, rules):
    """The cell's text outputs (sanitized) and its stderr, as lists of strings."""
    out, err = [], []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            (err if o.name == "stderr" else out).append("".join(o.text))
        elif o.output_type in ("execute_result", "display_data"):
            for mime in TEXT_TYPES:
                if mime in o.get("data", {}):
                    out.append("".join(o.data[mime]))
                    break
        elif o.output_type == "error":
            err.append(f"{o.ename}: {o.evalue}")
    for regex, replace in rules:
        out = [regex.sub(replace, t) for t in out]
    return out, err


def unit(token: str) -> float:
    """One unit of the last printed digit of a number token."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def compare_text(stored: str, fresh: str, rtol: float):
    """Yield (kind, detail) for each difference between two output texts."""
    if NUMBER.sub("#", stored) != NUMBER.sub("#", fresh):
        yield "text", f"{stored[:160]!r} -> {fresh[:160]!r}"
        return
    for a, b in zip(NUMBER.findall(stored), NUMBER.findall(fresh)):
        x, y = float(a), float(b)
        if abs(y - x) > rtol * abs(x) + max(unit(a), unit(b)):
            rel = abs(y - x) / abs(x) if x else float("inf")
            yield "number", f"stored {a}, fresh {b} (relative difference {rel:.2%})"


def compare(path: Path, rtol: float, proxy: bool, rules) -> list[str]:
    stored = nbformat.read(path, as_version=4)
    fresh = copy.deepcopy(stored)
    # executed in the chapter's own directory (its data files); the result is written nowhere
    NotebookClient(fresh, kernel_name="python3", timeout=1200, record_timing=False, allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    lines = []
    code = [(s, f) for s, f in zip(stored.cells, fresh.cells) if s.cell_type == "code"]
    for i, (s, f) in enumerate(code):
        where = f"{path.name} code cell {i}"
        s_out, _ = texts(s, rules)
        f_out, f_err = texts(f, rules)
        f_err = [e for e in f_err if not (proxy and PROXY_WARNING in e)]
        lines += [f"{where}: stderr or error: {e[:200]!r}" for e in f_err]
        if len(s_out) != len(f_out):
            lines.append(f"{where}: {len(s_out)} text outputs stored, {len(f_out)} fresh")
            continue
        for a, b in zip(s_out, f_out):
            lines += [f"{where}: {kind}: {detail}" for kind, detail in compare_text(a, b, rtol)]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtol", type=float, default=0.05)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--proxy", action="store_true")
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    numerics.set_environment()
    if args.proxy:
        os.environ["ATEN_CPU_CAPABILITY"] = "default"
    rules = sanitize_rules()
    print(f"compare_notebooks: executing {len(args.notebooks)} chapters afresh and comparing every "
          f"number with the stored one within {args.rtol:.0%} relative (+ one unit of the last "
          "printed digit); text must match; figures are not compared", flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda p: (p, compare(p, args.rtol, args.proxy, rules)), args.notebooks))
    total = 0
    for path, lines in results:
        print(f"{path}: {'ok' if not lines else f'{len(lines)} difference(s)'}")
        for line in lines:
            print("  " + line)
        total += len(lines)
    print(f"compare_notebooks: {total} difference(s) beyond the tolerance in {len(results)} chapters")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())

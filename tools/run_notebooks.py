"""Execute chapter notebooks in place (the stored outputs strict nbval compares against).

Usage: python tools/run_notebooks.py [--jobs N] chapters/01_intro.ipynb [...]
nbclient with record_timing=False, so re-running leaves byte-identical files when nothing changed.
``--jobs N`` runs N notebooks at a time (each in its own kernel), in the order given; 0 or 1: one.
The kernels run under the book's numerics configuration (refimpl/numerics.py).
"""

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refimpl import numerics  # noqa: E402


def execute(name: str) -> str:
    path = Path(name)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    print(f"executing {path}", flush=True)
    NotebookClient(nb, kernel_name="python3", timeout=1200, record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    return name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("notebooks", nargs="+")
    args = parser.parse_args(argv)
    numerics.set_environment()   # the kernels inherit it
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for name in pool.map(execute, args.notebooks):
            print(f"done {name}", flush=True)


if __name__ == "__main__":
    main()

"""Execute chapter notebooks in place (the stored outputs strict nbval compares against).

Usage: python tools/run_notebooks.py chapters/01_intro.ipynb [...]
nbclient with record_timing=False, so re-running leaves byte-identical files when nothing changed.
"""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refimpl import numerics  # noqa: E402


def main(paths):
    numerics.set_environment()   # the kernels inherit it (refimpl/numerics.py)
    for name in paths:
        path = Path(name)
        nb = nbformat.read(path, as_version=4)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        print(f"executing {path}", flush=True)
        NotebookClient(nb, kernel_name="python3", timeout=600, record_timing=False,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(nb, path)


if __name__ == "__main__":
    main(sys.argv[1:])

"""refimpl's layering (refimpl/__init__.py): a lower layer never imports an upper one, and
refimpl.neon needs neither torch nor the rest of refimpl."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "refimpl"
# rank of each module; a module may import only modules of equal or lower rank
RANK = {"_checks": 0, "numerics": 0, "quant": 1, "calib": 1, "metrics": 1, "neon": 1,
        "models": 2, "hooks": 3, "transforms": 3, "analysis": 3, "data": 3, "train": 3,
        "deploy": 3, "fold": 3, "qmodel": 3, "ptq": 3, "adaround": 3, "qat": 3, "pipeline": 3, "zoo": 3,
        "book": 4, "plots": 4, "experiments": 4}


def _top(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def _imports(path: Path):
    """refimpl modules (top level) and third-party roots imported by ``path``."""
    tree = ast.parse(path.read_text())
    pkg_parts = path.relative_to(PKG).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0] if not a.name.startswith("refimpl.") else "refimpl." + a.name.split(".")[1]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                mod = node.module or ""
                yield "refimpl." + mod.split(".")[1] if mod.startswith("refimpl.") else mod.split(".")[0]
            else:  # relative: resolve against this file's package inside refimpl
                base = pkg_parts[:len(pkg_parts) - (node.level - 1)]
                target = base + tuple((node.module or "").split(".")) if node.module else base
                if target:
                    yield "refimpl." + target[0]
                else:  # "from . import x" at the top of refimpl
                    for a in node.names:
                        yield "refimpl." + a.name


FILES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_no_upward_imports(path):
    top = _top(path)
    assert top in RANK, f"{top} has no layer in RANK: add it (and to refimpl/__init__.py's map)"
    for imp in _imports(path):
        if imp.startswith("refimpl."):
            other = imp.split(".")[1]
            assert other in RANK, f"{path.name} imports unknown refimpl module {other}"
            assert RANK[other] <= RANK[top], f"{path.relative_to(PKG)} ({top}) imports upper layer {other}"
        if top == "neon":
            assert imp not in ("torch",) and not (imp.startswith("refimpl.") and imp != "refimpl.neon"), \
                f"refimpl.neon must not import {imp}"


def test_neon_imports_without_torch():
    code = "import sys, refimpl.neon; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""refimpl's layout (README "Layout of refimpl", refimpl/__init__.py), checked file by file:

* a module imports only modules of its own layer or lower ones;
* no module imports another module's private (underscore) names;
* refimpl.neon needs neither torch nor the rest of refimpl.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "refimpl"

# The layer of each module, by dotted path inside refimpl; the longest matching prefix wins, so
# a package's entry covers its files unless one of them is listed on its own.
RANK = {
    # 0: configuration and argument checks, no torch at import
    "_checks": 0, "_api": 0, "_progress": 0, "numerics": 0,
    # 1: pure tensor math, no state
    "quant": 1, "calib": 1, "metrics": 1, "neon": 1, "neon.int7": 1,
    # 2: modules holding learnable or observed state, and the model's structure
    "quant.modules": 2, "models": 2, "graph": 2, "capture": 2,
    "qmodel.config": 2, "qmodel.observers": 2, "qmodel.quantizers": 2, "qmodel.layers": 2,
    # 3: model-level transforms, data and training
    "fold": 3, "qmodel": 3, "simulate": 3, "data": 3, "train": 3,
    # 4: algorithms and pipelines built on the transforms
    "ptq": 4, "qat": 4, "deploy": 4, "zoo": 4,
    # 5: the chapters' support
    "book": 5,
}


def module_name(path: Path) -> str:
    """refimpl/ptq/cle.py -> "ptq.cle"; refimpl/ptq/__init__.py -> "ptq"."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rank_of(name: str) -> int | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in RANK:
            return RANK[".".join(parts[:i])]
    return None


def imports(path: Path):
    """(refimpl module or third-party root, [imported names], line) for every import in ``path``;
    refimpl modules are given by their dotted path inside refimpl, e.g. "quant.functional"."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    here = module_name(path).split(".") if module_name(path) else []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "refimpl" or a.name.startswith("refimpl."):
                    yield "refimpl:" + a.name.partition(".")[2], [], node.lineno
                else:
                    yield a.name.split(".")[0], [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 0:
                mod = node.module or ""
                if mod == "refimpl" or mod.startswith("refimpl."):
                    base = mod.partition(".")[2]
                    yield from _from_refimpl(base, names, node.lineno)
                else:
                    yield mod.split(".")[0], names, node.lineno
            else:
                pkg = here if is_pkg else here[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + (node.module.split(".") if node.module else []))
                yield from _from_refimpl(base, names, node.lineno)


def _from_refimpl(base: str, names: list, line: int):
    if not base:        # "from refimpl import x" / "from . import x": x is a module
        for n in names:
            yield "refimpl:" + n, [], line
    else:
        yield "refimpl:" + base, names, line


FILES = sorted(p for p in PKG.rglob("*.py") if p != PKG / "__init__.py")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_imports_follow_the_layers(path):
    me = module_name(path)
    mine = rank_of(me)
    assert mine is not None, f"{me} has no layer in RANK: add it (and to the README's layout)"
    for mod, names, line in imports(path):
        if mod.startswith("refimpl:"):
            other = mod.partition(":")[2]
            theirs = rank_of(other)
            assert theirs is not None, f"{me}:{line} imports unknown refimpl module {other!r}"
            assert theirs <= mine, f"{me} (layer {mine}) imports {other} (layer {theirs}) at line {line}"
            if me.split(".")[0] == "neon":
                assert other.split(".")[0] == "neon", f"refimpl.neon must not import refimpl.{other}"
        elif me.split(".")[0] == "neon":
            assert mod != "torch", f"refimpl.neon must not import torch ({me}:{line})"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_no_module_imports_private_names_of_another(path):
    me = module_name(path)
    for mod, names, line in imports(path):
        if not mod.startswith("refimpl:"):
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{me}:{line} imports private names {private} from refimpl.{mod[8:]}"


def test_the_checker_sees_what_it_checks(tmp_path):
    # the rules are only as good as the import resolution: check it on known files
    found = {m for m, _, _ in imports(PKG / "ptq" / "cle.py")}
    assert {"refimpl:_checks", "refimpl:fold", "refimpl:graph", "refimpl:ptq.channels", "torch"} <= found
    assert rank_of("qmodel.quantizers") == 2 and rank_of("qmodel.insertion") == 3 and rank_of("nope") is None
    assert ("refimpl:qmodel", ["QuantConfig"], 1) in list(_from_refimpl("qmodel", ["QuantConfig"], 1))


def test_neon_imports_without_torch():
    code = "import sys, refimpl.neon; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _length(node) -> int:
    """Lines of a function's body, its docstring left out."""
    body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
    return node.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_long_modules_and_functions_say_why(path):
    """A module over ~600 lines or a function over ~60 says why in its docstring ("Why one ...")."""
    text = path.read_text()
    tree = ast.parse(text)
    if len(text.splitlines()) > 600:
        assert "Why one module" in (ast.get_docstring(tree) or ""), f"{path.name}: over 600 lines, no 'Why one module'"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _length(node) > 60:
            assert "Why one function" in (ast.get_docstring(node) or ""), \
                f"{path.name}:{node.lineno} {node.name} has {_length(node)} lines and no 'Why one function'"

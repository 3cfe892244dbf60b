"""The repository's promises about set-up: environment.yml and pyproject.toml agree, torch is pinned."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return reqs


def environment_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml needs exactly one pip: section"
    return pip[0]["pip"]


def normalise(req):
    return re.sub(r"\s+", "", req).lower()


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    ours, theirs = sorted(map(normalise, pyproject_requirements())), sorted(map(normalise, environment_requirements()))
    assert ours == theirs, f"only in pyproject: {set(ours) - set(theirs)}; only in environment.yml: {set(theirs) - set(ours)}"


def test_torch_is_never_unpinned():
    torch_reqs = [r for r in pyproject_requirements() if re.match(r"torch\b", r)]
    assert torch_reqs and all(re.search(r"[<>=~]", r) for r in torch_reqs)
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:25]
    assert any("make book" in line for line in head) and any("make test" in line for line in head)


def test_check_notebooks_flags_unexecuted_stderr_and_wrong_kernel(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    def write(name, cells, kernel="python3"):
        nb = nbformat.v4.new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
        path = tmp_path / name
        nbformat.write(nb, path)
        return str(path)

    ok_cell = nbformat.v4.new_code_cell("1", execution_count=1,
                                        outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "1"}, execution_count=1)])
    setup_cell = nbformat.v4.new_code_cell("1", execution_count=1, metadata={"tags": ["hide-input"]})
    ending = nbformat.v4.new_markdown_cell("# T\n\n## Summary\n\n- it ran\n\n## Exercises\n\n1. run it")
    good = write("good.ipynb", [setup_cell, ok_cell, ending])
    stripped = write("stripped.ipynb", [nbformat.v4.new_code_cell("1")])
    stderr = write("stderr.ipynb", [nbformat.v4.new_code_cell("1", execution_count=1, outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="warning")])])
    kernel = write("kernel.ipynb", [ok_cell], kernel="venv")
    error = write("error.ipynb", [nbformat.v4.new_code_cell("1/0", execution_count=1, outputs=[
        nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])])])
    tool = [sys.executable, str(ROOT / "tools" / "check_notebooks.py")]
    assert subprocess.run(tool + [good], capture_output=True).returncode == 0
    for bad, why in ((stripped, "not executed"), (stderr, "stderr"), (kernel, "kernel"), (error, "stored an error")):
        run = subprocess.run(tool + [bad], capture_output=True, text=True)
        assert run.returncode == 1 and why in run.stdout, run.stdout


def test_check_notebooks_flags_house_style(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    tool = [sys.executable, str(ROOT / "tools" / "check_notebooks.py")]
    setup_cell = nbformat.v4.new_code_cell("1", execution_count=1, metadata={"tags": ["hide-input"]})
    ending = nbformat.v4.new_markdown_cell("## Summary\n\n- x\n\n## Exercises\n\n1. y")
    table_md = "| a | b |\n|---|---|\n| 1 | 2 |"
    numbered = (":::{table} A caption.\n:name: ch9-tab-a\n\n```{glue:md} ch9-tab-a\n:format: gfm\n```\n:::\n\n"
                "```{glue:figure} ch9-fig-a\n:name: \"ch9-fig-a\"\n\nA figure.\n```\n")

    def run(*cells, setup=setup_cell):
        nb = nbformat.v4.new_notebook(cells=[setup, *cells])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        path = tmp_path / "nb.ipynb"
        nbformat.write(nb, path)
        return subprocess.run(tool + [str(path)], capture_output=True, text=True)

    cites = nbformat.v4.new_markdown_cell("See {numref}`ch9-tab-a` and {numref}`Fig. %s <ch9-fig-a>`.")
    assert run(nbformat.v4.new_markdown_cell(numbered), cites, ending).returncode == 0
    cases = [
        ((nbformat.v4.new_markdown_cell(numbered), ending), "'ch9-tab-a' is never cited"),
        ((nbformat.v4.new_markdown_cell(numbered.replace(":name: ch9-tab-a\n", "")), cites, ending), "without :name:"),
        ((nbformat.v4.new_markdown_cell("text\n\n" + table_md), ending), "outside a numbered {table}"),
        ((nbformat.v4.new_code_cell("t", execution_count=2, outputs=[nbformat.v4.new_output(
            "display_data", {"text/markdown": table_md, "text/plain": "t"})]), ending), "prints a Markdown table"),
        ((nbformat.v4.new_code_cell("p", execution_count=2, outputs=[nbformat.v4.new_output(
            "stream", name="stdout", text="x" * 89 + "\n")]), ending), "89 characters"),
        ((nbformat.v4.new_markdown_cell("## Exercises\n\n1. y\n\n## Summary\n\n- x"),), "must end with '## Summary'"),
    ]
    for cells, why in cases:
        out = run(*cells)
        assert out.returncode == 1 and why in out.stdout, (why, out.stdout)
    out = run(ending, setup=nbformat.v4.new_code_cell("1", execution_count=1))
    assert out.returncode == 1 and "set-up cell" in out.stdout
    prose = nbformat.v4.new_markdown_cell("Here `fake_quant` rounds; `calib.mse` searches.\n\n```python\nfake_quant(x)\n```")
    out = run(prose, ending)
    assert out.returncode == 1 and "`fake_quant` in the prose is plain code" in out.stdout, out.stdout
    assert "{py:func}`calib.mse <refimpl.calib.mse.mse>`" in out.stdout, out.stdout
    path = tmp_path / "nb.ipynb"
    fixed = subprocess.run(tool + ["--link-api", str(path)], capture_output=True, text=True)
    assert fixed.returncode == 0 and "2 refimpl names linked" in fixed.stdout, fixed.stdout
    text = path.read_text()
    assert "{py:func}`fake_quant <refimpl.quant.functional.fake_quant>`" in text
    assert "fake_quant(x)" in text            # code blocks are left alone


def test_make_test_runs_the_docstring_examples():
    recipe = (ROOT / "Makefile").read_text().split("\ntest-package:")[1].split("\n\n")[0]
    assert "--doctest-modules refimpl" in recipe
    examples = [p for p in (ROOT / "refimpl").rglob("*.py") if ">>> " in p.read_text()]
    assert examples, "no docstring example to run"


def test_progress_bars_obey_tqdm_disable(monkeypatch):
    import io

    from refimpl._progress import progress_bar

    for value, shown in (("1", False), ("true", False), ("", True), ("0", True)):
        monkeypatch.setenv("TQDM_DISABLE", value)
        err = io.StringIO()
        for _ in progress_bar(range(3), True, file=err):
            pass
        assert bool(err.getvalue()) == shown, value
        err = io.StringIO()
        for _ in progress_bar(range(3), False, file=err):
            pass
        assert err.getvalue() == ""

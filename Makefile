# The two commands of the README: `make book` and `make test`. Everything else is a step of those.
SHELL   := /bin/bash
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
NB      := $(sort $(wildcard chapters/*.ipynb))
NBVAL   := $(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with nbval_sanitize.cfg

# Determinism of everything a chapter prints (see ../shared/book-recipe.md §6 and README):
# the kernels inherit these, so stored outputs are reproducible under strict nbval.
export PYTHONHASHSEED      := 0
export TQDM_DISABLE        := 1
export OMP_NUM_THREADS     := 1
export MKL_NUM_THREADS     := 1
export ATEN_CPU_CAPABILITY := avx2
export MKL_CBWR            := AVX2

.PHONY: setup test test-package test-notebooks check-notebooks book outputs bench clean

setup: $(STAMP)            ## create .venv: torch==2.13.0 (CPU wheel) first, then the project pinned

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq torch==2.13.0
	$(PY) -m pip install -qq -c constraints.txt -e ".[test,book]"
	$(PY) -c "import matplotlib.pyplot"   # build the font cache now, not inside a chapter
	touch $(STAMP)

test: test-package check-notebooks test-notebooks   ## pytest, then strict nbval on every chapter

test-package: setup
	$(PY) -m pytest tests

test-notebooks: setup
	$(NBVAL) chapters

check-notebooks: setup     ## every chapter executed, python3 kernel, no stderr, no stored error
	$(PY) tools/check_notebooks.py $(NB)

book: setup                ## execute every chapter afresh and build the HTML into _build/html
	rm -rf _build
	$(VENV)/bin/jupyter-book build . --all -W -n --keep-going

outputs: setup             ## re-execute the chapters in place (review `git diff`, then commit)
	$(PY) tools/run_notebooks.py $(NB)

bench: setup               ## speed figures, each a ratio against its reference in one run
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf _build

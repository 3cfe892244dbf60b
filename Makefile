# The two commands of the README: `make book` and `make test`. Everything else is a step of those.
SHELL   := /bin/bash
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
NB      := $(sort $(wildcard chapters/*.ipynb))
NBVAL   := $(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with nbval_sanitize.cfg
# pytest-xdist: tests and chapters run on $(JOBS) workers (`make test JOBS=0`: in one process).
# Chapters use `--dist loadfile`, one kernel per chapter (plain `--dist load` scatters a chapter's
# cells over kernels and breaks nbval), handed out newest first, the heaviest chapters being the
# last ones: the long chapters start at once on different workers and the short ones fill in
# behind them (xdist's default order, most cells first, would start the long ones last).
JOBS    ?= 2
NB_HEAVY_FIRST := $(shell printf '%s\n' $(NB) | sort -r)

# The numerics configuration (refimpl/numerics.py, the one place that defines it), exported to
# every command below: the chapters' kernels, pytest and its workers inherit it. On x86-64 it makes
# every printed number bit-identical on any CPU with AVX2 (README, "Reproducibility").
NUMERICS_MK := $(VENV)/numerics.mk
$(NUMERICS_MK): refimpl/numerics.py
	@mkdir -p $(VENV) && $(PYTHON) refimpl/numerics.py --make > $@.tmp && mv $@.tmp $@
include $(NUMERICS_MK)
export TQDM_DISABLE := 1
X86_64 := $(filter x86_64 amd64 AMD64,$(shell uname -m))

.PHONY: setup warm-cache platform test test-package test-notebooks check-notebooks book book-fresh outputs check-book bench levers clean

setup: $(STAMP)            ## create .venv: torch==2.13.0 (CPU wheel) first, then the project pinned

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq torch==2.13.0
	$(PY) -m pip install -qq -c constraints.txt -e ".[test,book]"
	$(PY) -c "import matplotlib.pyplot"   # build the font cache now, not inside a chapter
	touch $(STAMP)

test: platform test-package check-notebooks test-notebooks   ## pytest, then strict nbval on every chapter

platform:                  ## say up front whether this platform reproduces the stored chapters bit for bit
ifneq ($(X86_64),)
	@echo "make test: x86-64: the chapters' stored outputs must reproduce bit for bit (strict nbval)"
else
	@echo "make test: $$(uname -m) is not x86-64: the stored chapters do not reproduce bit for bit here;" \
	      "their numbers are compared within 5 % (README, Reproducibility)"
endif

# The chapters' trained FP32 models (refimpl.zoo memoizes them in .cache/), in two processes of
# about equal work: MNIST-1D MobileNetV2 (3 seeds, ~35 s each) in one, the 9 others in the other.
# Chapters running side by side on a cold cache would each train the same models; once cached,
# this loads them in seconds.
WARM_JOBS := "[('mnist1d', 'mobilenetv2', s) for s in (0, 1, 2)]" \
             "[(d, a, s) for d in ('mnist1d', 'digits') for a in ('resnet', 'mobilenetv2') for s in (0, 1, 2) if (d, a) != ('mnist1d', 'mobilenetv2')]"
warm-cache: setup
	@pids=; for jobs in $(WARM_JOBS); do \
	  $(PY) -c "from refimpl.book import setup; setup(); from refimpl.zoo import pretrained; \
	            [pretrained(d, a, s) for d, a, s in $$jobs]" & \
	  pids="$$pids $$!"; \
	done; for p in $$pids; do wait $$p || exit 1; done

test-package: setup warm-cache
	$(PY) -m pytest -n $(JOBS) --doctest-modules refimpl tests

# On x86-64 strict nbval: every printed character as stored. Elsewhere (ARM64, macOS) float results
# differ in the last digits, so chapters are executed and their numbers compared within a stated
# tolerance instead (tools/compare_notebooks.py; README, "Reproducibility").
test-notebooks: setup warm-cache
ifneq ($(X86_64),)
	$(NBVAL) -n $(JOBS) --dist loadfile --no-loadscope-reorder $(NB_HEAVY_FIRST)
else
	@echo "test-notebooks: $$(uname -m) is not x86-64, whose results the stored chapters reproduce bit for bit:" \
	      "comparing every number within a tolerance instead of strict nbval (README, Reproducibility)"
	$(PY) tools/compare_notebooks.py --jobs $(JOBS) $(NB_HEAVY_FIRST)
endif

check-notebooks: setup     ## every chapter executed, python3 kernel, no stderr, no stored error
	$(PY) tools/check_notebooks.py $(NB)

# The book shows the chapters' stored outputs (_config.yml: execute_notebooks off), the ones
# `make test` proves a fresh execution reproduces; `make book-fresh` computes them again first.
define build-book
	@start=$$SECONDS; rm -rf _build; \
	$(VENV)/bin/jupyter-book build . --all -W -n --keep-going --quiet && \
	echo "book: built _build/html/index.html from the chapters' stored outputs, not re-executed ($$((SECONDS - start)) s; make book-fresh computes them afresh)"
endef
book: setup                ## build the HTML into _build/html from the stored chapter outputs
	$(build-book)

book-fresh: outputs book   ## re-execute every chapter in place (both cores), then build the HTML

# The built book as a reader sees it, in headless Chromium (Debian's chromium; tools/check_book.py):
# fails on raw TeX or MyST left in the text, MathJax not rendering, any request outside the book,
# a missing file, a table, output or image clipped at 1400 px, an image wider than a 420 px screen;
# writes screenshots to _build/screenshots/ and prints each page's weight. Builds the book first
# only when it is missing or older than its sources.
BOOK_SRC := $(NB) $(filter-out README.md,$(wildcard *.md)) _config.yml _toc.yml references.bib $(wildcard _ext/*.py)
_build/html/index.html: $(BOOK_SRC) | setup
	$(build-book)

check-book: setup _build/html/index.html   ## check the built book in headless Chromium, screenshots, page weights
	$(PY) tools/check_book.py _build/html

outputs: setup warm-cache  ## re-execute the chapters in place on $(JOBS) kernels (review `git diff`, commit)
	@start=$$SECONDS; $(PY) tools/run_notebooks.py --jobs $(JOBS) $(NB_HEAVY_FIRST) && \
	echo "outputs: re-executed $(words $(NB)) chapters in place ($$((SECONDS - start)) s); git diff shows what changed"

bench: setup               ## speed figures, each a ratio against its reference in one run
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

levers: setup              ## which results each numerics lever and knob moves on this CPU
	$(PY) tools/numerics_levers.py tiny

clean:
	rm -rf _build

# `make demo` and `make test` do all set-up on a fresh machine: a project virtual environment in .venv,
# torch 2.14.1 / torchvision 0.29.1, the requirements and this package (editable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.densevlm-installed
PYTEST_ARGS ?=

.PHONY: install demo test quick-demo bench clean

install: $(STAMP)

$(STAMP): setup.py requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(VENV)/bin/densevlm demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# detectron2 (optional; densevlm.integrations.detectron2): D2_FROM=auto builds upstream from GitHub when it answers,
# else (offline, CI) unpacks the pure-Python package of PyPI's sal-detectron2 wheel; see tools/install_detectron2.sh.
D2_FROM ?= auto
.PHONY: detectron2
detectron2: install
	bash tools/install_detectron2.sh $(PY) $(D2_FROM)

bench: install
	$(PY) tools/bench_toyworld.py

clean:
	rm -rf runs outputs .pytest_cache

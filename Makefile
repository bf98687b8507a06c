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

# detectron2 first (the pure-Python wheel route, never a compile; instant when already there): without it the two
# detectron2 test modules skip, and one line after the run says so and how to run them.
D2_TESTS := tests/test_detectron2.py tests/test_detection.py
test: install
	@bash tools/install_detectron2.sh $(PY) ensure || echo "detectron2 could not be installed (no PyPI?); see above"
	@$(PY) -m pytest -q $(PYTEST_ARGS) tests; status=$$?; \
	bash tools/install_detectron2.sh $(PY) check || echo "SKIPPED: every test in $(D2_TESTS) (detectron2 is not \
	installed); run them with: make detectron2 && $(PY) -m pytest -q $(D2_TESTS)"; exit $$status

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

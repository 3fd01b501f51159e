# Every target sets itself up: a fresh machine needs only Python 3.10+ and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A second environment with transformers 5.x, for the parity tests against the newer reference.
VENV5 ?= .venv-tf5
PY5 := $(VENV5)/bin/python
# The CPU build of torch; a bare `pip install torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-tf5 demo test test-tf5 test-slow bench clean

MAIN_EXTRAS := test,onnx,plot

# $(call make_venv,FOLDER,EXTRAS): a virtual environment with torch and megabert[EXTRAS].
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install -q -e ".[$(2)]"
	touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml
	$(call make_venv,$(VENV),$(MAIN_EXTRAS))

setup: $(VENV)/.installed

$(VENV5)/.installed: pyproject.toml
	$(call make_venv,$(VENV5),test-tf5)

setup-tf5: $(VENV5)/.installed

demo: setup
	$(PY) -m megabert.demo

# The whole suite beside transformers 4.37.2, then the `reference` tests beside transformers 5.x.
test: setup setup-tf5
	$(PY) -m pytest -q -m "not slow"
	$(PY5) -m pytest -q -m "reference and not slow"

test-tf5: setup-tf5
	$(PY5) -m pytest -q -m "reference and not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) benchmarks/inference.py --quick

clean:
	rm -rf $(VENV) $(VENV5) build *.egg-info src/*.egg-info

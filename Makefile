# One command each: `make repro` sets up and runs the embedded suite; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test bench lint clean-venv

setup: $(VENV)/.installed

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml (pip takes them from the local wheel cache when present).
# No -q: torch alone takes minutes to install, and pip's "Collecting ..." lines show it is alive.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m benchmarks --quick

clean-venv:
	rm -rf $(VENV)

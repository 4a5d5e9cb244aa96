# One command each: `make repro` sets up and runs the embedded suite; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test bench lint clean-venv plots-template

setup: $(VENV)/.installed

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml (pip takes them from the local wheel cache when present).
# No -q: torch alone takes minutes to install, and pip's "Collecting ..." lines show it is alive.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

# Params are validated first: `dvc repro` deletes a stage's outputs before the stage can refuse a bad value.
repro: setup
	$(PY) -m piggyback.cli check-params params.yaml
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m benchmarks --quick

clean-venv:
	rm -rf $(VENV)

# `dvc plots show` writes a page that loads vega from a CDN (blank offline); .dvc/config points it at
# .dvc/plots/offline.html instead, which inlines the versions DVC's own page asks for (BSD-3-Clause,
# licences in .dvc/plots/VEGA_LICENSES). Rebuild it with `make plots-template` (needs npm).
VEGA_PACKAGES := vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
plots-template:
	rm -rf .dvc/plots/.npm && mkdir -p .dvc/plots/.npm
	cd .dvc/plots/.npm && npm pack --silent $(VEGA_PACKAGES) && for f in *.tgz; do tar xzf $$f && mv package $${f%.tgz}; done
	{ printf '<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<meta charset="utf-8">\n<title>DVC plots (offline)</title>\n'; \
	  for js in vega-5.20.2/build/vega vega-lite-5.2.0/build/vega-lite vega-embed-6.18.2/build/vega-embed; do \
	    printf '<script>\n'; cat .dvc/plots/.npm/$$js.min.js; printf '\n</script>\n'; done; \
	  printf '<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n'; \
	} > .dvc/plots/offline.html
	for p in vega-5.20.2 vega-lite-5.2.0 vega-embed-6.18.2; do echo "== $$p"; cat .dvc/plots/.npm/$$p/LICENSE; done \
	  > .dvc/plots/VEGA_LICENSES
	rm -rf .dvc/plots/.npm

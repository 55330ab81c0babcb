# Fresh machine -> a virtual environment with the CPU torch pin (constraints-cpu.txt), no torchvision.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints-cpu.txt
STAMP := $(VENV)/.diffcache-installed

.PHONY: setup demo test test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PY) -m pip install -q --no-deps lpips  # lpips pulls torchvision otherwise (see README)
	touch $@

demo: $(STAMP)
	$(VENV)/bin/diffcache demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/dit_step_cache.py

clean:
	rm -rf $(VENV) out *.egg-info

# Fresh machine -> a virtual environment with the exact versions of requirements-lock.txt
# (CPU torch pin first, no torchvision). `make lock` regenerates the lock; `make test-latest`
# runs the suite against the newest versions pyproject.toml's ranges allow.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffcache-installed
LOCK := requirements-lock.txt
PIN := -c constraints-cpu.txt
# pip-compile flags: every dependency (build backend included) against the CPU torch pin
COMPILE := --extra dev $(PIN) --all-build-deps --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links

.PHONY: setup demo test test-all test-latest lint bench mutation lock clean

setup: $(STAMP)

# install(venv, requirement args): torch from its local CPU wheel first, then the rest, then us
define install
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q $(PIN) torch==2.13.0
	$(1)/bin/python -m pip install -q $(PIN) $(2)
	$(1)/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
endef

$(STAMP): pyproject.toml setup.py constraints-cpu.txt $(LOCK) requirements-nodeps.txt
	$(call install,$(VENV),-r $(LOCK))
	touch $@

demo: $(STAMP)
	$(VENV)/bin/diffcache demo --out out/demo

# Two pytest-xdist workers, a test file each at a time, one torch thread each (2 cores busy).
XDIST := -n 2 --dist loadfile

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest $(XDIST)

test-all: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest $(XDIST) -m "slow or not slow"

# The newest versions the ranges allow, in a separate environment: the next upstream break
# shows up here first. Its versions are written to out/test-latest-versions.txt.
test-latest:
	rm -rf .venv-latest
	$(call install,.venv-latest,--upgrade setuptools wheel -e ".[dev]")
	@mkdir -p out && .venv-latest/bin/python -m pip freeze --exclude-editable \
		> out/test-latest-versions.txt
	OMP_NUM_THREADS=1 .venv-latest/bin/python -m pytest $(XDIST)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/dit_step_cache.py

# Mutation testing (slow, not in CI): every module of bench/mutation_targets.tsv, or MODULE=path;
# resumable, survivors in out/mutation/survivors.md. mutmut comes from the `mutation` extra.
mutation: $(VENV)/.mutation-installed
	$(PY) bench/mutation.py $(if $(MODULE),--module $(MODULE))

$(VENV)/.mutation-installed: $(STAMP)
	$(PY) -m pip install -q $(PIN) --no-build-isolation -e ".[mutation]"
	touch $@

# Regenerate requirements-lock.txt with pip-tools (pinned here) at the newest versions allowed.
lock:
	python3 -m venv .venv-tools
	.venv-tools/bin/python -m pip install -q pip-tools==7.7.0
	.venv-tools/bin/pip-compile -q --upgrade $(COMPILE) -o $(LOCK) pyproject.toml

clean:
	rm -rf $(VENV) .venv-latest .venv-tools out *.egg-info

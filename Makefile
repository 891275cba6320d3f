# Two commands on a fresh machine: `make demo` and `make test`. Each bootstraps .venv from
# requirements.lock (exact versions) and installs the project editable.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-zo test test-all test-fast bench bench-full docs lock clean

$(STAMP): requirements.lock pyproject.toml contracts/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@# solc (to check the contract artifacts) and anvil (a real chain for the tests), from npm, at the
	@# lock file's versions; not `npm ci`: npm 11 leaves anvil's other-platform packages out of the
	@# lock and then refuses it
	if command -v npm >/dev/null; then npm install --prefix contracts --no-save --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the contract rebuild and anvil tests will be skipped"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/simulation/run_demo.py --preset lora

demo-zo: $(STAMP)
	$(PY) examples/simulation/run_demo.py --preset zo

test: $(STAMP)
	$(PY) -m pytest -m "not heavy"

# also the heavy tier: the deployment's other methods, a killed DPO run's resume (paths the other
# tiers cover in process or in simulation)
test-all: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not gguf"

bench: $(STAMP)
	$(PY) bench/suite.py
	$(PY) bench/readme.py

bench-full: $(STAMP)
	$(PY) bench/simulation_overhead.py
	$(PY) bench/zo.py
	$(PY) bench/compression.py
	$(PY) bench/ledger.py
	$(PY) bench/client_start.py
	$(PY) bench/robustness.py
	$(PY) bench/quality.py
	$(PY) bench/diloco.py
	$(PY) bench/aggregation.py
	$(PY) bench/scale.py
	$(PY) bench/adapters.py
	$(PY) bench/dpo.py
	$(PY) bench/secagg.py
	$(PY) bench/gpu.py
	$(PY) bench/readme.py

# the documentation site (mkdocs.yml), into build/site; --strict fails on any warning (a broken link,
# a page missing from the nav); docs/hooks.py generates the configuration reference from the code
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

lock: $(STAMP)
	head -3 requirements.lock > requirements.lock.new
	$(PY) -m pip freeze --all --exclude-editable | sed 's/+cpu$$//' >> requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) runs .pytest_cache

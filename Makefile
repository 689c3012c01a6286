# Every target builds .venv itself, so each works on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test check bench lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[server,dev,ray]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	VQSEARCH_DEMO=$${VQSEARCH_DEMO:-1} $(BIN)/python -m vqsearch serve

# tests/ray in a network namespace with loopback only (see tests/ray/conftest.py); as root
test: $(STAMP)
	$(BIN)/python -m pytest -q --ignore=tests/ray
	@if unshare -n true 2>/dev/null && command -v ip >/dev/null; then \
	    unshare -n sh -c 'ip link set lo up && exec $(BIN)/python -m pytest -q tests/ray'; \
	else echo "tests/ray not run: they need a network namespace (root, unshare, ip)" >&2; fi

check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

bench: $(STAMP)
	$(BIN)/python bench/exact.py --out bench/results/exact.md
	$(BIN)/python bench/small.py --out bench/results/exact_small.md
	$(BIN)/python bench/tradeoff.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/workers.py

# requirements.lock: the server's dependencies pinned, as the Docker image installs them
lock:
	rm -rf .lockvenv && $(PY) -m venv .lockvenv
	.lockvenv/bin/pip install -q -c constraints.txt ".[server]"
	(echo "# Server dependencies, pinned: what the Docker image installs (make lock regenerates it)."; \
	 .lockvenv/bin/pip freeze --exclude-editable | grep -v '^vqsearch' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/') > requirements.lock
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

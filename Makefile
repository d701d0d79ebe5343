# Every target creates .venv on first use; `make install` is a no-op when pyproject.toml is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Keep Prefect's local SQLite API and settings inside the checkout (the embedded default).
export PREFECT_HOME ?= $(CURDIR)/.prefect
# A local API's first start creates and migrates its SQLite database: ~25 s on 2 busy cores, over
# Prefect's 20 s default wait. Install migrates it ahead of time, and every local API start waits
# this long (flows/_common.py: API_STARTUP_TIMEOUT_S, which the code also enforces).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 600

.PHONY: install run test lint bench gpu-bench clean audit report-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@echo "migrating Prefect's database in $(PREFECT_HOME) (once; tests/test_cold_start.py runs this line)"
	$(VENV)/bin/prefect --no-prompt server database upgrade -y
	touch $(STAMP)

install: $(STAMP)

# The library's log lines (per-epoch training, ingest) go to each flow run's logs; the synthetic
# data step runs outside any flow, so its lines stay on the console only.
run: $(STAMP)
	PREFECT_LOGGING_EXTRA_LOGGERS=dala_model PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore \
	$(PY) -m flows.main $(if $(DATA),--data $(DATA)) $(if $(ROOT),--root $(ROOT)) $(if $(PROFILE),--profile $(PROFILE)) $(if $(NO_PRETRAINED),--no-pretrained)

test: $(STAMP)
	$(VENV)/bin/ruff check dala_model flows tests bench
	$(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check dala_model flows tests bench
	$(VENV)/bin/ruff format --check dala_model flows tests bench

# Open the HTML report in headless Chromium (apt-get install chromium): every image loads, no
# console errors, no horizontal scroll at 1366 px; saves reports/report.png beside it.
report-check: $(STAMP)
	$(PY) -m dala_model.report.browser $(or $(ROOT),data/quick/root)/reports/report.html

# Known-vulnerability check of the pinned dependencies (constraints.txt); needs PyPI/OSV access.
audit: $(STAMP)
	$(VENV)/bin/pip-audit --strict -r constraints.txt

clean:
	rm -rf $(VENV) .prefect data .pytest_cache

# CPU benchmark suite (not part of `make test`): writes bench/results/latest.json. BENCH_QUICK=1 for tiny sizes.
bench: $(STAMP)
	$(PY) -m bench.run

# The GPU benchmark on a CUDA machine (see bench/RESULTS.md for the command used on a bare GPU host).
gpu-bench: $(STAMP)
	$(PY) -m bench.gpu --out bench/results/gpu.json

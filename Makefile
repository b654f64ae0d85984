# Two commands from a fresh clone:  make reproduce   and   make test
# Both create .venv if it is missing and install the pinned environment (requirements/lock.txt) first.
PYTHON   ?= python3.11
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
# Real data beside the checkout (as in CI) is used when MDBENCH_DATA_DIR is not set.
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(MDBENCH_DATA_DIR),)
  ifneq ($(wildcard $(SHARED_DATA)),)
    export MDBENCH_DATA_DIR := $(SHARED_DATA)
  endif
endif
# make reproduce runs the embedded default: real data (cpu profile) if there is some, else synthetic (smoke).
PROFILE  ?= $(if $(MDBENCH_DATA_DIR),cpu,smoke)
PAPER    ?=
JOBS     ?= 1

.PHONY: reproduce compare test unit test-gpu nbval lint doctor clean-venv execute-notebooks report browser

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements/lock.txt -e ".[test]"
	touch $(STAMP)

$(VENV): $(STAMP)

# Outputs go to a new run folder runs/<UTC stamp>-<profile>/; UPDATE_REFERENCE=1 refreshes the committed results/.
UPDATE_REFERENCE ?=
reproduce: $(STAMP)
	$(BIN)/mdbench reproduce --profile $(PROFILE) --jobs $(JOBS) $(foreach p,$(PAPER),--paper $(p)) \
		$(if $(UPDATE_REFERENCE),--update-reference)

# Does a rerun agree with the reference?  make compare RUN=runs/<stamp>-<profile>  (REF defaults to results)
REF ?= results
RUN ?=
compare: $(STAMP)
	@test -n "$(RUN)" || { echo "make compare needs RUN=<run folder>, e.g. RUN=runs/20260101T000000Z-cpu"; exit 2; }
	$(BIN)/mdbench compare $(REF) $(RUN) $(foreach p,$(PAPER),--paper $(p))

test: $(STAMP) lint unit nbval

unit: $(STAMP) browser
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

# Debian's chromium and its driver, for the report's browser test (tests/test_report_browser.py): a no-op where they
# are installed; where apt-get cannot install them (not Debian, not root) a note, and that test skips saying why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "note: no /usr/bin/chromium or /usr/bin/chromedriver, and apt-get cannot install them here"; fi

# The static results site for reviewers (claim tallies, tables, figures, executed notebooks), offline: build/report/.
report: $(STAMP)
	$(BIN)/mdbench report

# ruff (pyflakes, isort, bugbear, pyupgrade, public docstrings) and mypy, as configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Every paper's fit/predict/evaluate path on CUDA (mixed precision) against the CPU; needs a GPU. make test runs
# these too, and they skip where there is no GPU.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest tests/gpu -m cuda -q -p no:cacheprovider -rs

# The committed notebooks carry their smoke-profile outputs; nbval re-runs them and compares the checked cells.
# Their records go to a scratch folder so a test run never touches results/.
nbval: $(STAMP)
	MDBENCH_RESULTS_DIR=$$(mktemp -d) $(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 600 notebooks

# Re-execute the committed notebooks in place at the smoke profile (after changing a notebook or the code).
execute-notebooks: $(STAMP)
	MDBENCH_RESULTS_DIR=$$(mktemp -d) $(BIN)/mdbench execute-notebooks

doctor: $(STAMP)
	$(BIN)/mdbench doctor

clean-venv:
	rm -rf $(VENV)

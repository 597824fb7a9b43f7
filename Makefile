# The two commands a new user needs: `make demo` (the main job) and `make test`.
# Both install first, from the lock (constraints.txt: the exact versions the suite last passed with).
# Installing is idempotent: a stamp records the hash of what the install depends on (pyproject.toml,
# setup.py, csrc/, the lock, the Python running it), so a repeat `make test` starts testing within seconds
# and the C++ extension is rebuilt only when one of them changed.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := build/.installed
# `make install CONSTRAINTS=` installs the newest releases pyproject.toml admits instead of the lock
CONSTRAINTS ?= constraints.txt
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lock bench lint gpu-check docs docs-check

install:
	@# torch and torchvision only when missing, pinned to the project's pair (open_clip needs torchvision):
	@# an existing pair (a CPU build, say) is kept, so the lock leaves torch and its CUDA wheels out
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install --quiet $(TORCH_PAIR)
	@state="$$( { $(PYTHON) -c 'import sys, torch; print(sys.executable, torch.__version__)'; echo "$(CONSTRAINTS)"; \
		cat pyproject.toml setup.py pyfuse/_build.py csrc/* $(CONSTRAINTS); } | sha256sum | cut -d' ' -f1)"; \
	if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$$state" ] && $(PYTHON) -c "import pyfuse._C" 2>/dev/null; then \
		echo "make install: up to date (pyproject.toml, setup.py, csrc/, $(or $(CONSTRAINTS),no lock) unchanged)"; \
	else \
		rm -f $(STAMP); \
		$(PIP) install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) "setuptools>=77" && \
		$(PIP) install --quiet --no-build-isolation $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]" && \
		mkdir -p build && echo "$$state" > $(STAMP); \
	fi

# the embedded real benchmark end to end; DEMO_ARGS passes options, e.g. make demo DEMO_ARGS=--quick
demo: install
	$(PYTHON) -m pyfuse demo $(DEMO_ARGS)

# pytest exits 5 when it collected nothing: that is a failure here, said in words
test: install
	@$(PYTHON) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

# Regenerate the lock: a fresh virtualenv takes the newest releases pyproject.toml admits, the whole suite
# runs there, and only if it passes are their exact versions written to constraints.txt (torch and the
# CUDA wheels it brings stay out: the torch pair is installed by its own rule above).
lock:
	@set -e; dir="$$(mktemp -d)"; trap 'rm -rf "$$dir"' EXIT; \
	$(PYTHON) -m venv "$$dir/venv"; \
	$(MAKE) --no-print-directory test PYTHON="$$dir/venv/bin/python" CONSTRAINTS= STAMP="$$dir/installed"; \
	{ echo "# The exact versions the suite last passed with: written by 'make lock', read by 'make install'."; \
	  echo "# Python $$("$$dir/venv/bin/python" -c 'import platform; print(platform.python_version())'), $$(date -u +%Y-%m-%d);" \
	       "torch and torchvision are pinned by the Makefile ($(TORCH_PAIR)), their CUDA wheels follow torch."; \
	  "$$dir/venv/bin/python" -m pip freeze --all --exclude-editable | grep -viE '^(torch==|torchvision==|nvidia-|cuda-)'; \
	} > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt && echo "make lock: constraints.txt written"

bench: install
	$(PYTHON) benchmarks/bench_concrete_merge.py --sizes 1M,8M --json bench_concrete_merge.json

# the generated parts of README.md and docs/*.md: result tables from docs/results/*.json, reference text from
# the code (docs/render.py says which); docs-check writes nothing and fails when a file is out of date
docs:
	$(PYTHON) docs/render.py

docs-check:
	$(PYTHON) docs/render.py --check

lint:
	$(PYTHON) -m ruff check .

# On a CUDA machine without network, with its own torch and triton: any wheel carried in wheels/ (e.g. nvtx;
# benchmarks/gpu_check.py says how to fetch them), the project without dependencies, then the check (under 8
# minutes; without CUDA it is a dry run at tiny sizes). GPU_CHECK_ARGS passes options, e.g. --json PATH.
gpu-check:
	@if ls wheels/*.whl >/dev/null 2>&1; then $(PIP) install --quiet --no-index --no-deps wheels/*.whl; fi
	@# the script imports pyfuse from this checkout either way; a failed install costs only the prebuilt extension
	$(PIP) install --quiet --no-deps --no-build-isolation -e . || \
		echo "make gpu-check: the install failed; running from the checkout (the C++ backend builds on first use)"
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

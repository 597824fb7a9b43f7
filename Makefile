# The two commands a new user needs: `make bench` (the main job for now) and `make test`.
# Both install first; installing is idempotent and never pulls a CUDA build of torch.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test bench lint

install:
	# torch first, pinned to the local CPU build, so the C++ extension builds against it in place
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --no-build-isolation -e ".[dev]"

# pytest exits 5 when it collected nothing: that is a failure here, said in words
test: install
	@$(PYTHON) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

bench: install
	$(PYTHON) benchmarks/bench_concrete_merge.py --sizes 1M,8M --json bench_concrete_merge.json

lint:
	$(PYTHON) -m ruff check .

# The two commands a new user needs: `make demo` (the main job) and `make test`.
# Both install first; installing is idempotent and never pulls a CUDA build of torch.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench lint

install:
	# torch and torchvision first, pinned to the pair on this machine's disk (open_clip needs torchvision),
	# so the C++ extension builds against them in place and nothing fetches another build
	$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --no-build-isolation -e ".[dev]"

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

# make demo | make test: each creates .venv when missing and installs what it needs there.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.lorakern-installed
export CUDA_HOME ?= /usr/local/cuda

.PHONY: demo test test-default test-interpret check cuda gpu-check bench bench-compare methods clean

$(STAMP): pyproject.toml setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m lorakern.cli demo

check: $(STAMP)
	$(VPY) -m lorakern.cli check

# compile and link the CUDA extension (no GPU needed: a CUDA build of torch plus nvcc); prints its path
cuda: $(STAMP)
	$(VPY) -m lorakern.extension build cuda

test: test-default test-interpret

test-default: $(STAMP)
	$(VPY) -m pytest -q -m "not gpu and not interpret"

test-interpret: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -m interpret

# On a GPU machine whose system python already has torch, triton and the test packages:
# no venv, no installs. Without torch or a CUDA GPU it says which and fails (a CPU run would only skip).
gpu-check:  # the gpu tier only; bash bench/gpu_run.sh quick: the default paths' tier and the benchmark in 10 min
	@$(PYTHON) bench/need_torch.py --cuda "make gpu-check"
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest -q -m "gpu" tests

# the CPU benchmark suite with its gates, then lorakern bench --quick on the best device here (targets
# marked UNMET, gates checked); both run, and the target fails when a gate of either failed
bench: $(STAMP)
	mkdir -p out
	rc=0; $(VPY) -m pytest -q bench/bench_cpu.py || rc=1; \
	$(VPY) -m lorakern.cli bench --quick --json out/bench.json --plot out/bench.png || rc=1; exit $$rc

# On a GPU machine (system python, no installs): a fresh quick run against bench/results/<gpu>.json;
# fails when a lorakern backend is more than 10% slower (median) than the committed figures
bench-compare:
	@$(PYTHON) bench/need_torch.py --cuda "make bench-compare"
	mkdir -p out
	PYTHONPATH=$(CURDIR) $(PYTHON) -m lorakern.cli bench --quick --json out/bench-fresh.json
	PYTHONPATH=$(CURDIR) $(PYTHON) bench/compare.py out/bench-fresh.json

# the method bench: each method on small CPU tasks beside PEFT's, the seed papers' claims (docs/methods.md)
methods: $(STAMP)
	$(VPY) bench/methods.py --out out

clean:
	rm -rf build *.egg-info $(VENV)

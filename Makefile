# Two commands on a fresh machine: `make test` and `make bench`. Each sets itself up first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp
BUILT := $(VENV)/.build.stamp
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/autograd/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cpp csrc/*.h csrc/cpu/*.h)

.PHONY: setup build triton36 test bench bench-quick bench-readme device-dry-run clean

setup: $(STAMP)
$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	touch $(STAMP)

build: $(BUILT)
$(BUILT): $(STAMP) $(SOURCES)
	# flock: several shells may build at once; pip would trip over its own build folder.
	flock /tmp/bigmodel-build.lock env MAX_JOBS=$${MAX_JOBS:-$$(nproc)} $(VPY) -m pip install -q -e . --no-build-isolation --no-deps
	touch $(BUILT)

# The H200's Triton (3.6.0) in a side folder, never on the venv's path: the sm_90 AOT tests
# (bench/sm90.py) compile every config with it as well as with the venv's.
TRITON36 := $(VENV)/triton36
triton36: $(TRITON36)/.stamp
$(TRITON36)/.stamp: $(STAMP)
	rm -rf $(TRITON36)
	$(VPY) -m pip install -q --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

# The whole suite: C++ engine, Triton kernels under the interpreter, sm_90 AOT compiles.
test: build triton36
	$(VPY) -m pytest -q tests

bench: build
	$(VPY) -m bench $(BENCH_ARGS)

bench-quick: build
	$(VPY) -m bench --quick $(BENCH_ARGS)

# The README's results tables, redrawn from the committed runs (one per CPU level; a level is
# run with BENCH_ARGS=--cpu-capability=avx2 and the like).
bench-readme: setup
	for s in bench/results/cpu_*_summary.md; do [ -e $$s ] || continue; $(VPY) -m bench.readme $$s --write README.md || exit 1; done

# Everything bench/device_check.sh does that needs no GPU.
device-dry-run: build
	PYTHON=$(VPY) bash bench/device_check.sh --dry-run bench/out/device_dry_run

clean:
	rm -rf build *.egg-info bigmodel/_C*.so $(BUILT)

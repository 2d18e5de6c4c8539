.PHONY: test test-all test-triton lint bench kernel-check kernel-resources kernel-resources-t36 venv-t36 gpu

test:  # the everyday tier, under 5 minutes on 2 cores: no test that trains a built-in model or runs a whole command
	python -m pytest -m "not slow"
test-all:  # the whole suite, slow tests included: what CI and the README's quick start run
	python -m pytest
test-triton:  # the Triton kernels in the CPU interpreter (every autotune row's case included)
	TRITON_INTERPRET=1 python -m pytest tests/triton
lint:  # ruff (pyproject.toml's rules), then the architecture contracts (.importlinter)
	ruff check utilrank_kernels tests benchmarks
	lint-imports
bench:  # each factored op and model against its dense form on this machine (benchmarks/run.py --list: the rest)
	python benchmarks/run.py factored-ops && python benchmarks/run.py factored-models

# Kernel resources (benchmarks/tools/kernel_resources.py): compiled for sm_80/sm_90 on the CPU, read with cuobjdump.
KERNEL_CHECK = --rows first --representative --models vit_b16,resnet50 --dtypes fp16,fp32 --check
kernel-check:  # what CI runs: first rows, fails on a problem (results in a temporary folder)
	python benchmarks/run.py kernel-resources $(KERNEL_CHECK) --out-dir "$$(mktemp -d)"
# every row, dtype, target, model: benchmarks/results/sm80-sm90_kernel-resources-triton<V>-representative.*;
# --keep-before keeps the committed table's before/after section (KERNEL_BEFORE=old.json: a new one from that report)
KERNEL_BEFORE ?=
KERNEL_RESOURCES = kernel-resources --representative $(if $(KERNEL_BEFORE),--before $(KERNEL_BEFORE),--keep-before)
kernel-resources:
	python benchmarks/run.py $(KERNEL_RESOURCES)
# Triton 3.6 (the GPU machines'): a second venv outside the repo, torch 2.14.1 and triton 3.6.0 without deps
VENV_T36 ?= /work/venv-t36
venv-t36:
	python3 -m venv $(VENV_T36) && $(VENV_T36)/bin/pip install -q torch==2.14.1 && \
	$(VENV_T36)/bin/pip install -q --no-deps triton==3.6.0 safetensors tqdm numpy
kernel-resources-t36:  # the same under Triton 3.6
	$(VENV_T36)/bin/python benchmarks/run.py $(KERNEL_RESOURCES)
gpu:  # on a lent GPU only: its two calls (results under $OUT); `bash benchmarks/gpu_run.sh --dry-run` checks it on a CPU
	bash benchmarks/gpu_run.sh --call 1 && bash benchmarks/gpu_run.sh --call 2

.PHONY: test test-triton lint bench kernel-check kernel-resources kernel-resources-t36 venv-t36 gpu

test:
	python -m pytest
test-triton:
	TRITON_INTERPRET=1 python -m pytest tests/triton
lint:
	ruff check utilrank_kernels tests benchmarks
bench:
	python -m pytest benchmarks --benchmark-enable

# Kernel resources (benchmarks/kernel_resources.py): compiled for sm_80/sm_90 on the CPU, read with cuobjdump.
KERNEL_CHECK = --rows first --representative --models vit_b16,resnet50 --dtypes fp16,fp32 --check
kernel-check:  # what CI runs: first rows, fails on a problem (results in a temporary folder)
	python benchmarks/kernel_resources.py $(KERNEL_CHECK) --out-dir "$$(mktemp -d)"
kernel-resources:  # every row, dtype, target, model: benchmarks/results/kernel-resources-triton<V>-representative.*
	python benchmarks/kernel_resources.py --representative
# Triton 3.6 (the GPU machines'): a second venv outside the repo, torch 2.14.1 and triton 3.6.0 without deps
VENV_T36 ?= /work/venv-t36
venv-t36:
	python3 -m venv $(VENV_T36) && $(VENV_T36)/bin/pip install -q torch==2.14.1 && \
	$(VENV_T36)/bin/pip install -q --no-deps triton==3.6.0 safetensors tqdm
kernel-resources-t36:  # the same under Triton 3.6
	PYTHONPATH=$(CURDIR) $(VENV_T36)/bin/python benchmarks/kernel_resources.py --representative
gpu:  # on a lent GPU only: tests, kernels against cuBLAS and the roofline, ViT-B/16 end to end
	bash benchmarks/gpu_run.sh

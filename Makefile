.PHONY: test test-triton lint bench

test:
	python -m pytest
test-triton:
	TRITON_INTERPRET=1 python -m pytest tests/triton
lint:
	ruff check utilrank_kernels tests benchmarks
bench:
	python -m pytest benchmarks --benchmark-enable

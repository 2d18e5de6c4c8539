"""What the benchmarks share (the row type, result paths) and the tools around them (kernel resources, the GPU run)."""

"""pytest-benchmark suites: one benchmark per (method, shape, tokens, direction) of the CPU table."""

"""Benchmarks: `make bench name=<file name>` runs `python -m benchmarks.<name>`."""

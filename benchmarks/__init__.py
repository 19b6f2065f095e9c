"""Benchmarks: ``python -m benchmarks.<name>`` (output: results/benchmarks)."""

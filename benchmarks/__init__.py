"""Benchmarks: `python -m benchmarks.c1` (workload C1, CPU fp32)."""

"""Benchmarks: `python -m benchmarks.run --workload NAME` (or `softprompt bench`); `--list` names the workloads."""

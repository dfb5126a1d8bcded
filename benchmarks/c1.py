"""Workload C1 (CPU, fp32): an alias of `python -m benchmarks.run --workload C1` (same options).

    python -m benchmarks.c1 [--quick] [--repeats N] [--out DIR|FILE.json] [--profile]
"""

from __future__ import annotations

import sys

from .run import main as run_main


def main(argv: list[str] | None = None) -> int:
    return run_main(["--workload", "C1", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())

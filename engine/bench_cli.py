"""`softprompt bench`: run a registered benchmark workload (the code lives in the repository's `benchmarks/`, which
is not part of the installed package; this module finds it beside an editable install or in the working directory)."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path
from types import ModuleType

from .errors import SoftPromptError


class BenchmarksUnavailable(SoftPromptError):
    """The repository's benchmarks/ directory cannot be found or imported."""


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (shared by `softprompt bench` and `python -m benchmarks.run`)."""
    parser.add_argument("--workload", default="C1", metavar="NAME",
                        help="C1, SERVE-CPU, RAY-CPU (CPU); W1, W2, B560, SERVE-W1 (CUDA); --list describes them "
                             "(default C1)")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run of the workload")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per system, best reported (default 3, 1 with --quick)")
    parser.add_argument("--repeat-budget", type=float, default=20.0, metavar="SECONDS",
                        help="a system stops repeating once its timed runs add up to this, so slow baselines on a "
                             "short GPU lease run once (default 20)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR|FILE.json",
                        help="results directory (default benchmarks/results/), or the JSON file to write; "
                             "the PNG plot goes beside it")
    parser.add_argument("--backend", default="torch", choices=("torch", "triton"), help="engine backend")
    parser.add_argument("--compare-backend", default=None, choices=("torch", "triton"),
                        help="throughput workloads: also time the engine on this backend, as system "
                             "engine_<backend> in the same run (after the baselines; a failure is reported)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated checkpoint here and reuse it on later runs (default: a temp dir)")
    parser.add_argument("--rates", default=None, metavar="R1,R2,...", help="serving workloads: arrival rates (req/s)")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="serving workloads: seconds of arrivals at each rate")
    parser.add_argument("--skip-hf-static", action="store_true",
                        help="do not run the HF static cache + torch.compile baseline (CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="roofline: the device's dense TFLOP/s at the workload's dtype (default: by GPU name)")
    parser.add_argument("--peak-tbps", type=float, default=None,
                        help="roofline: the device's memory bandwidth in TB/s (default: by GPU name)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU workloads: torch threads (default 2, as the published CPU figures; 1 is far less "
                             "disturbed when other processes share a 2-core machine)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one engine run of the workload")
    return parser


def _has_benchmarks(root: Path) -> bool:
    return (root / "benchmarks" / "run.py").is_file()


def load_benchmarks() -> ModuleType:
    """Import `benchmarks.run` from the repository this engine was installed from (editable install), else from
    the working directory; BenchmarksUnavailable says what to do when neither has it."""
    here = Path(__file__).resolve().parents[1]  # the repository root when installed with `pip install -e .`
    roots = [r for r in (here, Path.cwd().resolve()) if _has_benchmarks(r)]
    if not roots:
        raise BenchmarksUnavailable(
            "the benchmarks are not part of the installed package: run `softprompt bench` from a clone of the "
            "repository (its root holds benchmarks/), or install the clone with `pip install -e .`")
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and getattr(loaded, "__file__", None):
        if not any(Path(loaded.__file__).resolve().parent == r / "benchmarks" for r in roots):
            raise BenchmarksUnavailable(f"a different `benchmarks` module is already imported ({loaded.__file__})")
    if str(roots[0]) not in sys.path:
        sys.path.insert(0, str(roots[0]))
    try:
        return importlib.import_module("benchmarks.run")
    except ImportError as exc:
        raise BenchmarksUnavailable(f"cannot import benchmarks from {roots[0]}: {exc}") from exc


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark `args` describe; returns the exit status (2 for a usage error, 1 if a check failed)."""
    command = getattr(args, "command_line", None) or shlex.join(["softprompt", *sys.argv[1:]])
    try:
        bench = load_benchmarks()
    except BenchmarksUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return bench.run_args(args, command)

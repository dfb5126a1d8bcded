"""Run a registered workload: the engine and its baselines in one process on the same generated workload; writes
JSON + a PNG plot to benchmarks/results/ with the device, versions, dtype, command line and git commit.

    python -m benchmarks.run --workload NAME [--quick] [--repeats N] [--out DIR|FILE.json] [--list] ...
    softprompt bench --workload NAME ...        (the same options)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from softprompt.engine.bench_cli import add_bench_arguments

from . import replicas as replicas_mod
from . import serving as serving_mod
from . import throughput
from .environment import contention, contention_warning, cpu_seconds, device_slug, environment, peak_rss_bytes
from .plot import write_plot
from .roofline import DevicePeak
from .workloads import WORKLOADS, WorkloadSpec, get_workload

RESULTS = Path(__file__).resolve().parent / "results"


def list_workloads() -> str:
    return "\n".join(f"{name:<10} {'CUDA' if spec.needs_cuda else 'CPU '}  {spec.kind:<10} {spec.description}"
                     for name, spec in WORKLOADS.items())


def output_paths(spec: WorkloadSpec, out: Path | None, quick: bool) -> tuple[Path, Path]:
    """(json, png): `out` as a .json file, or a directory (default benchmarks/results/) holding
    <workload>-<device>[-quick].json/.png."""
    if out is not None and out.suffix == ".json":
        return out, out.with_suffix(".png")
    stem = spec.name.lower()
    slug = device_slug(spec.config.device)
    if not stem.endswith(f"-{slug}"):
        stem += f"-{slug}"
    stem += "-quick" if quick else ""
    directory = out or RESULTS
    return directory / f"{stem}.json", directory / f"{stem}.png"


def _peak(args: argparse.Namespace) -> DevicePeak | None:
    if args.peak_tflops is None and args.peak_tbps is None:
        return None
    if args.peak_tflops is None or args.peak_tbps is None:
        raise ValueError("give both --peak-tflops and --peak-tbps")
    return DevicePeak("given on the command line", args.peak_tflops * 1e12, args.peak_tbps * 1e12)


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(sorted(float(r) for r in text.split(",") if r.strip()))
    except ValueError as exc:
        raise ValueError(f"--rates expects comma-separated numbers, got {text!r}") from exc
    if not rates or min(rates) <= 0:
        raise ValueError(f"--rates needs positive rates, got {text!r}")
    return rates


def measure(spec: WorkloadSpec, args: argparse.Namespace,
            on_partial: Callable[[dict[str, Any]], None] = lambda report: None) -> dict[str, Any]:
    """The workload's report; throughput workloads also hand `on_partial` the report so far before each optional
    system (another backend, HF static + compile), so a run stopped during one keeps the rest."""
    config, serving = spec.resolved(args.quick)
    if args.rates is not None or args.duration is not None:
        if serving is None:
            raise ValueError(f"--rates and --duration apply to serving workloads, not {spec.name}")
        if args.rates is not None:
            serving = dataclasses.replace(serving, rates=_rates(args.rates))
        if args.duration is not None:
            if args.duration <= 0:
                raise ValueError("--duration must be positive")
            serving = dataclasses.replace(serving, duration_s=args.duration)
    if args.compare_backend is not None and spec.kind != "throughput":
        raise ValueError(f"--compare-backend applies to throughput workloads, not {spec.name} ({spec.kind})")
    if serving is not None:
        return serving_mod.measure_serving(spec, config, serving, backend=args.backend, workdir=args.workdir)
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if args.repeat_budget <= 0:
        raise ValueError("--repeat-budget must be positive")
    if args.compare_backend is not None and args.compare_backend == args.backend:
        raise ValueError(f"--compare-backend {args.compare_backend} is already the engine's --backend")
    if spec.replicas is not None:
        return replicas_mod.measure_replicas(spec, config, spec.replicas, repeats, workdir=args.workdir)
    peak = _peak(args)

    def report(m: throughput.Measurements) -> dict[str, Any]:
        return throughput.build_report(spec, m, repeats, peak, args.repeat_budget)

    m = throughput.measure_all(spec, config, repeats, backend=args.backend, workdir=args.workdir,
                               profile=args.profile, hf_static=False if args.skip_hf_static else None,
                               repeat_budget_s=args.repeat_budget, compare_backend=args.compare_backend,
                               on_partial=lambda m: on_partial(report(m)))
    return report(m)


def finish_report(report: dict[str, Any], quick: bool, command: str,
                  start: tuple[float, float, float, float] | None) -> None:
    """Add the run's environment (device, versions, command, commit, contention since `start`) to `report`."""
    report["quick"] = quick
    busy = contention(start, report.pop("own_children_cpu_s", 0.0))  # a local Ray cluster's processes are ours
    report["environment"] = {**environment(report["workload"]["device"], command), "contention_cpu_s": busy,
                             "peak_rss_bytes": peak_rss_bytes()}


def run_args(args: argparse.Namespace, command: str) -> int:
    """Run the workload `args.workload`; 0 when its checks pass, 1 when one fails, 2 for a usage error."""
    if args.list:
        print(list_workloads())
        return 0
    try:
        spec = get_workload(args.workload)
        if spec.needs_cuda and not torch.cuda.is_available():
            raise ValueError(f"workload {spec.name} runs on a CUDA GPU and torch.cuda.is_available() is False "
                             f"here (torch {torch.__version__}); on a CPU-only machine run C1 or SERVE-CPU")
        _peak(args)
        json_path, png_path = output_paths(spec, args.out, args.quick)
        if args.threads is not None and args.threads < 1:
            raise ValueError("--threads must be >= 1")
        if spec.config.device == "cpu":
            torch.set_num_threads(args.threads or 2)  # the published CPU figures use 2 (the project's CPU machines)
        start = cpu_seconds()
        json_path.parent.mkdir(parents=True, exist_ok=True)

        def write_partial(partial: dict[str, Any]) -> None:
            finish_report(partial, args.quick, command, start)
            partial["partial"] = True
            json_path.write_text(json.dumps(partial, indent=2) + "\n")
            throughput.print_report(partial)
            pending = ", ".join(n for n, why in partial["skipped"].items() if why.startswith("pending"))
            print(f"wrote {json_path} (partial: {pending} still to run)", flush=True)

        report = measure(spec, args, write_partial)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finish_report(report, args.quick, command, start)
    skipped = write_plot(report, png_path)
    report["plot"] = None if skipped else png_path.name
    report["plot_skipped"] = skipped
    json_path.write_text(json.dumps(report, indent=2) + "\n")

    printers = {"serving": serving_mod.print_report, "replicas": replicas_mod.print_report}
    printers.get(spec.kind, throughput.print_report)(report)
    env = report["environment"]
    print(f"{env['device']}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}; commit {env['git_commit']}{' (modified tree)' if env['git_dirty'] else ''}; "
          f"`{env['command']}`")
    warning = contention_warning(env["contention_cpu_s"])
    if warning:
        print(warning)
    print(f"wrote {json_path}" + (f" and {png_path}" if not skipped else f" (plot skipped: {skipped})"))
    if not report["agreement"]["pass"]:
        print(f"FAIL: greedy tokens disagree ({report['agreement']['rule']})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks.run") -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = add_bench_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0]))
    return run_args(parser.parse_args(argv), shlex.join([*prog.split(), *argv]))


if __name__ == "__main__":
    raise SystemExit(main())

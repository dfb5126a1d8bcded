"""README tables from the result files: `python -m benchmarks.table [DIR]` prints markdown rows for every registered
workload (full runs only; a workload with no result file is marked "not yet measured")."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .environment import CONTENTION_WARNING
from .workloads import WORKLOADS

RESULTS = Path(__file__).resolve().parent / "results"
THROUGHPUT_HEAD = ("| workload | device | command | engine output tok/s | engine total tok/s | vs HF mixed-task "
                   "| vs PEFT | vs HF static+compile | roofline (engine) | KV/request shared vs not | plot |\n"
                   "|---|---|---|---|---|---|---|---|---|---|---|")
SERVING_HEAD = ("| workload | device | command | rates (req/s) | engine TTFT p50 / p99 | engine ITL p50 / p99 "
                "| highest rate held (p99 TTFT < SLO): engine / HF | plot |\n|---|---|---|---|---|---|---|---|")
REPLICAS_HEAD = ("| workload | device | command | output tok/s per setup | 2 replicas vs 1 "
                 "| prefix K/V computations per task: round-robin / affinity | plot |\n|---|---|---|---|---|---|---|")


def _device(r: dict[str, Any]) -> str:
    env = r["environment"]
    dirty = " (modified tree)" if env.get("git_dirty") else ""
    threads = f", {env['threads']} threads" if env.get("device_type") == "cpu" else ""
    busy = env.get("contention_cpu_s") or {}
    noisy = (f", **contended: others took {busy['share']:.0%} of the CPUs**"
             if busy.get("share", 0) > CONTENTION_WARNING else "")
    return (f"{env['device']}{threads}, {r['workload']['dtype']}, commit `{(env.get('git_commit') or '?')[:7]}`"
            f"{dirty}{noisy}")


def _plot(r: dict[str, Any], rel: str) -> str:
    return f"[png]({rel}/{r['plot']})" if r.get("plot") else "—"


def _ratio(r: dict[str, Any], key: str) -> str:
    value = r["ratios"].get(key)
    return "—" if value is None else f"**{value:.2f}×**"


def throughput_row(r: dict[str, Any], rel: str) -> str:
    eng = r["systems"]["engine"]
    roof = r["roofline"]
    roof_text = f"{roof['fraction']['engine']:.1%} of {roof['peak']['name']}" if roof.get("fraction") else "n/a (CPU)"
    kv = r["kv_memory"]
    static = _ratio(r, "engine/hf_static") if "hf_static" in r["systems"] else "not run (CUDA only)"
    return (f"| {r['workload']['name']} | {_device(r)} | `{r['environment']['command']}` | {eng['output_tok_s']:.0f} "
            f"| {eng['total_tok_s']:.0f} | {_ratio(r, 'engine/hf_mixed')} | {_ratio(r, 'engine/peft')} | {static} "
            f"| {roof_text} | {kv['with_sharing'] / 1024:.0f} vs {kv['without_sharing'] / 1024:.0f} KiB "
            f"| {_plot(r, rel)} |")


def serving_row(r: dict[str, Any], rel: str) -> str:
    eng = r["systems"]["engine"]
    rates = [p["rate"] for p in eng["per_rate"]]
    ttft = ", ".join(f"{p['ttft_s']['p50'] * 1e3:.0f}/{p['ttft_s']['p99'] * 1e3:.0f}" for p in eng["per_rate"])
    itl = ", ".join(f"{p['itl_s']['p50'] * 1e3:.1f}/{p['itl_s']['p99'] * 1e3:.1f}" for p in eng["per_rate"])

    def held(name: str) -> str:
        if name not in r["systems"]:
            return "—"
        value = r["systems"][name]["max_rate_held"]
        if value is None:
            return "none held"
        return f"≥ {value:g} (all)" if r["systems"][name]["held_every_rate"] else f"{value:g}"

    return (f"| {r['workload']['name']} | {_device(r)} | `{r['environment']['command']}` "
            f"| {', '.join(f'{x:g}' for x in rates)} | {ttft} ms | {itl} ms | {held('engine')} / {held('hf_mixed')} "
            f"| {_plot(r, rel)} |")


def replicas_row(r: dict[str, Any], rel: str) -> str:
    setups = r["setups"]
    tok = ", ".join(f"{label}: {s['output_tok_s']:.0f}" for label, s in setups.items())
    two = [s for s in setups.values() if s["replicas"] == 2 and s["routing"] == "affinity"]
    rr = [s for s in setups.values() if s["routing"] == "round-robin"]
    scale = f"**{two[0]['speedup_vs_first']:.2f}×**" if two else "—"
    comp = (f"{rr[0]['prefix_computations_per_task_mean']:.2f} / **{two[0]['prefix_computations_per_task_mean']:.2f}**"
            if rr and two else "—")
    return (f"| {r['workload']['name']} | {_device(r)}, {r['workload']['replica_cpus']:g} CPU per replica "
            f"| `{r['environment']['command']}` | {tok} | {scale} | {comp} | {_plot(r, rel)} |")


def tables(results: Path = RESULTS, rel: str = "benchmarks/results") -> str:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if report.get("quick") is False and "environment" in report:
            found[report["workload"]["name"]] = report
    lines = {"throughput": [THROUGHPUT_HEAD], "serving": [SERVING_HEAD], "replicas": [REPLICAS_HEAD]}
    rows = {"throughput": throughput_row, "serving": serving_row, "replicas": replicas_row}
    cols = {"throughput": 11, "serving": 8, "replicas": 7}
    for name, spec in WORKLOADS.items():
        r = found.get(name)
        if r is None:
            where = "CUDA GPU" if spec.needs_cuda else "CPU"
            row = f"| {name} | {where}: **not yet measured** | `python -m benchmarks.run --workload {name}` |"
            lines[spec.kind].append(row + " — |" * (cols[spec.kind] - 3))
        else:
            lines[spec.kind].append(rows[spec.kind](r, rel))
    return "\n\n".join("\n".join(lines[kind]) for kind in ("throughput", "serving", "replicas"))


if __name__ == "__main__":
    print(tables(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS))

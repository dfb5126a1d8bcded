"""The PNG beside each result JSON (matplotlib, optional: without it the plot is skipped with a message).
`python -m benchmarks.plot RESULT.json ...` redraws the PNGs of existing results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .environment import CONTENTION_WARNING


def _title(report: dict[str, Any]) -> str:
    env, w = report["environment"], report["workload"]
    commit = (env.get("git_commit") or "unknown")[:10] + ("+dirty" if env.get("git_dirty") else "")
    busy = env.get("contention_cpu_s") or {}
    noisy = (f" - CONTENDED: other processes took {busy['share']:.0%} of the CPUs"
             if busy.get("share", 0) > CONTENTION_WARNING else "")
    return f"{w['name']} ({w['dtype']}) on {env['device']}{noisy}\ncommit {commit}, `{env['command']}`"


def _throughput(ax_pair, report: dict[str, Any]) -> None:
    names = list(report["systems"])
    engine_s = report["systems"]["engine"]["seconds"]
    colors = ["tab:green" if n == "engine" else "tab:olive" if n.startswith("engine_") else "tab:gray" for n in names]
    metrics = (("output_tok_s", "output tok/s"), ("total_tok_s", "total tok/s (P + input + output)"))
    for ax, (key, label) in zip(ax_pair, metrics):
        values = [report["systems"][n][key] for n in names]
        bars = ax.bar(names, values, color=colors)
        for bar, n in zip(bars, names):
            speed = report["systems"][n]["seconds"] / engine_s
            ax.annotate(f"{bar.get_height():.0f}" + ("" if n == "engine" else f"\n(engine {speed:.2f}x)"),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(values) * 1.25)
        ax.grid(axis="y", alpha=0.3)


def _serving(ax_pair, report: dict[str, Any]) -> None:
    slo = report["serving"]["ttft_slo_s"]
    for name, sysrep in report["systems"].items():
        rates = [r["rate"] for r in sysrep["per_rate"]]
        color = "tab:green" if name == "engine" else "tab:gray"
        for ax, metric in zip(ax_pair, ("ttft_s", "itl_s")):
            ax.plot(rates, [r[metric]["p50"] for r in sysrep["per_rate"]], "o-", color=color, label=f"{name} p50")
            ax.plot(rates, [r[metric]["p99"] for r in sysrep["per_rate"]], "s--", color=color, label=f"{name} p99")
    ax_pair[0].axhline(slo, color="tab:red", lw=1, ls=":", label=f"SLO p99 < {slo:g} s")
    for ax, label in zip(ax_pair, ("time to first token (s)", "inter-token latency (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arrival rate (requests/s, Poisson)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)


def _replicas(ax_pair, report: dict[str, Any]) -> None:
    labels = list(report["setups"])
    names = [label.replace(", ", "\n") for label in labels]
    colors = ["tab:green" if s["routing"] == "affinity" and s["replicas"] > 1 else "tab:gray"
              for s in report["setups"].values()]
    metrics = (("output_tok_s", "output tok/s (HTTP, end to end)"),
               ("prefix_computations_per_task_mean", "prefix K/V computations per task"))
    for ax, (key, label) in zip(ax_pair, metrics):
        values = [report["setups"][k][key] for k in labels]
        bars = ax.bar(names, values, color=colors)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.2f}" if value < 10 else f"{value:.0f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(values) * 1.25)
        ax.grid(axis="y", alpha=0.3)


def write_plot(report: dict[str, Any], path: Path) -> str | None:
    """Save the report's plot to `path`; returns why not (None when written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the `bench` extra)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    {"serving": _serving, "replicas": _replicas}.get(report["workload"]["kind"], _throughput)(axes, report)
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name)
        why = write_plot(json.loads(path.read_text()), path.with_suffix(".png"))
        print(f"{path.with_suffix('.png')}: {why or 'written'}")

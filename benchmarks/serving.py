"""Serving under Poisson arrivals, simulated in one loop: requests whose arrival time has passed are admitted, the
system runs a step, and the clock advances by the step's measured time (idle gaps are skipped, not slept). Reports
time to first token (TTFT) and inter-token latency (ITL) p50/p99 per rate and the highest rate held with p99 TTFT
under the SLO, for the engine (continuous batching) and HF mixed-task static batching."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .baselines import HFMixedTask, StepTimes, sync
from .environment import CONTENTION_WARNING, PeakMemory, contention, cpu_seconds
from .progress import ProgressCounter
from .systems import EngineSystem
from .throughput import agreement, kv_bytes_per_request, kv_memory_line, release_memory
from .workloads import ServingConfig, WorkItem, WorkloadConfig, WorkloadSpec, build_workload, poisson_arrivals


@dataclass
class Trace:
    """One request on the simulated clock (seconds from the first arrival)."""

    arrival: float
    token_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def serve_engine(system: EngineSystem, items: list[WorkItem], arrivals: list[float],
                 tick: Callable[[int], None] = lambda n: None) -> list[Trace]:
    """Drive `engine.add_request` / `engine.step` with requests arriving at `arrivals` (sorted). The same requests
    are served at every rate: the request-block cache starts empty each time, so no rate reuses another's inputs."""
    engine, device = system.engine, system.workload.config.device
    if engine.block_cache is not None:
        engine.block_cache.clear()
    traces = [Trace(a) for a in arrivals]
    index: dict[str, int] = {}
    clock, nxt = 0.0, 0
    while nxt < len(items) or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests() and arrivals[nxt] > clock:
            clock = arrivals[nxt]  # idle until the next arrival
        start = time.perf_counter()
        while nxt < len(items) and arrivals[nxt] <= clock:
            index[engine.add_request(system.request(items[nxt]))] = nxt
            nxt += 1
        outputs = engine.step()
        sync(device)
        clock += time.perf_counter() - start
        for out in outputs:
            trace = traces[index[out.request_id]]
            trace.token_times.extend([clock] * (len(out.token_ids) - len(trace.token_times)))
            trace.tokens = out.token_ids
            if out.finished:
                tick(1)
    return traces


def serve_hf(system: HFMixedTask, items: list[WorkItem], arrivals: list[float],
             tick: Callable[[int], None] = lambda n: None) -> list[Trace]:
    """A server a user would write around HF generate: whenever it is free, take up to `batch_size` requests that
    have arrived and generate them as one left-padded mixed-task batch; token times from a streamer."""
    traces = [Trace(a) for a in arrivals]
    clock, nxt, size = 0.0, 0, system.workload.config.batch_size
    while nxt < len(items):
        clock = max(clock, arrivals[nxt])
        batch = []
        while nxt < len(items) and arrivals[nxt] <= clock and len(batch) < size:
            batch.append(nxt)
            nxt += 1
        streamer = StepTimes()
        start = time.perf_counter()
        tokens = system.run_batch([items[i] for i in batch], streamer)
        sync(system.device)
        elapsed = time.perf_counter() - start
        for i, toks in zip(batch, tokens):
            traces[i].token_times = [clock + (t - start) for t in streamer.times]
            traces[i].tokens = toks
        clock += elapsed
        tick(len(batch))
    return traces


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def rate_stats(rate: float, traces: list[Trace], slo: float) -> dict[str, Any]:
    ttft = [t.token_times[0] - t.arrival for t in traces]
    itl = [b - a for t in traces for a, b in zip(t.token_times, t.token_times[1:])]
    e2e = [t.token_times[-1] - t.arrival for t in traces]
    span = max(t.token_times[-1] for t in traces)  # first arrival to last token
    tokens = sum(len(t.token_times) for t in traces)
    stats = {"rate": rate, "requests": len(traces), "span_s": span, "achieved_req_s": len(traces) / span,
             "output_tok_s": tokens / span, "ttft_s": _pcts(ttft), "itl_s": _pcts(itl), "e2e_s": _pcts(e2e)}
    stats["held"] = stats["ttft_s"]["p99"] < slo
    return stats


def max_rate_held(per_rate: list[dict[str, Any]]) -> float | None:
    """The highest rate held with every lower rate held too (None if the lowest already misses the SLO)."""
    best = None
    for stats in sorted(per_rate, key=lambda s: s["rate"]):
        if not stats["held"]:
            break
        best = stats["rate"]
    return best


def _held(per_rate: list[dict[str, Any]]) -> dict[str, Any]:
    held = max_rate_held(per_rate)
    return {"per_rate": per_rate, "max_rate_held": held,
            "held_every_rate": held is not None and held == max(r["rate"] for r in per_rate)}


def _serve_all(name: str, serve: Callable, system: Any, pool: list[WorkItem], serving: ServingConfig,
               seed: int) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Every rate in turn; returns the per-rate stats and the tokens of the first rate's requests."""
    bar = ProgressCounter(sum(serving.requests_at(r) for r in serving.rates), f"{name} serving")
    per_rate, tokens = [], []
    try:
        for rate in serving.rates:
            items = [pool[i % len(pool)] for i in range(serving.requests_at(rate))]
            start = cpu_seconds()
            traces = serve(system, items, poisson_arrivals(len(items), rate, seed), bar.update)
            per_rate.append({**rate_stats(rate, traces, serving.ttft_slo_s), "contention_cpu_s": contention(start)})
            tokens = tokens or [t.tokens for t in traces]
    finally:
        bar.close()
    return per_rate, tokens


def measure_serving(spec: WorkloadSpec, config: WorkloadConfig, serving: ServingConfig, *, backend: str = "torch",
                    workdir: Path | None = None) -> dict[str, Any]:
    """Serve the same requests at every rate with the engine (prefixes precomputed when the prompts are registered,
    as a server would) and, if configured, HF mixed-task static batching."""
    device = config.device
    with tempfile.TemporaryDirectory() as tmp:
        workload = build_workload(config, workdir or Path(tmp))
        systems: dict[str, dict[str, Any]] = {}
        tokens: dict[str, list[list[int]]] = {}

        engine = EngineSystem(workload, backend=backend, precompute=True)
        engine.warmup()
        with PeakMemory(device) as mem:
            per_rate, tokens["engine"] = _serve_all("engine", serve_engine, engine, workload.items, serving,
                                                    config.seed)
        systems["engine"] = {"label": engine.label, **_held(per_rate), "info": engine.info(), "memory": mem.result}
        kv = kv_bytes_per_request(workload, engine.engine)
        del engine
        release_memory(device)

        if serving.baseline:
            hf = HFMixedTask(workload)
            hf.warmup()
            with PeakMemory(device) as mem:
                per_rate, tokens["hf_mixed"] = _serve_all("hf_mixed", serve_hf, hf, workload.items, serving,
                                                          config.seed)
            systems["hf_mixed"] = {"label": hf.label + " (static batching)", **_held(per_rate), "info": hf.info(),
                                   "memory": mem.result}
            del hf
            release_memory(device)

    ratios = {}
    if "hf_mixed" in systems:
        ours, theirs = systems["engine"]["max_rate_held"], systems["hf_mixed"]["max_rate_held"]
        ratios["max_rate_held engine/hf_mixed"] = ours / theirs if ours and theirs else None
        for mine, base in zip(systems["engine"]["per_rate"], systems["hf_mixed"]["per_rate"]):
            ratios[f"ttft_p99 hf_mixed/engine @{mine['rate']:g}/s"] = base["ttft_s"]["p99"] / mine["ttft_s"]["p99"]
    checked = {}
    if "hf_mixed" in tokens:
        checked = agreement(tokens["engine"], tokens["hf_mixed"])
    passed = config.dtype != "float32" or not checked or checked["exact"] >= 7 / 8
    return {
        "workload": {"description": spec.description, "kind": "serving", **dataclasses.asdict(config)},
        "serving": {**dataclasses.asdict(serving), "requests": [serving.requests_at(r) for r in serving.rates],
                    "clock": "simulated: compute time of each step, idle gaps skipped"},
        "systems": systems,
        "ratios": ratios,
        "kv_memory": kv,
        "agreement": {"engine~hf_mixed (first rate, all requests)": checked, "pass": passed,
                      "rule": "fp32: exact >= 0.875; half precision: reported only"},
    }


def _busy(stats: dict[str, Any]) -> str:
    """Share of the CPUs other processes took while this rate ran, flagged (!) past the contention warning."""
    busy = stats.get("contention_cpu_s")
    if not busy:
        return "n/a"
    return f"{busy['share']:.0%}" + ("!" if busy["share"] > CONTENTION_WARNING else "")


def print_report(report: dict[str, Any], out: Callable[[str], None] = print) -> None:
    w, s = report["workload"], report["serving"]
    out(f"\nWorkload {w['name']} ({w['device']}, {w['dtype']}): {w['num_tasks']} tasks x P={w['prompt_len']}, "
        f"Poisson arrivals for {s['duration_s']:g} s per rate (inputs {w['min_input']}-{w['max_input']}, "
        f"{w['new_tokens']} new tokens); SLO p99 TTFT < {s['ttft_slo_s']:g} s; {s['clock']}")
    out(f"{'system':<10} {'rate/s':>7} {'reqs':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
        f"{'out tok/s':>10} {'held':>5} {'others':>7}")
    for name, sysrep in report["systems"].items():
        for r in sysrep["per_rate"]:
            ttft, itl = r["ttft_s"], r["itl_s"]
            out(f"{name:<10} {r['rate']:>7g} {r['requests']:>5} {ttft['p50'] * 1e3:>7.0f}ms "
                f"{ttft['p99'] * 1e3:>7.0f}ms "
                f"{itl['p50'] * 1e3:>6.1f}ms {itl['p99'] * 1e3:>6.1f}ms {r['output_tok_s']:>10.0f} "
                f"{'yes' if r['held'] else 'no':>5} {_busy(r):>7}")
        held = sysrep["max_rate_held"]
        text = "none of those tested" if held is None else f"{held:g} req/s"
        if sysrep["held_every_rate"]:
            text += " (every rate tested: its capacity is higher)"
        out(f"{name:<10} highest rate held: {text}")
    for key, value in report["ratios"].items():
        out(f"{key}: {'n/a' if value is None else f'{value:.2f}'}")
    out(kv_memory_line(report["kv_memory"]))
    a = report["agreement"]
    for key, v in a.items():
        if isinstance(v, dict) and v:
            out(f"Greedy agreement {key}: exact {v['exact']:.3f}, first token {v['first_token']:.3f}")
    out(f"  rule: {a['rule']}: {'PASS' if a['pass'] else 'FAIL'}")

"""Offline throughput: the engine and its baselines on the same requests in one process, the same greedy tokens
checked on a sample, a floor (measured on the CPU, a roofline on GPUs) and KV memory per request."""

from __future__ import annotations

import cProfile
import dataclasses
import gc
import math
import pstats
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt import Engine

from .baselines import HFMixedTask, HFStaticCompiled, PeftPerTask, build_peft_adapters, fp32_reference, sync
from .environment import PeakMemory, device_name
from .floor import cpu_floor
from .progress import progress
from .roofline import DevicePeak, roofline
from .systems import EngineSystem
from .workloads import WorkItem, Workload, WorkloadConfig, WorkloadSpec, build_workload

MIN_EXACT = 7 / 8  # fp32: sampled requests whose greedy tokens must all match
HALF_SLACK = 1 / 8  # bf16/fp16: how far below HF's agreement with the fp32 answer the engine's may fall


@dataclass
class SystemResult:
    name: str
    label: str
    runs: list[float]  # seconds of each timed repeat
    tokens: list[list[int]]  # of the last repeat, per request in arrival order
    info: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, int] | None = None  # CUDA only

    @property
    def seconds(self) -> float:
        return min(self.runs)


def measure(system: Any, workload: Workload, repeats: int, budget_s: float = math.inf) -> SystemResult:
    """Warm up, then time up to `repeats` full runs of the workload (`reset` outside the timed region), stopping
    early once the timed runs add up to `budget_s`: a run that long varies little, and the GPU lease is short."""
    device = workload.config.device
    system.warmup()
    runs, tokens = [], []
    with PeakMemory(device) as mem:
        for _ in progress(range(repeats), system.name):
            system.reset()
            sync(device)
            start = time.perf_counter()
            tokens = system.generate(workload.items)
            sync(device)
            runs.append(time.perf_counter() - start)
            if sum(runs) >= budget_s:
                break
    print(f"{system.name}: {min(runs):.3f} s (best of {len(runs)})", flush=True)
    return SystemResult(system.name, system.label, runs, tokens, system.info(), mem.result)


# ---- honesty check ----------------------------------------------------------------------------------------
def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    """Over request pairs: all tokens equal (`exact`), first token equal, and the mean common leading fraction."""
    def lead(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    pairs = list(zip(ours, theirs, strict=True))
    return {"exact": sum(a == b for a, b in pairs) / len(pairs),
            "first_token": sum(a[:1] == b[:1] for a, b in pairs) / len(pairs),
            "prefix": sum(lead(a, b) / max(len(a), 1) for a, b in pairs) / len(pairs)}


def agreement_report(results: dict[str, SystemResult], sample: list[int], peft_unpadded: list[list[int]],
                     dtype: str, fp32: list[list[int]] | None = None) -> dict[str, Any]:
    """Pairwise agreement on the sample (PEFT one request at a time: its exact answer) and the pass rule. fp32: the
    engine's tokens must equal HF's and PEFT's. Half precision: greedy paths legitimately fork at near-ties, so each
    system is compared with the fp32 answer (same weights, one request at a time) and the engine must stay about as
    close to it as HF in the same dtype."""
    pick = {name: [r.tokens[i] for i in sample] for name, r in results.items()}
    pick["peft"] = peft_unpadded
    pairs = {f"engine~{b}": agreement(pick["engine"], pick[b]) for b in pick if b != "engine"}
    everything = {"engine~hf_mixed": agreement(results["engine"].tokens, results["hf_mixed"].tokens),
                  "engine~peft_padded_batches": agreement(results["engine"].tokens, results["peft"].tokens)}
    if dtype == "float32" or fp32 is None:
        rule = f"engine~hf_mixed and engine~peft exact >= {MIN_EXACT:.3f} on the sample"
        ok = min(pairs["engine~hf_mixed"]["exact"], pairs["engine~peft"]["exact"]) >= MIN_EXACT
    else:
        pairs.update({f"{name}~fp32": agreement(tokens, fp32) for name, tokens in pick.items()})
        bar = pairs["hf_mixed~fp32"]["prefix"]
        rule = (f"{dtype}: engine~fp32 mean common prefix >= hf_mixed~fp32's ({bar:.3f}) - {HALF_SLACK:.3f} "
                "(fp32: HF, same weights, one request at a time)")
        ok = pairs["engine~fp32"]["prefix"] >= bar - HALF_SLACK
    return {"sample": sample, "pairs": pairs, "all_requests": everything, "rule": rule, "pass": ok,
            "note": "PEFT's left-padded batches shift positions (peft#1093): only its unpadded answer is checked"}


# ---- KV memory --------------------------------------------------------------------------------------------
def kv_memory_line(kv: dict[str, float]) -> str:
    return (f"KV bytes/request: {kv['with_sharing'] / 1024:.1f} KiB with prefix sharing, "
            f"{kv['without_sharing'] / 1024:.1f} KiB without ({kv['saving']:.0%} less)")


def kv_bytes_per_request(workload: Workload, engine: Engine) -> dict[str, float]:
    """Mean KV bytes a request holds at its end, in whole pool blocks: with prefix sharing (own blocks + its task's
    prefix blocks divided among the task's requests) and without (P + input + output tokens each)."""
    cfg, pool = workload.config, engine.pool
    per_block = pool.bytes_per_block(engine.config, pool.block_size, engine.dtype)
    users = Counter(it.task for it in workload.items)
    shared = [per_block * (pool.blocks_for(len(it.input_ids) + cfg.new_tokens)
                           + pool.blocks_for(cfg.prompt_len) / users[it.task]) for it in workload.items]
    unshared = [per_block * pool.blocks_for(cfg.prompt_len + len(it.input_ids) + cfg.new_tokens)
                for it in workload.items]
    return {"block_size": pool.block_size, "bytes_per_block": per_block, "bytes_per_token": per_block / pool.block_size,
            "with_sharing": sum(shared) / len(shared), "without_sharing": sum(unshared) / len(unshared),
            "saving": 1 - sum(shared) / sum(unshared)}


def token_counts(workload: Workload) -> dict[str, int]:
    """Logical tokens of the workload (the same for every system): each request's P + input, and its outputs."""
    cfg = workload.config
    prefill = cfg.num_requests * cfg.prompt_len + sum(workload.input_lengths)
    output = cfg.num_requests * cfg.new_tokens
    return {"prefill": prefill, "output": output, "total": prefill + output}


def profile_engine(system: EngineSystem, items: list[WorkItem], top: int = 20) -> None:
    """cProfile one cold-prefix engine.generate of the workload; print the top costs by cumulative time."""
    system.reset()
    profiler = cProfile.Profile()
    profiler.runcall(system.generate, items)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def release_memory(device: str) -> None:
    """Free what the system just measured held, before the next one is built."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Measurements:
    workload: Workload
    results: dict[str, SystemResult]
    skipped: dict[str, str]  # system -> why it did not run
    sample: list[int]  # request indices of the honesty check
    peft_unpadded: list[list[int]]  # PEFT's tokens for the sample, one request at a time
    prefix_misses: list[int]  # prefixes the engine computed in each timed run
    kv: dict[str, float]
    floor: dict[str, float] | None
    fp32_sample: list[list[int]] | None = None  # half precision: the fp32 answer for the sample


def measure_all(spec: WorkloadSpec, config: WorkloadConfig, repeats: int, *, backend: str = "torch",
                workdir: Path | None = None, profile: bool = False, hf_static: bool | None = None,
                repeat_budget_s: float = math.inf, compare_backend: str | None = None,
                on_partial: Callable[[Measurements], None] | None = None) -> Measurements:
    """Every system in turn on one generated workload, each built just before it is timed and freed after.

    First the engine, HF mixed-task, PEFT and (half precision) the fp32 answer; then the optional systems, whose
    failure is reported rather than fatal: the engine on `compare_backend` (system `engine_<backend>`) and the
    static-cache + torch.compile baseline (`hf_static`; None: on CUDA only). Before each optional system
    `on_partial` receives the measurements so far, so a run stopped during a compile keeps the rest."""
    on_cuda = config.device == "cuda"
    hf_static = on_cuda if hf_static is None else hf_static
    with tempfile.TemporaryDirectory() as tmp:
        workload = build_workload(config, workdir or Path(tmp))
        adapter_dirs = build_peft_adapters(workload, Path(tmp))
        sample = sorted(random.Random(config.seed).sample(range(config.num_requests),
                                                          min(config.agreement_sample, config.num_requests)))
        results: dict[str, SystemResult] = {}

        engine = EngineSystem(workload, backend=backend)
        results["engine"] = measure(engine, workload, repeats, repeat_budget_s)
        kv = kv_bytes_per_request(workload, engine.engine)
        misses = engine.prefix_misses[1:]  # [0] is the warm-up
        if profile:
            profile_engine(engine, workload.items)
        del engine
        release_memory(config.device)

        hf = HFMixedTask(workload)
        results["hf_mixed"] = measure(hf, workload, repeats, repeat_budget_s)
        del hf
        release_memory(config.device)

        peft_system = PeftPerTask(workload, adapter_dirs)  # every adapter loaded before timing
        results["peft"] = measure(peft_system, workload, repeats, repeat_budget_s)
        peft_unpadded = peft_system.generate_unpadded([workload.items[i] for i in sample])
        del peft_system
        release_memory(config.device)

        fp32 = None
        if config.dtype != "float32":
            fp32 = fp32_reference(workload, [workload.items[i] for i in sample])
            release_memory(config.device)
        floor = cpu_floor(workload) if spec.cpu_floor else None

        optional: dict[str, Callable[[], Any]] = {}
        if compare_backend is not None:
            optional[f"engine_{compare_backend}"] = lambda: EngineSystem(workload, backend=compare_backend,
                                                                         name=f"engine_{compare_backend}")
        if hf_static:
            optional["hf_static"] = lambda: HFStaticCompiled(workload, compile_on_cpu=not on_cuda)
        skipped = {"hf_static": "CUDA only (static cache + torch.compile)" if not on_cuda
                   else "not requested (--skip-hf-static)"} if not hf_static else {}
        m = Measurements(workload, results, skipped, sample, peft_unpadded, misses, kv, floor, fp32)
        for name, build in optional.items():
            if on_partial is not None:
                pending = {n: "pending: runs after the others" for n in optional
                           if n not in results and n not in skipped}
                on_partial(dataclasses.replace(m, results=dict(results), skipped={**skipped, **pending}))
            system = None
            try:
                system = build()
                results[name] = measure(system, workload, repeats, repeat_budget_s)
            except Exception as exc:  # noqa: BLE001 - optional: the other figures stand without it
                skipped[name] = _failure(exc)
                print(f"{name}: {skipped[name]}", flush=True)
            del system
            release_memory(config.device)
        return m


def _failure(exc: Exception) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"failed: {type(exc).__name__}: {first_line}"[:300]


def build_report(spec: WorkloadSpec, m: Measurements, repeats: int, peak: DevicePeak | None = None,
                 repeat_budget_s: float = math.inf) -> dict[str, Any]:
    cfg = m.workload.config
    counts = token_counts(m.workload)
    eng = m.results["engine"]
    ratios = {f"engine/{name}": r.seconds / eng.seconds for name, r in m.results.items() if name != "engine"}
    roof = roofline(m.workload, device_name(cfg.device), {n: r.seconds for n, r in m.results.items()}, peak)
    values = dict(ratios)
    if m.floor is not None:
        values["floor_fraction"] = m.floor["total"] / eng.seconds
    return {
        "workload": {"description": spec.description, "kind": "throughput", **dataclasses.asdict(cfg)},
        "repeats": repeats,
        "repeat_budget_s": None if math.isinf(repeat_budget_s) else repeat_budget_s,
        "token_counts": counts,
        "systems": {r.name: {"label": r.label, "seconds": r.seconds, "runs": r.runs,
                             "output_tok_s": counts["output"] / r.seconds, "total_tok_s": counts["total"] / r.seconds,
                             "info": r.info, "memory": r.memory} for r in m.results.values()},
        "skipped": m.skipped,
        "ratios": ratios,
        "engine_prefix_computations_per_run": m.prefix_misses,
        "floor": m.floor,
        "roofline": roof,
        "targets": {k: {"value": values[k], "target": t, "pass": values[k] >= t}
                    for k, t in spec.targets.items() if k in values},
        "kv_memory": m.kv,
        "agreement": agreement_report(m.results, m.sample, m.peft_unpadded, cfg.dtype, m.fp32_sample),
    }


def verdict(value: float, target: float) -> str:
    return f"{value:.2f} (target >= {target:g}: {'PASS' if value >= target else 'FAIL'})"


def print_report(report: dict[str, Any], out: Callable[[str], None] = print) -> None:
    w = report["workload"]
    engine_s = report["systems"]["engine"]["seconds"]
    out(f"\nWorkload {w['name']} ({w['device']}, {w['dtype']}): {w['num_tasks']} tasks x P={w['prompt_len']}, "
        f"{w['num_requests']} requests, {w['new_tokens']} new tokens each (best of up to {report['repeats']}"
        + (f", fewer once a system's runs add up to {budget:g} s" if (budget := report.get("repeat_budget_s")) else "")
        + ")")
    out(f"{'system':<10} {'seconds':>9} {'runs':>4} {'out tok/s':>10} {'total tok/s':>12} {'engine speedup':>15} "
        f"{'peak mem':>10}")
    for name, s in report["systems"].items():
        mem = s["memory"]
        mem_text = f"{mem['peak_allocated_bytes'] / 2**30:.2f} GiB" if mem else "n/a"
        out(f"{name:<10} {s['seconds']:>9.3f} {len(s['runs']):>4} {s['output_tok_s']:>10.0f} {s['total_tok_s']:>12.0f} "
            f"{s['seconds'] / engine_s:>14.2f}x {mem_text:>10}")
    for name, why in report["skipped"].items():
        out(f"{name:<10} skipped: {why}")
    floor = report["floor"]
    if floor is not None:
        parts = {k: v for k, v in floor.items() if k not in ("total", "fastest_gemm")}
        out(f"CPU floor: {floor['total']:.3f} s (" + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in parts.items())
            + "); GEMMs timed with F.linear (MKL), as the issue's floor")
        fastest = floor.get("fastest_gemm")
        if fastest is not None:
            out(f"  with the faster GEMM per part (oneDNN on [in, out] weights where faster): {fastest['total']:.3f} s"
                f" (lm_head {fastest['lm_head'] * 1e3:.0f} ms); the engine runs at "
                f"{fastest['total'] / engine_s:.0%} of it")
    roof = report["roofline"]
    work = f"{roof['flops'] / 1e12:.3f} TFLOP, {roof['bytes'] / 1e9:.3f} GB moved (ideal work)"
    if roof["peak"] is not None:
        p = roof["peak"]
        out(f"Roofline: {work}; peaks assumed: {p['name']} {p['flops'] / 1e12:.0f} TFLOP/s, "
            f"{p['bytes_per_s'] / 1e12:.2f} TB/s -> {roof['seconds'] * 1e3:.1f} ms; fraction of it: "
            + ", ".join(f"{k} {v:.1%}" for k, v in roof["fraction"].items()))
    else:
        out(f"Roofline: {work}; no peaks assumed for this device (fraction not computed)")
    for key, t in report["targets"].items():
        out(f"{key + ':':<24}{verdict(t['value'], t['target'])}")
    out(kv_memory_line(report["kv_memory"]))
    a = report["agreement"]
    out(f"Greedy agreement on a sample of {len(a['sample'])} (exact / first token / common prefix): "
        + "; ".join(f"{k} {v['exact']:.3f}/{v['first_token']:.3f}/{v['prefix']:.3f}" for k, v in a["pairs"].items()))
    out("  all requests: " + "; ".join(f"{k} exact {v['exact']:.3f}" for k, v in a["all_requests"].items())
        + f"  [{a['note']}]")
    out(f"  rule: {a['rule']}: {'PASS' if a['pass'] else 'FAIL'}")

"""Workload C1 (CPU, fp32): 16 soft-prompted tasks, 64 mixed requests, 16 greedy tokens each.

Compares the engine with what a user writes without it (HF generate with mixed-task inputs_embeds batches, and
PEFT prompt tuning with one adapter per task), checks that all three produce the same tokens, and measures a
CPU floor from matmul timings at the workload's shapes.

    python -m benchmarks.c1 [--quick] [--repeats N] [--out PATH] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import platform
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from softprompt import Engine, Request, SamplingParams

from .baselines import HFMixedTask, PeftPerTask, build_peft_adapters
from .workloads import WorkItem, Workload, WorkloadConfig, build_workload

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "c1-cpu.json"
TARGETS = {"engine/hf_mixed": 3.5, "engine/peft": 6.0, "floor_fraction": 0.70}
MIN_AGREEMENT = 7 / 8
CONTENTION_WARNING = 0.03  # share of the CPUs others may take before the timings are flagged
AGREEMENT_SAMPLE = 8
QUICK = dict(num_tasks=4, num_requests=8, new_tokens=4, batch_size=4)  # + a 2048-token vocabulary


def progress(items: Iterable[T], desc: str) -> Iterable[T]:
    """tqdm when it is installed (optional), else the plain iterable."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


# ---- systems ----------------------------------------------------------------------------------------------
class EngineSystem:
    """Our engine, torch backend; `reset` re-registers every prompt so the next run computes prefixes cold."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self.engine = Engine(workload.model_dir, device="cpu", dtype="float32", backend="torch")
        self.prefix_misses: list[int] = []
        for task, prompt in enumerate(workload.prompts):
            self.engine.add_prompt(Workload.task_name(task), prompt)

    def reset(self) -> None:
        for task, prompt in enumerate(self.workload.prompts):
            self.engine.remove_prompt(Workload.task_name(task))
            self.engine.add_prompt(Workload.task_name(task), prompt, precompute=False)

    def generate(self, items: list[WorkItem]) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=self.workload.config.new_tokens, ignore_eos=True)
        misses = self.engine.prefix_cache.stats.misses
        outs = self.engine.generate(
            [Request(prompt=Workload.task_name(it.task), input_ids=it.input_ids, sampling=params) for it in items])
        self.prefix_misses.append(self.engine.prefix_cache.stats.misses - misses)
        return [o.token_ids for o in outs]


@dataclass
class SystemResult:
    name: str
    runs: list[float]  # seconds of each timed repeat
    tokens: list[list[int]]  # of the last repeat, per request in arrival order

    @property
    def seconds(self) -> float:
        return min(self.runs)


def measure(name: str, generate: Callable[[list[WorkItem]], list[list[int]]], workload: Workload, repeats: int,
            reset: Callable[[], None] = lambda: None) -> SystemResult:
    """Warm up on two requests, then time `repeats` full runs (reset outside the timed region)."""
    generate(workload.items[:2])
    runs, tokens = [], []
    for _ in progress(range(repeats), name):
        reset()
        start = time.perf_counter()
        tokens = generate(workload.items)
        runs.append(time.perf_counter() - start)
    return SystemResult(name, runs, tokens)


# ---- honesty check ----------------------------------------------------------------------------------------
def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Fraction of requests whose greedy tokens are all equal."""
    return sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours)


# ---- CPU floor --------------------------------------------------------------------------------------------
def best_time(fn: Callable[[], Any], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_linears_time(cfg: WorkloadConfig, rows: int) -> float:
    """q/k/v/o, gate/up/down of every layer for `rows` tokens (random weights of the model's shapes), separate or
    fused (qkv, gate+up), whichever is faster."""
    m = cfg.model
    h, q, kv, inter = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.intermediate_size
    layouts = [[(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)],  # (in, out)
               [(h, q + 2 * kv), (q, h), (h, 2 * inter), (inter, h)]]
    inputs = {k: torch.randn(rows, k) for k in (h, q, inter)}

    def layout_time(shapes: list[tuple[int, int]]) -> float:
        weights = [torch.randn(n, k) for _ in range(m.num_layers) for k, n in shapes]
        return best_time(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights])

    return min(layout_time(shapes) for shapes in layouts)


def attention_time(cfg: WorkloadConfig, batch: int, queries: int, prefix: int, own_keys: int) -> float:
    """SDPA (GQA) for `batch` sequences of `queries` new tokens over `prefix` visible + `own_keys` causal keys,
    every layer."""
    m = cfg.model
    q = torch.randn(batch, m.num_heads, queries, m.head_dim)
    k = torch.randn(batch, m.num_kv_heads, prefix + own_keys, m.head_dim)
    own_q = torch.arange(own_keys - queries, own_keys)
    mask = torch.cat([torch.ones(queries, prefix, dtype=torch.bool),
                      torch.arange(own_keys)[None, :] <= own_q[:, None]], dim=1)

    def run() -> None:
        for _ in range(m.num_layers):
            F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)

    return best_time(run)


def cpu_floor(workload: Workload) -> dict[str, float]:
    """Seconds of the unavoidable matmuls (+ attention at mean lengths): each prefix once, each input token,
    each output token (LM head on the last prefill row and on every decode row)."""
    cfg, m = workload.config, workload.config.model
    reqs, steps = cfg.num_requests, cfg.new_tokens - 1  # the last output token is never fed back
    mean_in = round(sum(workload.input_lengths) / reqs)
    lm_head = torch.randn(m.vocab_size, m.hidden_size)
    last_rows = torch.randn(reqs, m.hidden_size)
    parts = {
        "prefix_linears": layer_linears_time(cfg, cfg.num_tasks * cfg.prompt_len),
        "input_linears": layer_linears_time(cfg, sum(workload.input_lengths)),
        "decode_linears": steps * layer_linears_time(cfg, reqs),
        "lm_head": cfg.new_tokens * best_time(lambda: F.linear(last_rows, lm_head)),
        "prefix_attention": attention_time(cfg, cfg.num_tasks, cfg.prompt_len, 0, cfg.prompt_len),
        "input_attention": attention_time(cfg, reqs, mean_in, cfg.prompt_len, mean_in),
        "decode_attention": sum(attention_time(cfg, reqs, 1, cfg.prompt_len, mean_in + s + 1) for s in range(steps)),
    }
    parts["total"] = sum(parts.values())
    return parts


# ---- KV memory --------------------------------------------------------------------------------------------
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


# ---- environment ------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds() -> tuple[float, float, float, float] | None:
    """Wall clock, the machine's busy and steal CPU-seconds so far (/proc/stat), and this process's CPU-seconds."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, IndexError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    hz, own = os.sysconf("SC_CLK_TCK"), os.times()
    return time.perf_counter(), (user + nice + system + irq + softirq) / hz, steal / hz, own.user + own.system


def contention(start: tuple[float, float, float, float] | None) -> dict[str, float] | None:
    """CPU-seconds other processes (`others`) and the hypervisor (`steal`) took since `start`, and their share of
    the CPU capacity (`share`: wall time x cores)."""
    end = cpu_seconds()
    if start is None or end is None:
        return None
    others, steal = (end[1] - start[1]) - (end[3] - start[3]), end[2] - start[2]
    return {"others": others, "steal": steal, "share": (others + steal) / ((end[0] - start[0]) * (os.cpu_count() or 1))}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict[str, Any]:
    import peft
    import transformers

    return {"device": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "command": " ".join(["python -m benchmarks.c1", *sys.argv[1:]]), "git_commit": git_commit()}


# ---- report -----------------------------------------------------------------------------------------------
def token_counts(workload: Workload) -> dict[str, int]:
    """Logical tokens of the workload (the same for every system): each request's P + input, and its outputs."""
    cfg = workload.config
    prefill = cfg.num_requests * cfg.prompt_len + sum(workload.input_lengths)
    output = cfg.num_requests * cfg.new_tokens
    return {"prefill": prefill, "output": output, "total": prefill + output}


def verdict(value: float, target: float) -> str:
    return f"{value:.2f} (target >= {target:g}: {'PASS' if value >= target else 'FAIL'})"


def print_report(report: dict[str, Any]) -> None:
    engine_s = report["systems"]["engine"]["seconds"]
    print(f"\nWorkload {report['workload']['name']}: {report['workload']['num_tasks']} tasks x P="
          f"{report['workload']['prompt_len']}, {report['workload']['num_requests']} requests, "
          f"{report['workload']['new_tokens']} new tokens each (best of {report['repeats']})")
    print(f"{'system':<10} {'seconds':>9} {'out tok/s':>10} {'total tok/s':>12} {'engine speedup':>15}")
    for name, s in report["systems"].items():
        print(f"{name:<10} {s['seconds']:>9.3f} {s['output_tok_s']:>10.0f} {s['total_tok_s']:>12.0f} "
              f"{s['seconds'] / engine_s:>14.2f}x")
    floor = report["floor"]
    print(f"CPU floor: {floor['total']:.3f} s ({', '.join(f'{k} {v * 1e3:.0f} ms' for k, v in floor.items() if k != 'total')})")
    t = report["targets"]
    print(f"engine / HF mixed-task: {verdict(t['engine/hf_mixed']['value'], t['engine/hf_mixed']['target'])}")
    print(f"engine / PEFT:          {verdict(t['engine/peft']['value'], t['engine/peft']['target'])}")
    print(f"floor / engine:         {verdict(t['floor_fraction']['value'], t['floor_fraction']['target'])}")
    kv = report["kv_memory"]
    print(f"KV bytes/request: {kv['with_sharing'] / 1024:.1f} KiB with prefix sharing, "
          f"{kv['without_sharing'] / 1024:.1f} KiB without ({kv['saving']:.0%} less)")
    a = report["agreement"]
    print(f"greedy agreement with engine, sample of {len(a['sample'])}: HF mixed {a['hf_mixed']:.3f}, "
          f"PEFT (unpadded) {a['peft']:.3f}; all requests: HF mixed {a['hf_mixed_all']:.3f}, "
          f"PEFT left-padded batches {a['peft_padded_batches_all']:.3f} (PEFT ignores position_ids, peft#1093)")
    env = report["environment"]
    busy = env["contention_cpu_s"]
    if busy and busy["share"] > CONTENTION_WARNING:
        print(f"WARNING: other processes ({busy['others']:.1f} CPU-s) and the hypervisor ({busy['steal']:.1f} CPU-s) took "
              f"{busy['share']:.0%} of the CPUs during the run: timings may be off, rerun on an idle machine")
    print(f"{env['device']}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}; commit {env['git_commit']}; `{env['command']}`")


def profile_engine(system: EngineSystem, items: list[WorkItem], top: int = 20) -> None:
    """cProfile one cold-prefix engine.generate of the workload; print the top costs by cumulative time."""
    system.reset()
    profiler = cProfile.Profile()
    profiler.runcall(system.generate, items)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


@dataclass
class Measurements:
    workload: Workload
    results: dict[str, SystemResult]
    sample: list[int]  # request indices of the honesty check
    peft_unpadded: list[list[int]]  # PEFT's tokens for the sample, one request at a time
    prefix_misses: list[int]  # prefixes the engine computed in each timed run
    floor: dict[str, float]
    kv: dict[str, float]


def measure_all(config: WorkloadConfig, repeats: int, profile: bool) -> Measurements:
    with tempfile.TemporaryDirectory() as tmp:
        workload = build_workload(config, Path(tmp))
        adapter_dirs = build_peft_adapters(workload, Path(tmp))
        engine = EngineSystem(workload)
        hf = HFMixedTask(workload)
        peft_system = PeftPerTask(workload, adapter_dirs)  # every adapter loaded before timing
        results = [measure("engine", engine.generate, workload, repeats, reset=engine.reset),
                   measure("hf_mixed", hf.generate, workload, repeats),
                   measure("peft", peft_system.generate, workload, repeats)]
        sample = sorted(random.Random(config.seed).sample(range(config.num_requests),
                                                          min(AGREEMENT_SAMPLE, config.num_requests)))
        peft_unpadded = peft_system.generate_unpadded([workload.items[i] for i in sample])
        if profile:
            profile_engine(engine, workload.items)
        return Measurements(workload, {r.name: r for r in results}, sample, peft_unpadded,
                            engine.prefix_misses[1:],  # [0] is the warm-up
                            cpu_floor(workload), kv_bytes_per_request(workload, engine.engine))


def build_report(m: Measurements, repeats: int) -> dict[str, Any]:
    counts = token_counts(m.workload)
    eng, hf, peft = m.results["engine"], m.results["hf_mixed"], m.results["peft"]
    eng_sample = [eng.tokens[i] for i in m.sample]
    values = {"engine/hf_mixed": hf.seconds / eng.seconds, "engine/peft": peft.seconds / eng.seconds,
              "floor_fraction": m.floor["total"] / eng.seconds}
    return {
        "workload": dataclasses.asdict(m.workload.config),
        "repeats": repeats,
        "token_counts": counts,
        "systems": {r.name: {"seconds": r.seconds, "runs": r.runs, "output_tok_s": counts["output"] / r.seconds,
                             "total_tok_s": counts["total"] / r.seconds} for r in m.results.values()},
        "engine_prefix_computations_per_run": m.prefix_misses,
        "floor": m.floor,
        "targets": {k: {"value": v, "target": TARGETS[k], "pass": v >= TARGETS[k]} for k, v in values.items()},
        "kv_memory": m.kv,
        "agreement": {"sample": m.sample,
                      "hf_mixed": agreement(eng_sample, [hf.tokens[i] for i in m.sample]),
                      "peft": agreement(eng_sample, m.peft_unpadded),
                      "hf_mixed_all": agreement(eng.tokens, hf.tokens),
                      "peft_padded_batches_all": agreement(eng.tokens, peft.tokens)},
        "environment": environment(),
    }


def run(config: WorkloadConfig, repeats: int, out: Path, profile: bool) -> int:
    torch.set_num_threads(2)
    cpu_start = cpu_seconds()
    report = build_report(measure_all(config, repeats, profile), repeats)
    report["environment"]["contention_cpu_s"] = contention(cpu_start)
    print_report(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    agree = report["agreement"]
    if min(agree["hf_mixed"], agree["peft"]) < MIN_AGREEMENT:
        print(f"FAIL: greedy tokens agree on fewer than {MIN_AGREEMENT:.3f} of the sampled requests", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (4 tasks, 8 requests, 4 tokens)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per system, best reported (default 3)")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--profile", action="store_true", help="also cProfile one engine.generate of the workload")
    args = parser.parse_args(argv)
    config = WorkloadConfig()
    if args.quick:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=2048), **QUICK)
    repeats = args.repeats or (1 if args.quick else 3)
    out = args.out or (DEFAULT_OUT.with_name("c1-cpu-quick.json") if args.quick else DEFAULT_OUT)
    return run(config, repeats, out, args.profile)


if __name__ == "__main__":
    raise SystemExit(main())

"""Engine replicas on Ray Serve, in one run on a local Ray cluster: prefix K/V computations per task with
task-affinity routing vs plain round-robin, and throughput of 1 vs 2 replicas, all through the OpenAI-compatible
HTTP ingress with the same requests (arriving in a seeded random task order, as real traffic does), the same
greedy tokens checked against the single-process engine."""

from __future__ import annotations

import random
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from softprompt import Engine, Request, SamplingParams

from .environment import DescendantCPU
from .progress import ProgressCounter
from .throughput import agreement
from .workloads import (ReplicaBenchConfig, ReplicaSetup, WorkItem, Workload, WorkloadConfig, WorkloadSpec,
                        build_workload)

APP = "softprompt-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(item: WorkItem, new_tokens: int) -> dict[str, Any]:
    return {"model": Workload.task_name(item.task), "prompt": item.input_ids, "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}


class _Deployment:
    """One setup deployed on the running Serve instance, and a client for it."""

    def __init__(self, url: str, settings, replicas: int):
        import httpx
        from ray import serve

        from softprompt.engine.server.ray_serve import build_app

        serve.run(build_app(settings), name=APP, route_prefix="/")
        self.http = httpx.Client(base_url=url, timeout=600, trust_env=False,
                                 limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        self.replicas = replicas
        self.reports(0)

    def reports(self, min_requests: int, timeout: float = 120) -> dict[str, dict]:
        """The replicas' reports once all `replicas` reported, `min_requests` were counted and nothing runs."""
        deadline = time.monotonic() + timeout
        while True:
            reports = self.http.get("/health").json()["replicas"]
            seen = sum(sum(r["requests"].values()) for r in reports.values())
            if (len(reports) >= self.replicas and seen >= min_requests
                    and all(r["running"] == r["waiting"] == 0 for r in reports.values())):
                return reports
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replicas did not settle: {reports}")
            time.sleep(0.2)

    def post(self, body: dict[str, Any]) -> list[int]:
        r = self.http.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        return r.json()["choices"][0]["token_ids"]

    def close(self) -> None:
        from ray import serve

        self.http.close()
        serve.delete(APP)


def measure_replicas(spec: WorkloadSpec, config: WorkloadConfig, bench: ReplicaBenchConfig, repeats: int = 3,
                     workdir: Path | None = None) -> dict[str, Any]:
    import ray
    from ray import serve

    from softprompt.engine.server.ray_serve import RayServeSettings

    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="softprompt-bench-")
    root = workdir or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        workload = build_workload(config, root)
        prompt_dir = root / f"prompts-{config.name.lower()}"
        prompt_dir.mkdir(exist_ok=True)
        for task, prompt in enumerate(workload.prompts):
            save_file({"prompt": prompt.contiguous()}, str(prompt_dir / f"{Workload.task_name(task)}.safetensors"))
        items = list(workload.items)
        random.Random(config.seed).shuffle(items)  # traffic arrives in no task order
        bodies = [_body(it, config.new_tokens) for it in items]

        reference = Engine(workload.model_dir, device="cpu", dtype=config.dtype,
                           max_batched_tokens=config.max_batched_tokens)
        for task, prompt in enumerate(workload.prompts):
            reference.add_prompt(Workload.task_name(task), prompt)
        expected = [o.token_ids for o in reference.generate([
            Request(prompt=b["model"], input_ids=b["prompt"],
                    sampling=SamplingParams(max_new_tokens=config.new_tokens, ignore_eos=True)) for b in bodies])]
        del reference

        needed = max(s.replicas for s in bench.setups) * bench.replica_cpus
        ray.init(address="local", num_cpus=max(needed, 1), include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        setups: dict[str, dict[str, Any]] = {}
        cluster_cpu = DescendantCPU()  # the Ray cluster's processes are the benchmark's own, not contention
        try:
            for setup in bench.setups:
                setups[setup.label] = _run_setup(setup, f"http://127.0.0.1:{port}", bodies, config, bench,
                                                 RayServeSettings(
                                                     model_dir=str(workload.model_dir), prompt_dir=str(prompt_dir),
                                                     replicas=setup.replicas, routing=setup.routing,
                                                     dtype=config.dtype, device="cpu",
                                                     max_batched_tokens=config.max_batched_tokens,
                                                     replica_cpus=bench.replica_cpus, stats_interval_s=0.2),
                                                 repeats, cluster_cpu)
        finally:
            cluster_cpu.sample()
            serve.shutdown()
            ray.shutdown()
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = build_report(spec, config, bench, setups, expected, repeats)
    report["own_children_cpu_s"] = cluster_cpu.seconds
    return report


def _run_setup(setup: ReplicaSetup, url: str, bodies: list[dict], config: WorkloadConfig, bench: ReplicaBenchConfig,
               settings, repeats: int, cluster_cpu: DescendantCPU) -> dict[str, Any]:
    """A cold run (prefixes computed on first use: the computations per task are counted in it), then warm runs
    (prefixes cached); throughput is the best run."""
    deployment = _Deployment(url, settings, setup.replicas)
    try:
        warmup = [{**bodies[0], "model": "base", "max_tokens": 2} for _ in range(2 * setup.replicas)]
        with ThreadPoolExecutor(len(warmup)) as pool:  # first forward passes of each replica (no prompt: no prefix)
            list(pool.map(deployment.post, warmup))
        runs, reports, first_tokens, runs_agree = [], None, None, True
        for run in range(repeats):
            bar = ProgressCounter(len(bodies), f"{setup.label} ({'cold' if run == 0 else 'warm'})")

            def one(body: dict, bar: ProgressCounter = bar) -> list[int]:
                tokens = deployment.post(body)
                bar.update()
                return tokens

            start = time.perf_counter()
            with ThreadPoolExecutor(bench.clients) as pool:
                tokens = list(pool.map(one, bodies))
            runs.append(time.perf_counter() - start)
            bar.close()
            if run == 0:
                reports = deployment.reports(len(warmup) + len(bodies))
                first_tokens = tokens
            runs_agree = runs_agree and tokens == first_tokens
    finally:
        cluster_cpu.sample()  # before its replicas go
        deployment.close()
    tasks = sorted({b["model"] for b in bodies})
    computations = {t: sum(r["prefix_computations"].get(t, 0) for r in reports.values()) for t in tasks}
    replicas_per_task = {t: sum(1 for r in reports.values() if r["requests"].get(t)) for t in tasks}
    outputs = sum(len(t) for t in tokens)
    return {
        "replicas": setup.replicas, "routing": setup.routing, "runs": runs, "seconds": min(runs),
        "cold_seconds": runs[0], "output_tok_s": outputs / min(runs), "cold_output_tok_s": outputs / runs[0],
        "requests_per_replica_cold": {k: sum(n for t, n in r["requests"].items() if t != "base")
                                      for k, r in reports.items()},
        "prefix_computations": computations,
        "prefix_computations_total": sum(computations.values()),
        "prefix_computations_per_task_mean": sum(computations.values()) / len(tasks),
        "prefix_computations_per_task_max": max(computations.values()),
        "replicas_per_task_mean": sum(replicas_per_task.values()) / len(tasks),
        "tokens": tokens, "runs_agree": runs_agree,
    }


def build_report(spec: WorkloadSpec, config: WorkloadConfig, bench: ReplicaBenchConfig, setups: dict[str, dict],
                 expected: list[list[int]], repeats: int) -> dict[str, Any]:
    pairs = {label: agreement(s["tokens"], expected) for label, s in setups.items()}
    # fp32 greedy, the same engine code: identical, in every run
    ok = all(p["exact"] == 1.0 for p in pairs.values()) and all(s["runs_agree"] for s in setups.values())
    base = next(iter(setups.values()))
    for s in setups.values():
        s["speedup_vs_first"] = base["seconds"] / s["seconds"]
        del s["tokens"]
    return {
        "workload": {"description": spec.description, "kind": spec.kind, **asdict(config),
                     "setups": [asdict(s) for s in bench.setups], "clients": bench.clients,
                     "replica_cpus": bench.replica_cpus},
        "repeats": repeats,
        "setups": setups,
        "token_counts": {"output": config.num_requests * config.new_tokens},
        "agreement": {"pairs": {f"{label}~single-process engine": p for label, p in pairs.items()},
                      "rule": "every setup's greedy tokens equal the single-process engine's on every request, "
                              "in every run",
                      "pass": ok},
    }


def print_report(report: dict[str, Any]) -> None:
    w = report["workload"]
    print(f"Workload {w['name']} (cpu, {w['dtype']}): {w['num_tasks']} tasks x P={w['prompt_len']}, "
          f"{w['num_requests']} requests from {w['clients']} HTTP clients, {w['new_tokens']} new tokens each; "
          f"each replica {w['replica_cpus']:g} CPU; first run cold, best of {report['repeats']} reported")
    print(f"{'setup':<26} {'cold s':>7} {'best s':>7} {'out tok/s':>10} {'vs first':>9} "
          f"{'prefix K/V computations (cold run)':>36}")
    for label, s in report["setups"].items():
        comp = (f"{s['prefix_computations_total']} ({s['prefix_computations_per_task_mean']:.2f}/task, "
                f"max {s['prefix_computations_per_task_max']})")
        print(f"{label:<26} {s['cold_seconds']:>7.2f} {s['seconds']:>7.2f} {s['output_tok_s']:>10.0f} "
              f"{s['speedup_vs_first']:>8.2f}x {comp:>36}")
    a = report["agreement"]
    print(f"greedy tokens: {a['rule']}: {'PASS' if a['pass'] else 'FAIL'}")
